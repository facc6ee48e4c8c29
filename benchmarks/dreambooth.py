"""DreamBooth on the embedded shapes: instance fidelity, and language drift with and without prior preservation.

A small pixel-space class-conditional UNet (16 px, the base) is trained on the shapes, and a judge (ResNet-10t,
the vision family's classifier) on the same 16 px images; both are cached under ``benchmarks/results/``, so a
second run only fine-tunes. The instance is 5 pictures of a *yellow* circle (``InstanceImageDataModule``: no
shapes split has yellow), bound to a new class id. Two DreamBooth runs of the same steps from the same base,
the full model trained, one with prior preservation (class images of the red, green and blue circles, drawn by
the frozen base before training, weight 1), one without. Then, each at DDIM 25 steps, guidance 3:

- instance fidelity: share of samples for the identifier whose foreground is yellow (the judge has no yellow
  class: the colour is a statistic of the saturated pixels, ``dominant_colour``) and that the judge calls a
  circle once the shape is painted red (``recoloured``; its 12 classes summed over colours). The same measure
  on 48 real pictures of the instance is the ceiling (``reference``);
- language drift: the judge's class accuracy on samples of the plain class (the red, green and blue circles,
  ``plain_samples`` each), for the base and after each run; prior preservation should keep the drop within
  5 points. The accuracy over all 12 classes is reported beside it (the other classes get no class images).

    OMP_NUM_THREADS=1 python benchmarks/dreambooth.py --steps 400 --json dreambooth.json
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch

from zoo.datamodules.captioned_images import CaptionedImageDataModule
from zoo.datamodules.images import ImageClassificationDataModule
from zoo.datamodules.instance_images import InstanceImageDataModule, instance_images
from zoo.datamodules.shapes import COLOURS, NOVEL_COLOURS, SHAPES
from zoo.diffusion import ClassConditioning, DiffusionObjective, LatentDiffusion, SamplingConfig
from zoo.diffusion.dreambooth import DreamBooth, PriorPreservation
from zoo.diffusion.evaluation import conditional_accuracy
from zoo.optim import WarmupCosineLR
from zoo.vision import ImageClassifier

RESULTS = Path(__file__).parent / "results"
#: The red, green and blue circle: the plain class of a yellow circle (the identifier starts at their mean, and
#: prior preservation draws them).
PLAIN_CLASS = (0, 1, 2)
IMG_SIZE = 16
#: base.yaml's schedule (scaled-linear betas, min-SNR-5), which gives recognisable shapes in a few hundred steps.
OBJECTIVE = DiffusionObjective(
    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, snr_gamma=5.0
)
SAMPLING = SamplingConfig(sampler="ddim", steps=25, guidance_scale=3.0)
UNET = {
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "norm_num_groups": 8,
    "attention_head_dim": 4,
}


def trainer(root: Path, steps: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root,
    )


def base_checkpoint(conditioning, name: str, steps: int, lr: float = 2e-3) -> Path:
    """A pixel-space 16 px UNet trained ``steps`` steps on the shapes (batch 32), cached by name and steps."""
    path = RESULTS / f"{name}_{steps}.ckpt"
    if path.is_file():
        return path
    torch.manual_seed(0)
    model = LatentDiffusion(
        autoencoder=None,
        img_size=IMG_SIZE,
        model_kwargs=dict(UNET),
        conditioning=conditioning,
        objective=OBJECTIVE,
        sampling=SAMPLING,
        optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=0.01),
        lr_scheduler=partial(WarmupCosineLR, warmup_steps=50),
        **_links(CaptionedImageDataModule(img_size=IMG_SIZE)),
    )
    start = time.perf_counter()
    fit = trainer(RESULTS, steps)
    fit.fit(model, CaptionedImageDataModule(img_size=IMG_SIZE, batch_size=32, val_size=32))
    print(f"base {name}: {steps} steps in {time.perf_counter() - start:.0f} s", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    fit.save_checkpoint(path)
    return path


def _links(data: CaptionedImageDataModule) -> dict:
    return {"num_classes": data.num_classes, "caption_vocabulary": data.caption_vocabulary}


def judge(epochs: int = 4) -> ImageClassifier:
    """ResNet-10t on the 16 px shapes (the judge of the family's figures, at this size), cached."""
    path = RESULTS / f"judge_resnet10t_{IMG_SIZE}px.ckpt"
    if not path.is_file():
        torch.manual_seed(0)
        classifier = ImageClassifier(
            model_name="resnet10t",
            img_size=IMG_SIZE,
            patch_size=None,
            optimizer=partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.05),
            lr_scheduler=partial(WarmupCosineLR, warmup_steps=0.05),
        )
        data = ImageClassificationDataModule(img_size=IMG_SIZE, batch_size=64, train_size=3840, val_size=512)
        fit = L.Trainer(
            accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        )  # fmt: skip
        fit.fit(classifier, data)
        print(f"judge: {fit.validate(classifier, data, verbose=False)}", flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        fit.save_checkpoint(path)
    return ImageClassifier.load_from_checkpoint(path, map_location="cpu").eval()


#: The palette the colour statistic chooses from: the shapes' colours and the novel ones.
PALETTE = {**COLOURS, **NOVEL_COLOURS}


def dominant_colour(images: torch.Tensor, saturation: float = 0.35) -> list[str | None]:
    """The palette colour nearest the mean of each image's saturated pixels (the shape: backgrounds and clutter
    are grey-ish), or ``None`` where fewer than 4 pixels are saturated. Images in [-1, 1]."""
    unit = (images.clamp(-1, 1) + 1) / 2
    mask = (unit.amax(1) - unit.amin(1)) > saturation  # (B, H, W)
    names = list(PALETTE)
    palette = torch.tensor([PALETTE[n] for n in names], dtype=torch.float32) / 255
    found = []
    for image, foreground in zip(unit, mask):
        if foreground.sum() < 4:
            found.append(None)
            continue
        mean = image[:, foreground].mean(1)
        found.append(names[int(((palette - mean) ** 2).sum(1).argmin())])
    return found


def recoloured(images: torch.Tensor, colour: str = "red", saturation: float = 0.35) -> torch.Tensor:
    """``images`` with their saturated pixels (the shape) painted ``colour``: the judge never saw yellow and
    calls only 48% of real yellow circles circles, but 100% of them once painted red (87-100% for the other
    shapes), so shapes are judged in a colour it knows."""
    unit = (images.clamp(-1, 1) + 1) / 2
    mask = ((unit.amax(1) - unit.amin(1)) > saturation)[:, None]
    paint = torch.tensor(PALETTE[colour], dtype=torch.float32).view(1, 3, 1, 1) / 127.5 - 1
    return torch.where(mask, paint.to(images).expand_as(images), images)


@torch.no_grad()
def concept_share(images: torch.Tensor, classifier, shape: str, colour: str) -> dict:
    """Share of ``images`` in ``colour`` / whose shape the judge recognises as ``shape`` (``recoloured``) /
    both (the concept)."""
    colours = dominant_colour(images)
    shapes = classifier(recoloured(images)).argmax(-1).div(len(COLOURS), rounding_mode="floor")
    right_colour = torch.tensor([c == colour for c in colours])
    right_shape = shapes.cpu() == SHAPES.index(shape)
    return {
        "colour": float(right_colour.float().mean()),
        "shape": float(right_shape.float().mean()),
        "concept": float((right_colour & right_shape).float().mean()),
        "colours_seen": {str(c): colours.count(c) for c in set(colours)},
    }


def reference(classifier, shape: str, colour: str, n: int) -> dict:
    """``concept_share`` of ``n`` real pictures of the concept (drawn with another seed than the training ones)."""
    return concept_share(instance_images(n, shape, colour, IMG_SIZE, seed=1), classifier, shape, colour)


@torch.no_grad()
def class_accuracy(model, classifier, labels: list[int], seed: int = 0) -> float:
    """Share of samples of ``labels`` that the judge recognises as their class."""
    wanted = torch.tensor(labels)
    correct = 0
    for i, chunk in enumerate(wanted.split(120)):
        images = model.generate(labels=chunk.tolist(), seed=seed + i)
        correct += int((classifier(images).argmax(-1).cpu() == chunk).sum())
    return correct / len(labels)


def dreambooth(base: Path, prior: bool, steps: int, lr: float, prior_images: int) -> DreamBooth:
    """The DreamBooth recipe (``configs/diffusion/dreambooth.yaml``'s) on the instance, from ``base``."""
    torch.manual_seed(0)
    model = DreamBooth(
        base_checkpoint=str(base),
        class_labels=list(PLAIN_CLASS),
        prior=PriorPreservation(num_images=prior_images, weight=1.0, cache_dir=str(RESULTS / "class_images"))
        if prior
        else None,
        autoencoder=None,
        img_size=IMG_SIZE,
        model_kwargs=dict(UNET),
        conditioning=ClassConditioning(dim=32),
        num_classes=12,
        objective=OBJECTIVE,
        sampling=SAMPLING,
        optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=0.0),
        lr_scheduler=None,
    )
    data = InstanceImageDataModule(img_size=IMG_SIZE, batch_size=4, num_images=5)
    if steps:
        start = time.perf_counter()
        trainer(RESULTS, steps).fit(model, data)
        print(f"dreambooth prior={prior}: {steps} steps in {time.perf_counter() - start:.0f} s", flush=True)
    return model.eval()


