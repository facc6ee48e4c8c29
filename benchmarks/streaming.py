"""Loader throughput, source files vs their LitData-optimized directory (``zoo data optimize``), side by side.

Two data sets are written to a temporary folder and optimized: an image-folder tree of JPEGs (the embedded
shapes, rendered at ``--image-size``) and the embedded proteins as a FASTA file. Each training loader of
``ImageClassificationDataModule`` (timm's augmentation) and ``ProteinDataModule`` (token budgets) then runs
whole epochs from the source and from the optimized directory, alternately, and the median samples/s of
each is reported, with 0 and with ``--workers`` loader workers. The optimized directory is local, so this
measures LitData's reading and decoding against reading files; an object store adds its request latency
per sample (see ``zoo.streaming``). Prints a table, writes JSON.

    OMP_NUM_THREADS=1 python benchmarks/streaming.py [--images 2000] [--rounds 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from lightning.fabric.utilities.data import _set_sampler_epoch
from PIL import Image

from zoo import streaming
from zoo.datamodules import ImageClassificationDataModule, ProteinDataModule
from zoo.datamodules.proteins import embedded_fasta
from zoo.datamodules.shapes import render_shapes
from zoo.protein.fasta import FastaIndex

RESULTS = Path(__file__).resolve().parent / "results"


def write_images(root: Path, count: int, size: int) -> None:
    """``root/<class>/<i>.jpg``: the shapes' images under their class names."""
    for index in range(count):
        sample = render_shapes(index, seed=0, split="train", image_size=size)
        folder = root / f"class{sample.label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sample.image).save(folder / f"{index}.jpg", quality=90)


def write_fasta(path: Path) -> None:
    """The embedded proteins as a plain FASTA file (60 residues a line)."""
    index = FastaIndex.open(embedded_fasta())
    with path.open("w") as handle:
        for i in range(len(index)):
            sequence = index.sequence(i)
            lines = "\n".join(sequence[k : k + 60] for k in range(0, len(sequence), 60))
            handle.write(f">{index.record_id(i)}\n{lines}\n")


def samples_per_second(make, source: str, workers: int, epoch: int) -> float:
    """One training epoch of the data module built on ``source``, after the loader's first batch."""
    data = make(source, workers)
    data.setup("fit")
    loader = data.train_dataloader()
    _set_sampler_epoch(loader, epoch)
    iterator = iter(loader)
    next(iterator)  # worker start-up and the first reads are not throughput
    start, count = time.perf_counter(), 0
    for batch in iterator:
        count += len(batch["ids"] if "ids" in batch else batch["label"])
    rate = count / (time.perf_counter() - start)
    del iterator, loader, data
    gc.collect()  # the workers stop here, not in the next loader's forked workers
    return rate


def vision(source: str, workers: int) -> ImageClassificationDataModule:
    return ImageClassificationDataModule(data_dir=source, img_size=32, batch_size=64, num_workers=workers)


def protein(source: str, workers: int) -> ProteinDataModule:
    return ProteinDataModule(fasta=source, max_tokens=8192, num_workers=workers)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000, help="images in the folder tree")
    parser.add_argument("--image-size", type=int, default=64, help="side of the JPEGs")
    parser.add_argument("--rounds", type=int, default=3, help="epochs per loader and source (median)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers of the second setting")
    parser.add_argument("--output", default=str(RESULTS / "streaming.json"))
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)  # "left out ..."

    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        write_images(root / "images", args.images, args.image_size)
        write_fasta(root / "proteins.fasta")
        sources = {}
        for name, fmt, source in (("vision", "images", "images"), ("protein", "fasta", "proteins.fasta")):
            start = time.perf_counter()
            metadata = streaming.optimize(fmt, root / source, root / f"{source}.opt", num_workers=2)
            seconds = time.perf_counter() - start
            print(f"optimized {name}: {metadata['count']} records in {seconds:.1f} s (2 conversion workers)")
            sources[name] = (str(root / source), str(root / f"{source}.opt"))

        rows = []
        for name, make in (("vision", vision), ("protein", protein)):
            for workers in (0, args.workers):
                rates = {"source": [], "optimized": []}
                for epoch in range(args.rounds):  # alternately: a shared machine drifts
                    for kind, source in zip(rates, sources[name]):
                        rates[kind].append(samples_per_second(make, source, workers, epoch))
                medians = {kind: statistics.median(values) for kind, values in rates.items()}
                rows.append({"loader": name, "workers": workers, **medians})

    print(f"\nsamples/s, median of {args.rounds} epochs (OMP_NUM_THREADS={threads}, {os.cpu_count()} CPUs)")
    print(f"{'loader':<9} {'workers':>7} {'source files':>13} {'optimized':>10} {'ratio':>6}")
    for row in rows:
        ratio = row["optimized"] / row["source"]
        print(
            f"{row['loader']:<9} {row['workers']:>7} {row['source']:>13.0f} {row['optimized']:>10.0f} {ratio:>6.2f}"
        )
    record = {"omp_num_threads": threads, "images": args.images, "image_size": args.image_size, "rows": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
