"""Training speed of the default job under three CPU thread settings, on a quiet machine and next to one busy
process: PyTorch's default (one thread per core), one thread, and the zoo's default (``zoo.threads``: the cores
other processes leave free). Each setting runs in a fresh process (threads are fixed at start); the competitor
is another PyTorch process multiplying matrices on every core, as a second training job would.

    python benchmarks/cpu_threads.py [--steps 12] [--rounds 3] [--warmup-seconds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

#: one training step of the default config's network (DeiT-Ti/8 with the conv stem, batch 64, AdamW)
STEPS = """
import sys, time, torch, torch.nn.functional as F
setting, steps = sys.argv[1], int(sys.argv[2])
if setting == "zoo":
    from zoo.threads import choose_threads
    choose_threads()
from zoo.vision import ImageClassifier
torch.manual_seed(0)
model = ImageClassifier(model_name="deit_tiny_patch16_224", patch_size=8, stem="conv", num_classes=12).model
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
images, labels = torch.randn(64, 3, 32, 32), torch.randint(12, (64,))
def step():
    F.cross_entropy(model(images), labels).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
step()
start = time.perf_counter()
for _ in range(steps):
    step()
print(torch.get_num_threads(), steps / (time.perf_counter() - start))
"""

COMPETITOR = """
import torch
a = torch.randn(1024, 1024)
while True:
    a = (a @ a).tanh()
"""

SETTINGS = {"torch default": {}, "1 thread": {"OMP_NUM_THREADS": "1"}, "zoo default": {}}


def run_setting(name: str, steps: int) -> tuple[int, float]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | SETTINGS[name]
    setting = "zoo" if name == "zoo default" else "plain"
    out = subprocess.run(
        [sys.executable, "-c", STEPS, setting, str(steps)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    threads, rate = out.stdout.split()[-2:]
    return int(threads), float(rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument(
        "--rounds", type=int, default=3, help="settings alternate; the median of the rounds counts"
    )
    parser.add_argument("--warmup-seconds", type=float, default=5.0, help="competitor alone before measuring")
    args = parser.parse_args()
    rows = []
    for condition in ("quiet", "one busy process"):
        competitor = None
        if condition != "quiet":
            competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR])
            time.sleep(args.warmup_seconds)  # a job already running, as a real competitor would be
        try:
            rates: dict[str, list[float]] = {name: [] for name in SETTINGS}
            threads: dict[str, int] = {}
            for _ in range(args.rounds):
                for name in SETTINGS:
                    threads[name], rate = run_setting(name, args.steps)
                    rates[name].append(rate)
            for name in SETTINGS:
                median = statistics.median(rates[name])
                rows.append({"condition": condition, "setting": name, "threads": threads[name], "it/s": median,
                             "rounds": rates[name]})  # fmt: skip
                print(f"{condition:<17} {name:<14} {threads[name]} threads  {median:6.2f} it/s "
                      f"(rounds: {', '.join(f'{r:.2f}' for r in rates[name])})", flush=True)  # fmt: skip
        finally:
            if competitor is not None:
                competitor.kill()
    print(f"\n{'condition':<17} {'setting':<14} {'threads':>7} {'it/s':>7} {'vs torch default':>17}")
    for row in rows:
        base = next(
            r["it/s"] for r in rows if r["condition"] == row["condition"] and r["setting"] == "torch default"
        )
        print(f"{row['condition']:<17} {row['setting']:<14} {row['threads']:>7} {row['it/s']:>7.2f} "
              f"{row['it/s'] / base:>16.2f}x")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu_threads.json").write_text(json.dumps({"cores": os.cpu_count(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
