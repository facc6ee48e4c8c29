"""Task batches under DDP (two gloo processes): Lightning re-creates the task sampler with its DistributedSampler;
the ranks train on different batches but, at every step, of the same task, and log the same metric names."""

from __future__ import annotations

import json

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback

from zoo.datamodules.multitask import MultitaskDataModule
from zoo.multitask import MultitaskModule

pytestmark = pytest.mark.distributed


class RecordSteps(Callback):
    """Each rank writes the tasks (and an input fingerprint) of its training steps and its logged metrics."""

    def __init__(self, directory) -> None:
        self.directory = str(directory)
        self.steps: list[dict[str, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append({task: int(b["input_ids"].sum()) for task, b in batch.items() if b is not None})

    def on_train_end(self, trainer, pl_module) -> None:
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
        with open(f"{self.directory}/rank{trainer.global_rank}.json", "w") as f:
            json.dump({"steps": self.steps, "metrics": metrics}, f)


@pytest.mark.parametrize("mode", ["min_size", "round_robin"])
def test_ranks_run_the_same_task_at_every_step(mode, tmp_path):
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        # one task a step leaves the other tasks' parameters without gradients
        strategy="ddp_spawn_find_unused_parameters_true" if mode == "round_robin" else "ddp_spawn",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RecordSteps(tmp_path)],
        default_root_dir=tmp_path,
    )
    data = MultitaskDataModule(mode=mode, train_size=64, val_size=16, test_size=16, batch_size=16)
    trainer.fit(MultitaskModule(data.vocab_size, data.tasks, model_name="multitask_tiny"), data)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    steps = [r["steps"] for r in ranks]
    assert [list(step) for step in steps[0]] == [list(step) for step in steps[1]]
    assert (
        len(steps[0]) == (2 if mode == "min_size" else 6) and steps[0] != steps[1]
    )  # the same tasks, other data
    # one validation batch of each task: rank 1 repeats it, so both ranks evaluate every task
    names = [{name for name in r["metrics"] if name.startswith("val/")} for r in ranks]
    assert (
        names[0] == names[1]
        and {"val/wellformed/acc", "val/roles/token_acc", "val/value/exact_match"} <= names[0]
    )
    assert ranks[0]["metrics"]["val/score"] == pytest.approx(ranks[1]["metrics"]["val/score"])
