"""Base alone vs base + refiner (SDXL's hand-over) at the same number of sampling steps, and the time cost.

A pixel-space class-conditional UNet (the base) is trained on the whole schedule; the refiner starts from the
base's weights and trains only on the low-noise end (``timestep_range`` ``(0, 1 - denoising_end)``). The
base alone then samples a ``steps``-step DDIM schedule; the pair samples the same schedule, the base down to
``denoising_end`` and the refiner the rest (one network call per step either way). A base trained for
the same total number of steps as base + refiner is the fair control. Quality is the Fréchet distance
between samples and held-out images, on 8x8 average-pooled pixels (lower is better), over the same classes
and seeds; and the mean absolute Laplacian (fine detail: residual noise raises it) against the held-out
images'.

    OMP_NUM_THREADS=1 python benchmarks/refiner.py --base-steps 400 --refiner-steps 200
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

sys.path.insert(0, str(Path(__file__).parent))
from micro_conditioning import make_model, train

from zoo.datamodules.captioned_images import CaptionedImageDataModule
from zoo.diffusion.refiner import generate_with_refiner


def features(images: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.adaptive_avg_pool2d(images.clamp(-1, 1), 8).flatten(1).double().numpy()


def high_frequency(images: torch.Tensor) -> float:
    """Mean absolute Laplacian of the images: residual noise and speckle raise it, blur lowers it."""
    kernel = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).expand(3, 1, 3, 3)
    return float(torch.nn.functional.conv2d(images.clamp(-1, 1), kernel, groups=3).abs().mean())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


def run(base_steps: int = 400, refiner_steps: int = 200, img_size: int = 16, batch_size: int = 32,
        samples_per_class: int = 20, steps: int = 25, denoising_end: float = 0.8, lr: float = 2e-3) -> dict:  # fmt: skip
    data = CaptionedImageDataModule(img_size=img_size, batch_size=batch_size, train_size=4000, val_size=1000)
    data.setup()
    held_out = torch.stack([data.val_set[i]["image"] for i in range(len(data.val_set))])
    real = features(held_out)
    labels = torch.arange(12).repeat_interleave(samples_per_class).tolist()

    def sample(fn) -> dict:
        start = time.perf_counter()
        images = torch.cat([fn(chunk) for chunk in torch.tensor(labels).split(60)])
        seconds = time.perf_counter() - start
        return {
            "frechet_distance": round(frechet_distance(features(images), real), 4),
            "high_frequency": round(high_frequency(images), 4),
            "sampling_seconds": round(seconds, 2),
        }

    torch.manual_seed(0)
    base = make_model(False, img_size)
    train_seconds = {"base": train(base, data, base_steps, lr, 0)}
    refiner = make_model(False, img_size)
    refiner.objective = dataclasses.replace(base.objective, timestep_range=[0.0, 1.0 - denoising_end])

    refiner.load_state_dict(base.state_dict())
    longer = copy.deepcopy(base)  # the control: the base trained for the refiner's steps as well
    train_seconds["refiner"] = train(refiner, data, refiner_steps, lr / 2, 1)
    train_seconds["base_longer"] = train(longer, data, refiner_steps, lr / 2, 1)
    for model in (base, refiner, longer):
        model.eval()
    results = {"base_steps": base_steps, "refiner_steps": refiner_steps, "sampling_steps": steps,
               "denoising_end": denoising_end, "samples": len(labels), "train_seconds": train_seconds,
               "held_out_high_frequency": round(high_frequency(held_out), 4)}  # fmt: skip
    cases = {
        "base_alone": lambda c: base.generate(labels=c.tolist(), steps=steps, seed=int(c[0])),
        "base_longer_alone": lambda c: longer.generate(labels=c.tolist(), steps=steps, seed=int(c[0])),
        "base_plus_refiner": lambda c: generate_with_refiner(
            base, refiner, denoising_end, labels=c.tolist(), steps=steps, seed=int(c[0])
        ),
        "base_longer_plus_refiner": lambda c: generate_with_refiner(
            longer, refiner, denoising_end, labels=c.tolist(), steps=steps, seed=int(c[0])
        ),
    }
    for name, fn in cases.items():
        results[name] = sample(fn)
        print(name, results[name], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-steps", type=int, default=400)
    parser.add_argument("--refiner-steps", type=int, default=200)
    parser.add_argument("--samples-per-class", type=int, default=20)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--denoising-end", type=float, default=0.8)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = run(args.base_steps, args.refiner_steps, samples_per_class=args.samples_per_class,
                  steps=args.steps, denoising_end=args.denoising_end)  # fmt: skip
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
