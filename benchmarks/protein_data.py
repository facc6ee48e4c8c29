"""Protein data pipeline: the FASTA byte-offset index vs parsing the file into memory, and token-budget
batching vs fixed-size batches.

1. A large FASTA file is written (the embedded real proteins repeated under new ids, 60-residue
   lines). Side by side: building ``FastaIndex`` (one scan, saved beside the file), re-opening it
   from the cache, and random-access reads; against a plain parse of the whole file into a dict
   (what a dataset without an index must hold in every worker). Time and peak resident-memory
   growth, each measured in a fresh process.
2. On the embedded proteins (crops of 1,022 residues), the share of padded tokens per epoch with
   ``batch_size=32`` shuffled batches vs ``max_tokens=8192`` length-sorted token-budget batches.

    python benchmarks/protein_data.py --size-mb 512
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident-set growth while open (sampled every millisecond)."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, _rss())


def write_large_fasta(path: Path, size_mb: int) -> int:
    from zoo.datamodules.proteins import embedded_fasta
    from zoo.protein.fasta import FastaIndex

    index = FastaIndex.open(embedded_fasta())
    records = [(index.record_id(i), index.sequence(i)) for i in range(len(index))]
    target, written, count = size_mb * 2**20, 0, 0
    with path.open("w") as handle:
        copy = 0
        while written < target:
            chunk = []
            for record_id, sequence in records:
                lines = "\n".join(sequence[i : i + 60] for i in range(0, len(sequence), 60))
                chunk.append(f">c{copy}_{record_id}\n{lines}\n")
            text = "".join(chunk)
            handle.write(text)
            written += len(text)
            count += len(records)
            copy += 1
    return count


def naive_parse(path: Path) -> dict[str, str]:
    records, name, lines = {}, None, []
    with path.open() as handle:
        for line in handle:
            if line.startswith(">"):
                if name is not None:
                    records[name] = "".join(lines)
                name, lines = line[1:].split(maxsplit=1)[0], []
            else:
                lines.append(line.strip())
    if name is not None:
        records[name] = "".join(lines)
    return records


def child(task: str, path: Path, reads: int) -> dict:
    """One measurement in this (fresh) process."""
    from zoo.protein.fasta import FastaIndex

    result = {}
    with PeakRSS() as rss:
        start = time.perf_counter()
        if task == "naive":
            records = naive_parse(path)
            result["records"] = len(records)
        else:
            index = FastaIndex.open(path)
            result["records"] = len(index)
        result["open_s"] = time.perf_counter() - start
        if task != "naive":
            picks = np.random.default_rng(0).integers(0, len(index), reads)
            start = time.perf_counter()
            residues = sum(len(index.sequence(int(i))) for i in picks)
            result["reads_per_s"] = reads / (time.perf_counter() - start)
            result["residues_read"] = residues
    result["peak_rss_mb"] = (rss.peak - rss.base) / 2**20
    return result


def run_child(task: str, path: Path, reads: int) -> dict:
    command = [sys.executable, __file__, "--child", task, "--path", str(path), "--reads", str(reads)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def padding_shares() -> dict:
    import torch

    from zoo.datamodules.proteins import ProteinDataModule

    shares = {}
    for name, kwargs in (("batch_size=32", {"batch_size": 32}), ("max_tokens=8192", {"max_tokens": 8192})):
        torch.manual_seed(0)
        data = ProteinDataModule(max_length=1022, **kwargs)
        data.setup("fit")
        real = padded = batches = 0
        for batch in data.train_dataloader():
            real += int(batch["tokens"].ne(data.alphabet.padding_idx).sum())
            padded += batch["tokens"].numel()
            batches += 1
        shares[name] = {
            "batches": batches,
            "real_tokens": real,
            "padded_tokens": padded,
            "padding_share": 1 - real / padded,
        }
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--reads", type=int, default=20000)
    parser.add_argument("--output", default="benchmarks/results/protein_data.json")
    parser.add_argument("--child", choices=["index", "cached", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.path), args.reads)))
        return

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "large.fasta"
        count = write_large_fasta(path, args.size_mb)
        size_mb = path.stat().st_size / 2**20
        index = run_child("index", path, args.reads)  # builds and saves the index
        cached = run_child("cached", path, args.reads)  # loads it
        naive = run_child("naive", path, args.reads)
    shares = padding_shares()

    print(
        f"FASTA of {size_mb:.0f} MB, {count:,} records (embedded proteins repeated), {args.reads:,} random reads"
    )
    print(f"{'method':<28} {'open s':>8} {'MB/s':>8} {'reads/s':>10} {'peak MB':>9}")
    for name, r in (
        ("FastaIndex build + save", index),
        ("FastaIndex from cache", cached),
        ("parse into a dict", naive),
    ):
        reads = f"{r['reads_per_s']:>10.0f}" if "reads_per_s" in r else f"{'-':>10}"
        print(
            f"{name:<28} {r['open_s']:>8.2f} {size_mb / r['open_s']:>8.0f} {reads} {r['peak_rss_mb']:>9.1f}"
        )
    print("\nEmbedded proteins, one training epoch (crops of 1,022 residues):")
    print(f"{'batching':<18} {'batches':>8} {'real tokens':>12} {'padded':>10} {'padding':>8}")
    for name, s in shares.items():
        print(
            f"{name:<18} {s['batches']:>8} {s['real_tokens']:>12,} {s['padded_tokens']:>10,} {s['padding_share']:>8.1%}"
        )
    record = {
        "benchmark": "protein_data",
        "fasta_mb": size_mb,
        "records": count,
        "reads": args.reads,
        "index_build": index,
        "index_cached": cached,
        "parse_into_dict": naive,
        "padding": shares,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written {output}")


if __name__ == "__main__":
    main()
