"""Callbacks for multi-process ``zoo fit`` runs in the resume tests (``--trainer.callbacks+=...``): a fault that
hits one rank, and a record of what every rank holds at the end (a checkpoint shows rank 0's view only).

``tests.resume.faults`` kills the whole (single) process; here one rank dies and the others must notice.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


class KillRankAtStep(Callback):
    """SIGKILLs the process of global rank ``rank`` once ``step`` optimizer steps are done, before that step's
    checkpoint would be written (callbacks run before every ``ModelCheckpoint``); the other ranks go on
    into the next collective with a dead peer.

    With ``during_save``, the rank dies instead in the middle of the sharded checkpoint written at ``step``:
    right after its own shard file is on disk, before the others finish theirs and before rank 0 writes the
    checkpoint's metadata (``.metadata``, ``meta.pt``). A checkpoint written in place is then a mix of two
    steps; the previous complete one must survive.
    """

    def __init__(self, step: int, rank: int = 1, during_save: bool = False) -> None:
        self.step, self.rank, self.during_save = step, rank, during_save

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank != self.rank or trainer.global_step != self.step:
            return
        if not self.during_save:
            os.kill(os.getpid(), signal.SIGKILL)
        from torch.distributed.checkpoint import FileSystemWriter

        write_data = FileSystemWriter.write_data

        def write_then_die(writer, plan, planner):
            written = write_data(writer, plan, planner)
            written.wait()  # this rank's shard file is complete on disk
            os.kill(os.getpid(), signal.SIGKILL)

        FileSystemWriter.write_data = write_then_die


def _local(value):
    """A tensor's own shard (FSDP2 ``DTensor``) or the tensor, detached on the CPU."""
    if hasattr(value, "to_local"):
        value = value.to_local()
    return value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value


class RecordRankState(Callback):
    """At the end of training every rank writes ``<folder>/rank<N>.pt``: its parameters and buffers (its shards
    under FSDP2), its optimizer state, its torch generator state and its step. Two runs that ended alike on
    every rank write equal files; a rank that did not resume (or resumed differently) shows."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        names = {id(parameter): name for name, parameter in pl_module.named_parameters()}
        states = trainer.optimizers[0].state
        record = {
            "global_step": trainer.global_step,
            "weights": {name: _local(value) for name, value in pl_module.state_dict().items()},
            "optimizer": {  # by parameter name: the state's own order may differ after a resume
                f"{names[id(parameter)]}.{key}": _local(value)
                for parameter, state in states.items()
                for key, value in state.items()
            },
            "torch_rng": torch.get_rng_state(),
        }
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        torch.save(record, Path(self.folder) / f"rank{trainer.global_rank}.pt")
