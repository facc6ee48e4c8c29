"""A distilled student learns its teacher's function: >= 95% agreement on the validation images."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch

from zoo.callbacks import Distillation
from zoo.datamodules import ImageClassificationDataModule
from zoo.optim import WarmupCosineLR
from zoo.vision import ImageClassifier


def _resnet10t(channels: tuple[int, ...]) -> ImageClassifier:
    return ImageClassifier(
        model_name="resnet10t",
        model_kwargs={"channels": channels},
        optimizer=partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.05),
        lr_scheduler=partial(WarmupCosineLR, warmup_steps=0.05),
    )


@torch.no_grad()
def _agreement(teacher: ImageClassifier, student: ImageClassifier, data) -> float:
    teacher.eval(), student.eval()
    same = total = 0
    for batch in data.val_dataloader():
        same += (teacher(batch["image"]).argmax(1) == student(batch["image"]).argmax(1)).sum().item()
        total += len(batch["image"])
    return same / total


@pytest.mark.slow
def test_soft_distilled_student_agrees_with_its_teacher(make_trainer):
    """A ResNet-10t teacher (4.9M parameters, 4 epochs) teaches a student 4x narrower (14x fewer parameters).

    With ``alpha=1`` the student's loss is the temperature-scaled KL to the teacher alone: the labels never
    reach it, so everything it gets right it learnt from the teacher. About 100 s on 2 cores.
    """
    L.seed_everything(0)
    data = ImageClassificationDataModule(batch_size=64, train_size=7680)
    teacher = _resnet10t((64, 128, 256, 512))
    make_trainer(max_epochs=4, limit_val_batches=0, deterministic=False).fit(teacher, data)

    L.seed_everything(0)
    student = _resnet10t((16, 32, 64, 128))
    assert 10 * sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    distillation = Distillation(teacher=teacher, mode="soft", alpha=1.0, temperature=2.0)
    make_trainer(max_epochs=3, limit_val_batches=0, deterministic=False, callbacks=[distillation]).fit(
        student, data
    )

    assert _agreement(teacher, student, data) >= 0.95
