"""ESM-2 inference: our ``zoo.protein.ESM2`` vs fair-esm's ``esm.model.esm2.ESM2``, same weights, one process.

Both models run the same mixed-length padded batches of real proteins (the embedded proteome), interleaved (ours, theirs, ours, ...) so
that drift on a shared machine hits both alike; the figure that matters is the ratio. Throughput
counts real tokens (``<cls>`` + residues + ``<eos>``, not padding). Peak memory is the CUDA
allocator's peak on GPU; on CPU, the peak resident-set growth over one pass, measured in a fresh
subprocess per model (sampled every 0.2 ms, glibc told to return large blocks to the OS at once,
so that RSS tracks live tensors rather than the allocator's cache).

    python benchmarks/esm2_inference.py --size t6_8M --batches 4 --batch-size 8 --max-length 300
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from zoo.datamodules.proteins import embedded_fasta, select_records
from zoo.protein import ESM2, Alphabet
from zoo.protein.fasta import FastaIndex


def make_batches(n: int, batch_size: int, min_len: int, max_len: int, seed: int) -> list[torch.Tensor]:
    """Padded batches of real proteins (the embedded proteome) with ``min_len``-``max_len`` residues."""
    index = FastaIndex.open(embedded_fasta())
    usable, _ = select_records(index, "error", 0.5)
    fitting = usable[(index.length[usable] >= min_len) & (index.length[usable] <= max_len)]
    if len(fitting) < n * batch_size:
        raise ValueError(f"only {len(fitting)} embedded proteins have {min_len}-{max_len} residues")
    generator = torch.Generator().manual_seed(seed)
    chosen = fitting[torch.randperm(len(fitting), generator=generator)[: n * batch_size].numpy()]
    converter = Alphabet().get_batch_converter()
    pairs = [(index.record_id(int(i)), index.sequence(int(i))) for i in chosen]
    return [converter(pairs[b * batch_size : (b + 1) * batch_size])[2] for b in range(n)]


class _PeakRSS:
    """Peak resident-set size growth while the context is open (CPU memory, sampled)."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        self.base = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.0002)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def _return_freed_memory_to_os() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: large blocks are mmap'd and unmapped on free
    except (OSError, AttributeError):
        pass


def measure(model, batches, device, repeats: int) -> tuple[list[float], float]:
    """Seconds per pass over all batches (one per repeat) and peak memory (bytes) of one pass."""
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for tokens in batches:
                model(tokens)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            for tokens in batches:
                model(tokens)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            with _PeakRSS() as rss:
                for tokens in batches:
                    model(tokens)
            peak = rss.growth
    return times, peak


def _cpu_peak(name: str) -> int:
    """Peak RSS growth of one pass of ``name``, in a fresh process so no allocator cache is shared."""
    command = [sys.executable, *sys.argv, "--memory-of", name]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])["peak"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="t6_8M", help="published size (t6_8M, t12_35M, ...)")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--min-length", type=int, default=50)
    parser.add_argument("--max-length", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default="benchmarks/results/esm2_inference.json")
    parser.add_argument("--memory-of", choices=["zoo", "fair-esm"], help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    if args.memory_of:
        _return_freed_memory_to_os()

    import esm  # fair-esm, the reference

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    ours = ESM2.from_config(args.size).eval()
    cfg = ours.config
    theirs = esm.model.esm2.ESM2(cfg.num_layers, cfg.embed_dim, cfg.attention_heads).eval()
    theirs.load_state_dict(ours.state_dict())
    ours, theirs = ours.to(device, dtype), theirs.to(device, dtype)
    batches = [
        b.to(device) for b in make_batches(args.batches, args.batch_size, args.min_length, args.max_length, 0)
    ]
    real_tokens = sum(int(b.ne(Alphabet().padding_idx).sum()) for b in batches)
    if args.memory_of:  # child process of _cpu_peak: one pass of one model, report, stop
        print(
            json.dumps({"peak": measure(ours if args.memory_of == "zoo" else theirs, batches, device, 0)[1]})
        )
        return

    with torch.inference_mode():  # warm-up, and a check that both compute the same thing
        diff = (ours(batches[0])["logits"] - theirs(batches[0])["logits"]).abs().max().item()
    results = {}
    ours_times, theirs_times = [], []
    for _ in range(args.repeats):  # interleave so machine drift hits both alike
        ours_times += measure(ours, batches, device, 1)[0]
        theirs_times += measure(theirs, batches, device, 1)[0]
    for name, model, times in (("zoo", ours, ours_times), ("fair-esm", theirs, theirs_times)):
        peak = measure(model, batches, device, 0)[1] if device.type == "cuda" else _cpu_peak(name)
        seconds = statistics.median(times)
        results[name] = {
            "seconds": seconds,
            "tokens_per_s": real_tokens / seconds,
            "peak_memory_mb": peak / 2**20,
        }
    ratio = results["zoo"]["tokens_per_s"] / results["fair-esm"]["tokens_per_s"]
    memory_ratio = results["zoo"]["peak_memory_mb"] / max(results["fair-esm"]["peak_memory_mb"], 1e-9)

    print(
        f"ESM-2 {args.size} inference, {args.device} {args.dtype}, {torch.get_num_threads()} threads: "
        f"{args.batches} batches x {args.batch_size} seqs, lengths {args.min_length}-{args.max_length}, "
        f"{real_tokens} real tokens, median of {args.repeats}"
    )
    print(f"{'model':<10} {'tokens/s':>12} {'s/pass':>10} {'peak MB':>10}")
    for name, r in results.items():
        print(f"{name:<10} {r['tokens_per_s']:>12.0f} {r['seconds']:>10.3f} {r['peak_memory_mb']:>10.1f}")
    print(
        f"throughput ratio zoo/fair-esm: {ratio:.2f}x; memory ratio: {memory_ratio:.2f}; "
        f"max |logit diff| {diff:.1e}"
    )

    record = {
        "benchmark": "esm2_inference",
        "size": args.size,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "batches": args.batches,
        "batch_size": args.batch_size,
        "lengths": [args.min_length, args.max_length],
        "real_tokens": real_tokens,
        "repeats": args.repeats,
        "results": results,
        "throughput_ratio": ratio,
        "memory_ratio": memory_ratio,
        "max_logit_diff": diff,
        "torch": torch.__version__,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written {output}")


if __name__ == "__main__":
    main()
