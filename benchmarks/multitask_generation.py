"""Does the KV cache pay off? Greedy and beam decoding of 128 new tokens, with and without it.

A ``MultitaskTransformer`` with random weights (the default config's shape: d=128, 4 heads, 2
key/value heads, 2 decoder layers, or ``--d-model`` / ``--decoder-layers``) decodes the same
source batch both ways, alternating, ``--repeats`` times; the table reports the median time of
each and the speed-up, and checks that both ways produce identical tokens (``<eos>`` is
suppressed so every row runs the full 128 steps). Without the cache, every step recomputes the
decoder over the whole prefix and the cross-attention keys/values of the encoder output; with
it, a step feeds only the newest token.

    python benchmarks/multitask_generation.py            # CPU, about a minute on 2 shared cores
    python benchmarks/multitask_generation.py --device cuda --batch-size 64

Prints a table and writes ``benchmarks/results/multitask_generation.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from zoo.multitask import MultitaskTransformer, TaskSpec, beam_search, greedy_search

RESULTS = Path(__file__).resolve().parent / "results" / "multitask_generation.json"


def timed(fn, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--source-length", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--decoder-layers", type=int, default=2)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab = 64
    model = MultitaskTransformer(
        vocab,
        [TaskSpec("gen", "generation", max_target_length=args.new_tokens + 1)],
        d_model=args.d_model,
        num_heads=4,
        num_kv_heads=2,
        num_layers=3,
        decoder_layers=args.decoder_layers,
    ).to(args.device)
    model.eval()
    source = torch.randint(4, vocab, (args.batch_size, args.source_length), device=args.device)
    mask = torch.ones_like(source, dtype=torch.bool)

    runs = {
        "greedy": lambda cache: greedy_search(
            model, "gen", source, mask, args.new_tokens, use_cache=cache, stop_at_eos=False
        ),
        f"beam x{args.beams}": lambda cache: beam_search(
            model,
            "gen",
            source,
            mask,
            args.new_tokens,
            num_beams=args.beams,
            length_penalty=0.0,
            use_cache=cache,
        )[0],
    }
    rows = []
    for name, run in runs.items():
        run(True), run(False)  # warm-up
        cached_times, plain_times, identical = [], [], True
        for _ in range(args.repeats):  # alternate, so drift on a shared machine hits both
            t_cached, cached = timed(lambda run=run: run(True), args.device)
            t_plain, plain = timed(lambda run=run: run(False), args.device)
            cached_times.append(t_cached)
            plain_times.append(t_plain)
            identical &= torch.equal(cached, plain)
        cached_s, plain_s = statistics.median(cached_times), statistics.median(plain_times)
        rows.append(
            {
                "decoding": name,
                "new_tokens": args.new_tokens,
                "no_cache_s": round(plain_s, 4),
                "kv_cache_s": round(cached_s, 4),
                "speedup": round(plain_s / cached_s, 2),
                "tokens_per_s_cached": round(args.batch_size * args.new_tokens / cached_s, 1),
                "identical_tokens": identical,
                "generated_length": int(cached.shape[1]),
            }
        )
    print(f"\nKV cache vs none, {args.new_tokens} new tokens, batch {args.batch_size}, device {args.device}")
    print(f"{'decoding':<10} {'no cache s':>11} {'KV cache s':>11} {'speed-up':>9} {'identical':>10}")
    for r in rows:
        print(
            f"{r['decoding']:<10} {r['no_cache_s']:>11.3f} {r['kv_cache_s']:>11.3f} "
            f"{r['speedup']:>8.2f}x {r['identical_tokens']!s:>10}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": platform.platform(),
        "processor": platform.processor(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "args": vars(args),
    }
    RESULTS.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