def run(steps: int = 400, base_steps: int = 800, lr: float = 1e-4, samples_per_class: int = 10,
        plain_samples: int = 40, instance_samples: int = 48, prior_images: int = 96) -> dict:  # fmt: skip
    classifier = judge()
    base = base_checkpoint(ClassConditioning(dim=32), "dreambooth_base", base_steps)
    start_model = LatentDiffusion.load_from_checkpoint(base, map_location="cpu").eval()

    def accuracy(model) -> dict:
        """The judge's accuracy on the plain class (the circles, ``plain_samples`` each) and on all 12 classes
        (``samples_per_class`` each), the same seeds for every model."""
        plain = class_accuracy(model, classifier, [c for c in PLAIN_CLASS for _ in range(plain_samples)])
        every = conditional_accuracy(model, classifier, samples_per_class, "ddim", 25, 3.0)["accuracy"]
        return {"plain_class_accuracy": round(plain, 4), "all_classes_accuracy": round(every, 4)}

    results = {"steps": steps, "base_steps": base_steps, "lr": lr, "base": accuracy(start_model)}  # fmt: skip
    results["instance_images"] = reference(classifier, "circle", "yellow", instance_samples)
    untrained = dreambooth(base, False, 0, lr, prior_images)  # the identifier as it starts: the circles' mean
    samples = untrained.generate(labels=[untrained.identifier_label] * instance_samples, seed=0)
    results["base"]["instance"] = concept_share(samples, classifier, "circle", "yellow")
    print("base", results["base"], flush=True)
    for prior in (True, False):
        model = dreambooth(base, prior, steps, lr, prior_images)
        name = "with_prior" if prior else "without_prior"
        samples = model.generate(labels=[model.identifier_label] * instance_samples, seed=0)
        fidelity = concept_share(samples, classifier, "circle", "yellow")
        results[name] = {"instance": fidelity, **accuracy(model)}
        for kind in ("plain_class", "all_classes"):
            drop = results["base"][f"{kind}_accuracy"] - results[name][f"{kind}_accuracy"]
            results[name][f"{kind}_drop_points"] = round(100 * drop, 1)
        print(name, results[name], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="DreamBooth steps")
    parser.add_argument("--base-steps", type=int, default=800)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument(
        "--samples-per-class", type=int, default=10, help="all-class accuracy: samples per class"
    )
    parser.add_argument(
        "--plain-samples", type=int, default=40, help="plain-class accuracy: samples per circle"
    )
    parser.add_argument(
        "--prepare", action="store_true", help="only train (and cache) the base and the judge"
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.prepare:
        judge()
        base_checkpoint(ClassConditioning(dim=32), "dreambooth_base", args.base_steps)
        return
    results = run(args.steps, args.base_steps, args.lr, args.samples_per_class, args.plain_samples)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
