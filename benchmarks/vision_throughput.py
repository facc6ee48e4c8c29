"""Training and inference images/s: ``ImageClassifier`` under ``Trainer`` vs a plain PyTorch loop.

Both sides use the same timm model (same initial weights), the same batches and the same
optimizer; they run alternately in one process, several rounds, and the median of each is
compared, because absolute times on a shared machine drift. Prints a table, writes JSON.

    python benchmarks/vision_throughput.py [--steps 30] [--rounds 3] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from zoo.vision import ImageClassifier

RESULTS = Path(__file__).resolve().parent / "results"


def make_batches(steps: int, batch_size: int) -> list[dict]:
    from zoo.datamodules import ShapesDataset

    data = ShapesDataset(steps * batch_size)
    items = [data[i] for i in range(len(data))]
    images = torch.stack([i["image"] for i in items])
    labels = torch.tensor([i["label"] for i in items])
    return [
        {"image": images[k : k + batch_size], "label": labels[k : k + batch_size]}
        for k in range(0, len(images), batch_size)
    ]


def optimizer_for(params):
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)


def plain_training(model: torch.nn.Module, batches: list[dict]) -> float:
    model.train()
    optimizer = optimizer_for(model.parameters())
    start = time.perf_counter()
    for batch in batches:
        loss = F.cross_entropy(model(batch["image"]), batch["label"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return sum(len(b["label"]) for b in batches) / (time.perf_counter() - start)


class _Timer(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.elapsed = time.perf_counter() - self.start


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, **kwargs,
    )  # fmt: skip


def lightning_training(module: ImageClassifier, batches: list[dict]) -> float:
    images = torch.cat([b["image"] for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    loader = DataLoader(TensorDataset(images, labels), batch_size=len(batches[0]["label"]), shuffle=False)
    loader.collate_fn = lambda items: {
        "image": torch.stack([i[0] for i in items]),
        "label": torch.stack([i[1] for i in items]),
    }
    timer = _Timer()
    _trainer(max_steps=len(batches), limit_val_batches=0, callbacks=[timer]).fit(module, loader)
    return len(images) / timer.elapsed


@torch.inference_mode()
def plain_inference(model: torch.nn.Module, batches: list[dict]) -> float:
    model.eval()
    start = time.perf_counter()
    for batch in batches:
        model(batch["image"])
    return sum(len(b["label"]) for b in batches) / (time.perf_counter() - start)


def lightning_inference(module: ImageClassifier, batches: list[dict]) -> float:
    start = time.perf_counter()
    _trainer().predict(module, DataLoader([{"image": b["image"]} for b in batches], batch_size=None))
    return sum(len(b["label"]) for b in batches) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-name", default="deit_tiny_patch16_224")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    torch.manual_seed(0)
    batches = make_batches(args.steps, args.batch_size)
    template = ImageClassifier(
        model_name=args.model_name, patch_size=8, stem="conv", optimizer=optimizer_for, lr_scheduler=None
    )
    template.predict_step = lambda batch, batch_idx: template(batch["image"])  # same work as the plain loop
    samples: dict[str, list[float]] = {
        k: [] for k in ("plain_train", "zoo_train", "plain_infer", "zoo_infer")
    }
    plain_training(copy.deepcopy(template.model), batches[:3])  # warm-up: allocator, thread pools
    for _ in range(args.rounds):
        samples["plain_train"].append(plain_training(copy.deepcopy(template.model), batches))
        samples["zoo_train"].append(lightning_training(copy.deepcopy(template), batches))
        samples["plain_infer"].append(plain_inference(template.model, batches))
        samples["zoo_infer"].append(lightning_inference(template, batches))
    median = {k: statistics.median(v) for k, v in samples.items()}
    result = {
        "model": args.model_name, "batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds,
        "threads": torch.get_num_threads(), "images_per_second": median, "samples": samples,
        "train_ratio": median["zoo_train"] / median["plain_train"],
        "inference_ratio": median["zoo_infer"] / median["plain_infer"],
    }  # fmt: skip
    print(f"{'':22}{'plain PyTorch':>15}{'zoo + Trainer':>15}{'ratio':>8}")
    for kind in ("train", "infer"):
        plain, ours = median[f"plain_{kind}"], median[f"zoo_{kind}"]
        print(f"{kind + ' images/s':22}{plain:15.1f}{ours:15.1f}{ours / plain:8.3f}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "vision_throughput.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
