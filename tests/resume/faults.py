"""Faults a real run meets, injected into a ``zoo fit`` subprocess as callbacks (``--trainer.callbacks+=...``)."""

from __future__ import annotations

import errno
import os
import signal

from lightning.pytorch.callbacks import Callback

from zoo import checkpointing


class SignalAtStep(Callback):
    """Sends this process ``signal`` (a name: ``SIGKILL``, ``SIGTERM``, ``SIGUSR1``) once ``step`` optimizer
    steps are done, before that step's checkpoint is written: a kill then loses the steps since the last one."""

    def __init__(self, step: int, signal: str = "SIGKILL") -> None:
        self.step, self.signal = step, signal

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signal))


class DiskFullAtStep(Callback):
    """From ``step`` on, checkpoint writes fail half-way as on a full disk (``ENOSPC``) or, with ``kill``, the
    process dies between writing the temporary file and renaming it over the old checkpoint."""

    def __init__(self, step: int, kill: bool = False) -> None:
        self.step, self.kill = step, kill

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        if self.kill:

            def replace(source, target):
                os.kill(os.getpid(), signal.SIGKILL)

            checkpointing.os.replace = replace
            return
        real_save = checkpointing.torch.save

        def save(obj, handle, *args, **kwargs):
            real_save(obj, handle, *args, **kwargs)
            handle.truncate(handle.tell() // 2)
            raise OSError(errno.ENOSPC, "No space left on device")

        checkpointing.torch.save = save
