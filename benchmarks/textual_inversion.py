"""Textual inversion on the embedded shapes: does a prompt with the learned word show the concept more often than
the same prompt with the word it started from?

A small pixel-space caption-conditioned UNet (16 px, captions through a jointly trained 2-layer transformer) is
trained on the shapes and cached under ``benchmarks/results/`` with the judge (``benchmarks/dreambooth.py``'s
helpers). The concept is 5 pictures of one shape in one colour (by default a yellow circle: no shapes split has
yellow), captioned "a medium sks in the centre"; ``sks`` starts at the initialiser's embedding ("circle") and only
its row trains. Samples (DDIM 25 steps, guidance 3) of "a medium sks in the centre" and of "a medium circle in the
centre" are then judged: the colour of their saturated pixels (``dominant_colour``) and the judge's shape (painted
red first, ``recoloured``), against the same measure on real pictures of the concept (``reference``).

    OMP_NUM_THREADS=1 python benchmarks/textual_inversion.py --steps 400 --json textual_inversion.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from dreambooth import (
    IMG_SIZE,
    OBJECTIVE,
    RESULTS,
    SAMPLING,
    UNET,
    base_checkpoint,
    concept_share,
    judge,
    reference,
    trainer,
)

from zoo.datamodules.instance_images import InstanceImageDataModule
from zoo.diffusion import CaptionConditioning, TextualInversion

CONDITIONING = CaptionConditioning(dim=32, layers=2, heads=2, max_length=12)
PROMPT = "a medium {} in the centre"


def invert(base: Path, shape: str, colour: str, steps: int, lr: float, num_vectors: int) -> TextualInversion:
    """The textual-inversion recipe (``configs/diffusion/textual_inversion.yaml``'s) on the concept."""
    torch.manual_seed(0)
    model = TextualInversion(
        base_checkpoint=str(base),
        placeholder_token="sks",
        initializer_token=shape,
        num_vectors=num_vectors,
        autoencoder=None,
        img_size=IMG_SIZE,
        model_kwargs=dict(UNET),
        conditioning=CONDITIONING,
        objective=OBJECTIVE,
        sampling=SAMPLING,
        optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=0.0),
        lr_scheduler=None,
    )
    data = InstanceImageDataModule(img_size=IMG_SIZE, batch_size=4, num_images=5, shape=shape, colour=colour,
                                   caption=PROMPT)  # fmt: skip
    start = time.perf_counter()
    trainer(RESULTS, steps).fit(model, data)
    print(f"textual inversion: {steps} steps in {time.perf_counter() - start:.0f} s", flush=True)
    return model.eval()


def run(steps: int = 400, base_steps: int = 1000, lr: float = 5e-3, samples: int = 96, shape: str = "circle",
        colour: str = "yellow", num_vectors: int = 1) -> dict:  # fmt: skip
    classifier = judge()
    base = base_checkpoint(CONDITIONING, "textual_inversion_base", base_steps)
    model = invert(base, shape, colour, steps, lr, num_vectors)
    results = {"steps": steps, "base_steps": base_steps, "lr": lr, "concept": f"{colour} {shape}",
               "num_vectors": num_vectors, "samples": samples}  # fmt: skip
    results["instance_images"] = reference(classifier, shape, colour, samples)
    for word in ("sks", shape):
        caption = PROMPT.format(word)
        images = model.generate(captions=[caption] * samples, seed=0)
        results[caption] = concept_share(images, classifier, shape, colour)
        print(caption, results[caption], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="textual-inversion steps")
    parser.add_argument("--base-steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--shape", default="circle")
    parser.add_argument("--colour", default="yellow")
    parser.add_argument("--num-vectors", type=int, default=1)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = run(
        args.steps, args.base_steps, args.lr, args.samples, args.shape, args.colour, args.num_vectors
    )
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
