"""How does BEVFormer's encoder scale with the BEV grid and the number of cameras, and what does deformable
spatial cross-attention save over dense attention at the same size?

One BEVFormer-tiny encoder layer (256-d, 8 heads, FFN 512, 4 heights per pillar, temporal self-attention over
an aligned previous BEV, spatial cross-attention, FFN) runs forward on image features of tiny's shape (C5 of
480 x 800 images: 15 x 25 tokens per camera, 256-d), batch 1, for BEV grids 50, 100, 200 and 1, 3 or 6
cameras of the nuScenes rig, with deformable cross-attention (BEVFormer's) or dense multi-head attention
from every BEV query to every image token. Each configuration runs in its own process: latency is the median
of ``--repeats`` forwards after a warm-up; peak memory is the growth of the process's peak RSS during the
forwards (CPU), or ``torch.cuda.max_memory_allocated`` (GPU).

    python benchmarks/bev_scaling.py                  # ~15 minutes on 2 contended cores
    python benchmarks/bev_scaling.py --grids 50 100 --cameras 6 --repeats 5
    python benchmarks/bev_scaling.py --grids 50 --cameras 6 --features 30x50 60x100   # larger image features

With tiny's small C5 map (375 tokens a camera) the BEV-sized work (temporal attention, FFN) dominates and dense
attention to 2,250 keys is no dearer than deformable sampling; the gap opens as the image features grow
(``--features``), since dense cost grows with queries x image tokens and deformable cost does not.

Prints a table, writes ``benchmarks/results/bev_scaling.json`` and a plot ``bev_scaling.png`` (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bev_scaling.json"
FEATURES = (15, 25)  # tiny: C5 of 480 x 800
IMAGE = (480, 800)
RANGE = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)


def measure(
    grid: int,
    cameras: int,
    attention: str,
    repeats: int,
    threads: int,
    device: str,
    features: tuple[int, int] = FEATURES,
) -> dict:
    import torch

    from zoo.bev.encoder import BEVEncoder
    from zoo.datamodules.bev_scenes import CAMERA_NAMES, nuscenes_rig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    encoder = BEVEncoder(
        1, grid, grid, RANGE, 4, embed_dims=256, num_heads=8, ffn_dims=512, num_levels=1, sca_points=8,
        tsa_points=4, cross_attention=attention, dropout=0.0,
    ).to(device).eval()  # fmt: skip
    rig = nuscenes_rig(IMAGE, CAMERA_NAMES[:cameras])
    lidar2img = torch.from_numpy(rig.lidar2img).float()[None].to(device)
    tokens = features[0] * features[1]
    feats = torch.randn(1, cameras, tokens, 256, device=device)
    query, pos, prev = (torch.randn(1, grid * grid, 256, device=device) for _ in range(3))
    can_bus = torch.zeros(1, 18, device=device)
    can_bus[0, :2] = torch.tensor([1.0, 0.5])
    can_bus[0, 17] = 2.0
    prev_exists = torch.ones(1, dtype=torch.bool, device=device)

    def forward():
        with torch.no_grad():
            encoder(query, pos, feats, [features], lidar2img, IMAGE, can_bus, prev, prev_exists)
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    forward()  # warm-up; its peak is the memory a forward needs beyond the inputs (a fresh process)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, 0)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward()
        times.append(time.perf_counter() - start)
    return {
        "grid": grid,
        "cameras": cameras,
        "attention": attention,
        "features": list(features),
        "latency_ms": 1000 * statistics.median(times),
        "peak_mb": peak / 2**20,
    }


def _run(args: tuple) -> dict:
    return measure(*args)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for attention, style in (("deformable", "-o"), ("dense", "--s")):
        for cameras in sorted({r["cameras"] for r in results}):
            rows = sorted(
                (r for r in results if r["attention"] == attention and r["cameras"] == cameras),
                key=lambda r: r["grid"],
            )
            if not rows:
                continue
            label = f"{attention}, {cameras} cam"
            axes[0].plot([r["grid"] for r in rows], [r["latency_ms"] for r in rows], style, label=label)
            axes[1].plot([r["grid"] for r in rows], [r["peak_mb"] for r in rows], style, label=label)
    for ax, title in zip(axes, ("forward latency (ms)", "peak memory of a forward (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("BEV grid side (queries = side^2)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("One BEVFormer-tiny encoder layer, batch 1")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grids", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--cameras", type=int, nargs="+", default=[1, 3, 6])
    parser.add_argument("--attention", nargs="+", default=["deformable", "dense"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument(
        "--features",
        nargs="+",
        default=["15x25"],
        help="per-camera feature maps HxW (tiny's C5: 15x25; C4: 30x50)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in f.lower().split("x")) for f in args.features]
    jobs = [
        (grid, cameras, attention, args.repeats, args.threads, args.device, size)
        for size in sizes
        for attention in args.attention
        for cameras in args.cameras
        for grid in args.grids
    ]
    context = mp.get_context("spawn")
    results = []
    print(f"{'features':>8} {'attention':<11} {'cams':>4} {'grid':>5} {'latency ms':>11} {'peak MiB':>9}")
    for job in jobs:
        with context.Pool(1) as pool:  # a fresh process per configuration: clean peak-memory figures
            row = pool.apply(_run, (job,))
        results.append(row)
        print(
            f"{'x'.join(map(str, row['features'])):>8} {row['attention']:<11} {row['cameras']:>4} {row['grid']:>5} {row['latency_ms']:>11.1f} {row['peak_mb']:>9.1f}"
        )
    ratios = []
    for row in results:
        if row["attention"] != "deformable":
            continue
        dense = [
            r
            for r in results
            if r["attention"] == "dense"
            and (r["grid"], r["cameras"], r["features"]) == (row["grid"], row["cameras"], row["features"])
        ]
        if dense:
            ratios.append({
                "grid": row["grid"], "cameras": row["cameras"], "features": row["features"],
                "dense_over_deformable_latency": dense[0]["latency_ms"] / row["latency_ms"],
                "dense_over_deformable_memory": dense[0]["peak_mb"] / max(row["peak_mb"], 1e-6),
            })  # fmt: skip
    if ratios:
        print("\ndense / deformable at the same size")
        for r in ratios:
            print(f"  {'x'.join(map(str, r['features']))} features, grid {r['grid']:>3}, {r['cameras']} cam: latency x{r['dense_over_deformable_latency']:.2f}, "
                  f"memory x{r['dense_over_deformable_memory']:.2f}")  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "question": "BEV encoder layer forward cost vs grid and cameras; deformable vs dense cross-attention",
        "setup": {
            "layer": "BEVFormer-tiny encoder layer",
            "features": [list(f) for f in sizes],
            "batch": 1,
            "device": args.device,
            "threads": args.threads,
            "repeats": args.repeats,
            "machine": platform.platform(),
            "note": "CPU figures measured on a shared machine: compare ratios within one run",
        },
        "results": results,
        "ratios": ratios,
    }
    args.output.write_text(json.dumps(payload, indent=2))
    try:
        plot([r for r in results if tuple(r["features"]) == sizes[0]], args.output.with_suffix(".png"))
        print(f"\nwrote {args.output} and {args.output.with_suffix('.png')}")
    except ImportError:
        print(f"\nwrote {args.output} (install matplotlib for the plot)")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
