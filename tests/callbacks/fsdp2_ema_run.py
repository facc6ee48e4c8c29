"""One FSDP2 training run with ``zoo.callbacks.EMA``, launched by ``test_ema_distributed.py``.

A script rather than a test because ``ModelParallelStrategy`` re-launches the running command once per
rank. ``python fsdp2_ema_run.py OUT_DIR MAX_STEPS [RESUME_FROM]`` trains ``ShardedTinyClassifier`` on 2
CPU processes (gloo), checkpoints every 2 steps (one epoch: 32 samples, batch 8 per rank), and rank 0 saves the gathered EMA and the full weights
after each optimizer step to ``OUT_DIR/result.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.callbacks.callback_testing import TinyClassifier, tiny_loader
from zoo.callbacks import EMA


class ShardedTinyClassifier(TinyClassifier):
    """Each Linear is an FSDP2 unit, the root holds the rest; snapshots are gathered full weights."""

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for module in self.net:
            if isinstance(module, torch.nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def state_copy(self) -> dict[str, torch.Tensor]:
        full = {}
        for name, value in self.state_dict().items():
            value = value.full_tensor() if hasattr(value, "full_tensor") else value
            full[name] = value.detach().clone()
        return full


def main(out_dir: str, max_steps: int, resume_from: str | None) -> None:
    L.seed_everything(0)
    ema = EMA(decay=0.9, warmup=True)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=max_steps,
        limit_val_batches=1,  # validation swaps the EMA in and out of the sharded model
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out_dir,
        callbacks=[
            ema,
            ModelCheckpoint(dirpath=f"{out_dir}/checkpoints", every_n_train_steps=2, save_top_k=-1),
        ],
    )
    model = ShardedTinyClassifier()
    trainer.fit(
        model, tiny_loader(n=32, batch_size=8), tiny_loader(n=16, batch_size=8), ckpt_path=resume_from
    )
    state = ema.state_dict()  # a collective: gathers the shards on every rank
    if trainer.is_global_zero:
        torch.save(
            {"ema": dict(zip(state["names"], state["ema"])), "snapshots": model.snapshots},
            f"{out_dir}/result.pt",
        )
    # tear gloo down before the interpreter does: left to exit, its threads can abort a finished process
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
