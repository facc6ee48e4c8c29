"""Token-budget batches under DDP (two gloo processes): Lightning re-creates the batch sampler with its
DistributedSampler, and each rank trains on its own share of the same global plan."""

from __future__ import annotations

import json

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback

from zoo.datamodules.proteins import ProteinDataModule, TokenBudgetBatchSampler
from zoo.protein import ESM2MaskedLM

pytestmark = pytest.mark.distributed


class RecordBatches(Callback):
    def __init__(self, directory) -> None:
        self.directory = str(directory)
        self.seen: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(batch["ids"])

    def on_train_end(self, trainer, pl_module) -> None:
        sampler = trainer.train_dataloader.batch_sampler
        placement = sampler._placement() if isinstance(sampler, TokenBudgetBatchSampler) else None
        record = {"seen": self.seen, "placement": placement, "batches": len(sampler)}
        with open(f"{self.directory}/rank{trainer.global_rank}.json", "w") as f:
            json.dump(record, f)


def test_token_budget_batches_are_sharded_across_ddp_ranks(tmp_path):
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RecordBatches(tmp_path)],
        default_root_dir=tmp_path,
    )
    model = ESM2MaskedLM(model_kwargs={"num_layers": 1, "embed_dim": 16, "attention_heads": 2})
    trainer.fit(model, ProteinDataModule(max_tokens=1024, max_length=126))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["placement"][1:] for r in ranks] == [[0, 2], [1, 2]]  # rank, world from Lightning's sampler
    assert ranks[0]["batches"] == ranks[1]["batches"]
    ids = [{i for batch in r["seen"] for i in batch} for r in ranks]
    assert all(len(r["seen"]) == 4 for r in ranks) and not ids[0] & ids[1]
