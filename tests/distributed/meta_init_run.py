"""Builds an ESM-2 with its parameters on the meta device and validates it under FSDP2 on 2 CPU processes.

    python meta_init_run.py OUT SIZE

Every rank writes ``OUT/rank<R>.json``: the bytes of the parameters it holds (its shards), the bytes of
the whole model, whether any tensor is still on the meta device, the validation loss and its peak RSS.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.distributed.train_run import ProteinSet
from zoo.protein import ESM2MaskedLM
from zoo.strategies import empty_parameters


class Measure(Callback):
    def __init__(self) -> None:
        self.figures: dict = {}

    def on_validation_start(self, trainer, pl_module) -> None:
        local = [p.to_local() if hasattr(p, "to_local") else p for p in pl_module.parameters()]
        self.figures = {
            "rank": trainer.global_rank,
            "local_bytes": sum(t.numel() * t.element_size() for t in local),
            "total_bytes": sum(p.numel() * p.element_size() for p in pl_module.parameters()),
            "any_meta": any(t.is_meta for t in local) or any(b.is_meta for b in pl_module.buffers()),
            "finite": all(bool(torch.isfinite(t).all()) for t in local),
        }


def main() -> None:
    out, size = Path(sys.argv[1]), sys.argv[2]
    L.seed_everything(0)
    with empty_parameters():
        model = ESM2MaskedLM(model_name=size)
    assert all(p.is_meta for p in model.parameters()), "parameters were allocated"
    measure = Measure()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[measure],
    )
    trainer.validate(model, DataLoader(ProteinSet(4), batch_size=2))
    figures = dict(measure.figures)
    figures["val_loss"] = float(trainer.callback_metrics["val/loss"])
    figures["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(figures))


if __name__ == "__main__":
    main()
