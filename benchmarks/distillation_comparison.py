"""Does distillation help at equal epochs? A DeiT student without a teacher, with ``soft`` and with ``deit``.

A teacher (DeiT-Ti width, ``--teacher-depth`` blocks, conv stem, 8 px tokens) trains on the embedded shapes;
then students of the same, smaller shape train for the same number of epochs on the same data and seed: without
distillation (labels only), with ``zoo.callbacks.Distillation(mode="soft")`` and with ``mode="deit"`` (a
distillation-token student whose second head learns from the teacher's hard labels). Each is scored on the
validation images: accuracy, and agreement with the teacher (the share of images where the student's
prediction equals the teacher's). Optional ``--feature-layers`` adds intermediate-feature distillation.

    python benchmarks/distillation_comparison.py                       # about 10 minutes on 2 shared cores
    python benchmarks/distillation_comparison.py --modes none soft hard deit --epochs 6

Prints a table and writes ``benchmarks/results/distillation_comparison.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import lightning as L
import torch

from zoo.callbacks import Distillation
from zoo.datamodules import ImageClassificationDataModule
from zoo.vision import ImageClassifier

RESULTS = Path(__file__).resolve().parent / "results" / "distillation_comparison.json"


def make_model(depth: int, dim: int, heads: int, distilled: bool = False) -> ImageClassifier:
    name = "deit_tiny_distilled_patch16_224" if distilled else "deit_tiny_patch16_224"
    return ImageClassifier(
        model_name=name,
        patch_size=8,
        stem="conv",
        model_kwargs={"depth": depth, "embed_dim": dim, "num_heads": heads},
    )


def fit(model: ImageClassifier, data, epochs: int, callbacks=(), root: Path | None = None) -> float:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root,
        callbacks=list(callbacks),
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    return time.perf_counter() - start


@torch.no_grad()
def predictions(
    model: ImageClassifier, data: ImageClassificationDataModule
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true classes on the validation images (distilled DeiT: the mean of its two heads)."""
    model.eval()
    data.setup("validate")
    preds, labels = [], []
    for batch in data.val_dataloader():
        preds.append(model(batch["image"]).argmax(-1))
        labels.append(batch["label"])
    return torch.cat(preds), torch.cat(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["none", "soft", "deit"], help="none soft hard deit")
    parser.add_argument("--train-size", type=int, default=3072)
    parser.add_argument("--val-size", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--teacher-epochs", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=4, help="epochs of every student")
    parser.add_argument("--teacher-depth", type=int, default=4)
    parser.add_argument("--teacher-dim", type=int, default=96)
    parser.add_argument("--student-depth", type=int, default=2)
    parser.add_argument("--student-dim", type=int, default=96)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--feature-layers", nargs="*", default=None, help="e.g. model.blocks.1=model.blocks.3"
    )
    parser.add_argument("--feature-weight", type=float, default=1.0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    def data() -> ImageClassificationDataModule:
        return ImageClassificationDataModule(
            train_size=args.train_size, val_size=args.val_size, batch_size=args.batch_size
        )

    L.seed_everything(0, verbose=False)
    teacher = make_model(args.teacher_depth, args.teacher_dim, args.heads)
    teacher_seconds = fit(teacher, data(), args.teacher_epochs)
    teacher_pred, labels = predictions(teacher, data())
    rows = [
        {
            "model": f"teacher ({args.teacher_depth} blocks)",
            "mode": "-",
            "epochs": args.teacher_epochs,
            "val_acc": float((teacher_pred == labels).float().mean()),
            "agreement_with_teacher": 1.0,
            "train_seconds": teacher_seconds,
            "parameters": sum(p.numel() for p in teacher.parameters()),
        }
    ]
    features = None
    if args.feature_layers:
        features = dict(pair.split("=", 1) for pair in args.feature_layers)
    for mode in args.modes:
        L.seed_everything(0, verbose=False)  # same initial student weights and data order for every mode
        student = make_model(args.student_depth, args.student_dim, args.heads, distilled=mode == "deit")
        callbacks = []
        if mode != "none":
            callbacks.append(
                Distillation(
                    teacher=teacher,
                    mode=mode,
                    alpha=args.alpha,
                    temperature=args.temperature,
                    feature_layers=features,
                    feature_weight=args.feature_weight,
                )
            )
        seconds = fit(student, data(), args.epochs, callbacks)
        pred, _ = predictions(student, data())
        rows.append(
            {
                "model": f"student ({args.student_depth} blocks{', dist token' if mode == 'deit' else ''})",
                "mode": mode + ("+features" if features and mode != "none" else ""),
                "epochs": args.epochs,
                "val_acc": float((pred == labels).float().mean()),
                "agreement_with_teacher": float((pred == teacher_pred).float().mean()),
                "train_seconds": seconds,
                "parameters": sum(p.numel() for p in student.parameters()),
            }
        )
        print(rows[-1], flush=True)

    print(
        f"\nembedded shapes, {args.train_size} train / {args.val_size} val images, batch {args.batch_size}, "
        f"alpha {args.alpha}, T {args.temperature}"
    )
    print(f"{'model':<30}{'mode':<16}{'epochs':>7}{'val acc':>9}{'agree':>8}{'train s':>9}{'params':>10}")
    for r in rows:
        print(
            f"{r['model']:<30}{r['mode']:<16}{r['epochs']:>7}{100 * r['val_acc']:>8.1f}%"
            f"{100 * r['agreement_with_teacher']:>7.1f}%{r['train_seconds']:>9.0f}{r['parameters']:>10,}"
        )
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"written: {args.output}")


if __name__ == "__main__":
    main()
