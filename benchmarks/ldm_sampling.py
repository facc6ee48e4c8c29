"""Is our sampling loop as fast as diffusers' pipeline, and is DPM-Solver++ at 20 steps as good as DDIM at 50?

1. Throughput: ``zoo.diffusion.sampling.sample`` and diffusers' ``DDIMPipeline`` run the *same*
   ``UNet2DModel`` and ``DDIMScheduler`` from the same seed; the runs alternate (ours, theirs, ours...)
   so drift on a shared machine hits both alike, and the outputs are checked to be equal. The figure is
   images/s of ours over theirs (the target is >= 0.95).
2. Conditional accuracy (with ``--ldm`` and ``--classifier`` checkpoints): the share of samples a vision
   classifier recognises as the requested class, DPM-Solver++ 20 steps vs DDIM 50 steps, same seed and
   guidance (``zoo.diffusion.evaluation``).

    python benchmarks/ldm_sampling.py                                  # throughput only, about a minute
    python benchmarks/ldm_sampling.py --ldm ldm.ckpt --classifier classifier.ckpt --samples-per-class 20

Prints a table and writes ``benchmarks/results/ldm_sampling.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

from zoo.diffusion.sampling import sample

RESULTS = Path(__file__).resolve().parent / "results" / "ldm_sampling.json"


def _unet(size: int) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    ).eval()


def throughput(size: int, batch: int, steps: int, repeats: int, device: str) -> dict:
    unet = _unet(size).to(device)
    pipeline = DDIMPipeline(unet=unet, scheduler=DDIMScheduler())
    pipeline.set_progress_bar_config(disable=True)
    ours_scheduler = DDIMScheduler()

    def theirs() -> torch.Tensor:
        generator = torch.Generator(device).manual_seed(0)
        return pipeline(
            batch_size=batch, generator=generator, num_inference_steps=steps, output_type="pt"
        ).images

    def ours() -> torch.Tensor:
        generator = torch.Generator(device).manual_seed(0)
        with torch.no_grad():
            latents = sample(
                lambda x, t: unet(x, t).sample,
                ours_scheduler,
                (batch, 3, size, size),
                steps,
                generator,
                device=device,
            )
        return (latents / 2 + 0.5).clamp(0, 1)

    max_difference = (ours() - theirs()).abs().max().item()  # also a warm-up of both
    times = {"ours": [], "diffusers": []}
    for _ in range(repeats):
        for name, fn in (("ours", ours), ("diffusers", theirs)):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    rate = {name: batch / statistics.median(t) for name, t in times.items()}
    return {
        "images_per_s_ours": rate["ours"],
        "images_per_s_diffusers": rate["diffusers"],
        "ratio": rate["ours"] / rate["diffusers"],
        "max_abs_difference": max_difference,
        "image_size": size,
        "batch_size": batch,
        "steps": steps,
        "repeats": repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--ldm", help="LatentDiffusion checkpoint (class-conditional) for the accuracy comparison"
    )
    parser.add_argument("--classifier", help="zoo.vision ImageClassifier checkpoint")
    parser.add_argument("--samples-per-class", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    args = parser.parse_args()

    result = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "throughput": throughput(args.image_size, args.batch_size, args.steps, args.repeats, args.device),
    }
    t = result["throughput"]
    print(f"\nsampling throughput, DDIM {t['steps']} steps, {t['batch_size']} images of {t['image_size']} px")
    print(f"{'':12s}{'images/s':>10s}")
    print(f"{'ours':12s}{t['images_per_s_ours']:10.2f}")
    print(f"{'diffusers':12s}{t['images_per_s_diffusers']:10.2f}")
    print(f"ratio ours/diffusers: {t['ratio']:.3f}   max |difference|: {t['max_abs_difference']:.2e}")

    if args.ldm and args.classifier:
        from zoo.diffusion.evaluation import conditional_accuracy, load_classifier, load_latent_diffusion

        model, classifier = load_latent_diffusion(args.ldm), load_classifier(args.classifier)
        runs = [("dpmsolver++", 20), ("ddim", 50)]
        result["accuracy"] = [
            conditional_accuracy(model, classifier, args.samples_per_class, name, steps, args.guidance)
            for name, steps in runs
        ]
        print(f"\nconditional accuracy, guidance {args.guidance}, {args.samples_per_class} samples per class")
        print(f"{'sampler':16s}{'steps':>6s}{'accuracy':>10s}{'worst class':>13s}{'seconds':>9s}")
        for r in result["accuracy"]:
            print(
                f"{r['sampler']:16s}{r['steps']:6d}{r['accuracy']:10.3f}{r['min_class_accuracy']:13.2f}{r['seconds']:9.0f}"
            )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
