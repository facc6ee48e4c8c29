"""Crop conditioning vs none: do samples at crop (0, 0) show the shape whole and centred more often?

Two pixel-space class-conditional UNets are trained the same number of steps on the same random crops of the
embedded shapes (``crop_scales``: each scene rendered at 1x or 2x, by default, and cropped back to ``img_size``),
one with SDXL-style micro-conditioning on original size and crop, one without. Each then draws the same
number of samples per class (same seed); the micro-conditioned one at its default, "uncropped, full size".
A sample's shape is its saturated pixels after a 3x3 mean (the backgrounds and clutter are grey-ish, the shapes
red, green or blue): it is *whole* when its bounding box touches no border, *centred* when its centroid lies within 0.2
of the side from the image centre.

    OMP_NUM_THREADS=1 python benchmarks/micro_conditioning.py --steps 600
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from zoo.datamodules.captioned_images import CaptionedImageDataModule
from zoo.diffusion import ClassConditioning, LatentDiffusion, SamplingConfig
from zoo.diffusion.micro_conditioning import MicroConditioning
from zoo.diffusion.schedules import DiffusionObjective

#: base.yaml's schedule: scaled-linear betas end far less noisy than linear ones, and min-SNR-5 weights, so that a
#: few hundred steps give recognisable shapes.
OBJECTIVE = DiffusionObjective(
    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, snr_gamma=5.0
)

UNET = {
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
    "attention_head_dim": 2,
}


def shape_statistics(images: torch.Tensor, saturation: float = 0.45, centred: float = 0.2) -> dict:
    """Share of images whose saturated foreground is whole / centred / both, and the mean centroid distance
    from the centre (fraction of the side). Images in [-1, 1]."""
    unit = (images.clamp(-1, 1) + 1) / 2
    # 3x3 mean first: a short-trained model leaves speckle of saturated pixels that is no shape
    unit = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(unit, (1, 1, 1, 1), mode="replicate"), 3, 1)
    mask = (unit.amax(1) - unit.amin(1)) > saturation  # (B, H, W)
    _, h, w = mask.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    area = mask.sum((1, 2)).float()
    found = area >= 4
    cy = (mask * ys).sum((1, 2)) / area.clamp(min=1)
    cx = (mask * xs).sum((1, 2)) / area.clamp(min=1)
    distance = torch.sqrt((cy - (h - 1) / 2) ** 2 + (cx - (w - 1) / 2) ** 2) / h
    border = mask[:, 0].any(1) | mask[:, -1].any(1) | mask[:, :, 0].any(1) | mask[:, :, -1].any(1)
    whole = found & ~border
    centre = found & (distance < centred)
    return {
        "whole": float(whole.float().mean()),
        "centred": float(centre.float().mean()),
        "whole_and_centred": float((whole & centre).float().mean()),
        "mean_centroid_distance": float(distance[found].mean()) if found.any() else float("nan"),
        "found": float(found.float().mean()),
    }


def make_model(micro: bool, img_size: int) -> LatentDiffusion:
    model = LatentDiffusion(
        autoencoder=None,
        img_size=img_size,
        model_kwargs=dict(UNET),
        conditioning=ClassConditioning(dim=32),
        num_classes=12,
        objective=OBJECTIVE,
        sampling=SamplingConfig(sampler="ddim", steps=25, guidance_scale=3.0),
        micro_conditioning=MicroConditioning(embed_dim=32) if micro else None,
    )
    model.configure_models()
    return model


def train(model: LatentDiffusion, data: CaptionedImageDataModule, steps: int, lr: float, seed: int) -> float:
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    model.train()
    done, start = 0, time.perf_counter()
    while done < steps:
        for batch in data.train_dataloader():
            loss = model.diffusion_loss(batch, dropout=model.conditioning.dropout, training=True)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            done += 1
            if done % 250 == 0:
                print(
                    f"  step {done}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)", flush=True
                )
            if done == steps:
                break
    return time.perf_counter() - start


def run(steps: int = 600, img_size: int = 16, batch_size: int = 32, samples_per_class: int = 8,
        lr: float = 2e-3, scales=(1.0, 2.0), seed: int = 0, save: str | None = None) -> dict:  # fmt: skip
    labels = torch.arange(12).repeat_interleave(samples_per_class).tolist()
    data = CaptionedImageDataModule(
        img_size=img_size,
        batch_size=batch_size,
        train_size=4000,
        val_size=max(256, len(labels)),  # the data's own rates are taken over as many images as samples
        crop_scales=list(scales),
    )
    data.setup()
    reference = {  # the data itself: uncropped scenes vs the random crops trained on
        "uncropped_data": shape_statistics(
            torch.stack([data.val_set[i]["image"] for i in range(len(labels))])
        ),
        "random_crop_data": shape_statistics(
            torch.stack([data.train_set[i]["image"] for i in range(len(labels))])
        ),
    }
    results = {
        "steps": steps,
        "img_size": img_size,
        "batch_size": batch_size,
        "samples": len(labels),
        **reference,
    }
    for name, micro in (("crop_conditioned", True), ("unconditioned", False)):
        torch.manual_seed(seed)
        model = make_model(micro, img_size)
        seconds = train(model, data, steps, lr, seed)
        model.eval()
        results[name] = {"train_seconds": round(seconds)}
        samples = {}
        for guidance in (1.0, 3.0):
            samples[guidance] = model.generate(labels=labels, seed=seed, guidance_scale=guidance)
            results[name][f"guidance_{guidance:g}"] = shape_statistics(samples[guidance])
        if micro:  # the same model told "a crop from the middle of a 2x scene"
            side = round(img_size * max(scales))
            off = (side - img_size) // 2
            cropped = model.generate(
                labels=labels,
                seed=seed,
                original_size=(side, side),
                crop_top_left=(0, off),
                guidance_scale=1.0,
            )
            results[f"crop_conditioned_at_crop_(0,{off})_of_{side}_guidance_1"] = shape_statistics(cropped)
            samples["cropped"] = cropped
        if save:
            torch.save({"state_dict": model.state_dict(), "samples": samples}, f"{save}_{name}.pt")
        print(name, json.dumps(results[name]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--img-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--samples-per-class", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--save", help="write each model's weights and samples to <save>_<model>.pt")
    args = parser.parse_args()
    results = run(
        args.steps,
        args.img_size,
        args.batch_size,
        args.samples_per_class,
        args.lr,
        args.scales,
        save=args.save,
    )
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
