"""``TrainingMonitor``: training statistics, anomaly detection with an action, and an end-of-fit report.

Lightning's pieces each do one part: ``grad_norm`` (a utility, per-parameter keys), ``ThroughputMonitor``
(needs ``flops_per_batch``), ``DeviceStatsMonitor`` (no GPU utilisation), ``SpikeDetection`` (loss only,
raises), ``EarlyStopping(check_finite=True)`` (stops after the NaN reached the weights). This callback
computes what is cheap every step (the loss, one fused ``torch._foreach_norm`` over the gradients), the rest
every ``log_every_n_steps``, and acts *before* the optimizer step: a non-finite gradient or a loss spike can
``warn``, ``skip_step`` (gradients dropped, weights untouched), ``rollback`` (back to an in-memory copy of the
last good weights, optimizer and scheduler state) or ``stop`` (a checkpoint of the still-healthy weights is
written first, to resume from). A non-finite loss or gradient is traced to the first module whose output is
non-finite (or the first parameter whose gradient is), by re-running that step's forward only when it happens.
The callback's state travels in checkpoints, so a resumed run reports as an uninterrupted one would. At fit end
it writes ``training_report.json`` and ``training_report.md``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import json
import math
import os
import random
import statistics
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor

__all__ = ["TrainingMonitor"]

Action = Literal["warn", "skip_step", "rollback", "stop"]
ACTIONS = get_args(Action)
# acted on before the optimizer step; "other_rank": another process saw one of the others at this step
ACTIONABLE = ("nan_loss", "nan_grad", "loss_spike", "exploding_grad", "other_rank")
NON_FINITE = ("nan_loss", "nan_grad")  # traced to the first non-finite module or gradient
CACHE_BYTES = 2**19  # a run of weights, with their copy, that stays in a core's L2 cache between two passes
# What a checkpoint carries (plain python types: loadable with ``torch.load(weights_only=True)``).
STATE = (
    "losses",
    "history",
    "anomalies",
    "data_report",
    "step_times",
    "samples_per_s",
    "tokens_per_s",
    "peak_rss",
    "rollbacks",
    "_rollbacks_in_a_row",
    "_healthy_steps",
    "_batches_checked",
)

RECOMMENDATIONS = {
    "nan_loss": "A non-finite loss: lower the learning rate, add gradient clipping, or use bf16 instead of fp16.",
    "nan_grad": "Non-finite gradients in the named parameters: check their inputs, clip gradients, lower the lr.",
    "loss_spike": "Loss spikes: lower the peak learning rate, lengthen warmup, or clip gradients.",
    "exploding_grad": "Exploding gradients: set gradient_clip_val (e.g. 1.0) and lower the learning rate.",
    "vanishing_grad": "Vanishing gradients: check the initialisation, normalisation layers and the learning rate.",
    "dead_params": "Parameters with zero gradient: check they are used in forward (or freeze them on purpose).",
    "data": "Suspicious input data: check normalisation and the label distribution.",
    "other_rank": "Another process met an anomaly at this step: its report (or its warning) names it.",
}


def _rss_bytes() -> int:
    """Current resident set size (Linux ``/proc``; psutil elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def _peak_rss_bytes() -> int:
    """The process's peak resident set size so far: one system call, no sampling needed between logs."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kilobytes on Linux


def _cpu_percent() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.cpu_percent(interval=None)


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.ndim else None
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else []
    for value in values:
        size = _batch_size(value)
        if size is not None:
            return size
    return None


def _token_count(batch: Any) -> int | None:
    """Non-padding tokens of a sequence batch (dict with an attention mask or token ids), else None."""
    if not isinstance(batch, dict):
        return None
    for key in ("attention_mask", "mask"):
        if isinstance(batch.get(key), Tensor) and batch[key].ndim == 2:
            return int(batch[key].sum())
    for key in ("input_ids", "tokens"):
        if isinstance(batch.get(key), Tensor) and batch[key].ndim == 2:
            return batch[key].numel()
    return None


def _tensors(obj: Any) -> Iterator[Tensor]:
    """Every tensor in a module output or batch, through dicts (Hugging Face outputs are dicts), lists and
    tuples."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def _has_non_finite(obj: Any) -> bool:
    return any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in _tensors(obj))


def _cpu_copy(obj: Any) -> Any:
    """A deep copy with every tensor cloned onto the CPU, so a snapshot never aliases live state."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: _cpu_copy(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_cpu_copy(value) for value in obj]
    if isinstance(obj, tuple):
        return tuple(_cpu_copy(value) for value in obj)
    return copy.deepcopy(obj)


def _runs(tensors: list[Tensor]) -> list[slice]:
    """On the CPU, runs of consecutive tensors of at most ``CACHE_BYTES`` each (a larger tensor alone): the
    passes of a logging step over weights (copy and norm; update, its norm and the weight statistics) go run by
    run, so all but the first read a run from cache instead of memory. On an accelerator, one run: a
    multi-tensor kernel per pass."""
    if not tensors or tensors[0].device.type != "cpu":
        return [slice(0, len(tensors))]
    runs, start, size = [], 0, 0
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        if i > start and size + nbytes > CACHE_BYTES:
            runs.append(slice(start, i))
            start, size = i, 0
        size += nbytes
    runs.append(slice(start, len(tensors)))
    return runs


class _WeightStatistics:
    """Mean, std and max |w| of weight matrices (not biases or norms, nor empty weights), reduced a run of
    weights at a time (``add``) and read from the caller's single host copy of ``values`` (``metrics``).

    std comes from the L2 norm and the mean (``E[w^2] - E[w]^2``), max |w| from ``max(max w, -min w)`` (the
    infinity norm has no vectorised CPU kernel: 10x slower), so a weight costs four reductions and no sync.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.sizes: list[int] = []
        self.values: list[Tensor] = []  # mean, L2 norm, max, min of each weight in turn (0-dim tensors)

    def add(self, named: list[tuple[str, Tensor]]) -> None:
        weights = [(n, p.detach()) for n, p in named if p.ndim > 1 and p.numel()]
        if not weights:
            return
        tensors = [w for _, w in weights]
        self.names += [n for n, _ in weights]
        self.sizes += [w.numel() for w in tensors]
        means = [w.mean() for w in tensors]
        norms = torch._foreach_norm(tensors)
        maxima = torch._foreach_max(tensors)
        minima = [w.amin() for w in tensors]
        for reductions in zip(means, norms, maxima, minima):
            self.values.extend(reductions)

    def metrics(self, values: list[float]) -> dict[str, float]:
        """The logged statistics, from ``values`` (``self.values`` as python floats)."""
        metrics = {}
        for i, (name, n) in enumerate(zip(self.names, self.sizes)):
            mean, norm, top, bottom = values[4 * i : 4 * i + 4]
            variance = max(norm * norm / n - mean * mean, 0.0) * n / max(n - 1, 1)  # max keeps a NaN
            metrics[f"monitor/weight_mean/{name}"] = mean
            metrics[f"monitor/weight_std/{name}"] = math.sqrt(variance)
            peak = math.nan if math.isnan(top) or math.isnan(bottom) else max(top, -bottom)
            metrics[f"monitor/weight_max/{name}"] = peak
        return metrics


@contextlib.contextmanager
def _rng_preserved() -> Iterator[None]:
    """Put the torch (CPU and CUDA), numpy and python random streams back as they were: a diagnostic forward
    (dropout, stochastic depth) must not shift the draws of the rest of the run, or resumes stop being exact."""
    python, numpy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def _side_effects_undone(module: LightningModule) -> Iterator[None]:
    """Re-run a training step without it showing: random streams and buffers (BatchNorm running statistics)
    are restored, and ``self.log`` / ``self.log_dict`` do nothing, so no metric gets a second value."""
    buffers = [(b, b.clone()) for b in module.buffers()]
    try:
        with _rng_preserved(), contextlib.ExitStack() as stack:
            for name in ("log", "log_dict"):
                stack.enter_context(_attribute(module, name, lambda *args, **kwargs: None))
            yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)


@contextlib.contextmanager
def _attribute(obj: Any, name: str, value: Any) -> Iterator[None]:
    """``obj.name`` shadowed by ``value`` on the instance for the duration of the block."""
    setattr(obj, name, value)
    try:
        yield
    finally:
        delattr(obj, name)


def _describe(origin: dict[str, Any]) -> str:
    where, name = origin["where"], origin.get("name")
    if where == "input":
        return "the input batch already holds non-finite values"
    if where == "module":
        return f"module {name!r} ({origin['type']}) is the first to output a non-finite value"
    if where == "training_step":
        return "every module output is finite; the loss training_step computes from them is not"
    if where == "gradient":
        return f"the forward is finite; parameter {name!r} is the first with a non-finite gradient"
    return f"no non-finite module output or gradient found ({origin['reason']})"


class TrainingMonitor(Callback):
    """Statistics, diagnostics and a report for any LightningModule.

    Actions, taken before the optimizer step on a non-finite loss or gradient, a loss spike or an exploding
    gradient norm (other findings are reported only):

    - ``warn``: a warning and an entry in the report.
    - ``skip_step``: the step's gradients are dropped, so the weights and optimizer state stay as they were.
    - ``rollback``: the step is dropped and, at the end of the step, the weights (and buffers), optimizer state
      and LR-scheduler state go back to the last good snapshot; training goes on with the next batch. The
      snapshot is an in-memory CPU copy, refreshed every ``rollback_every_n_steps`` healthy steps (taken just
      before such a step's update, after its loss and gradients passed the checks), at fit start and whenever a
      checkpoint is saved. It costs one copy of the module's ``state_dict`` plus the optimizer state in host
      memory (about 3x the weights with Adam). In memory rather than re-reading ``last.ckpt``: restoring takes
      a memory copy instead of a disk read and unpickling, and the restore point does not depend on whether, or
      how often, checkpoints are written. After ``max_rollbacks`` rollbacks with no new healthy snapshot in
      between, the next anomaly stops the run as ``stop`` does.
    - ``stop``: ``before-anomaly-step{N}.ckpt`` (the weights before the offending update, resumable with
      ``Trainer.fit(ckpt_path=...)``) is written to the report directory and the fit ends; the report says
      which anomaly, at which step, where it started, and the checkpoint to resume from.

    A non-finite loss or gradient is traced, only when it happens, by re-running that step's
    ``training_step`` under ``torch.no_grad()`` with a forward hook on every submodule: the first module (in
    execution order) whose output is non-finite is named; if the forward is finite, the first parameter (in
    module order) with a non-finite gradient. Random streams, buffers and ``self.log`` are left untouched by
    the re-run, so the run continues exactly as it would have.

    ``state_dict`` carries the loss window, history, anomalies, rollback counts and throughput records, so a
    run killed and resumed from a checkpoint reports what an uninterrupted one would (timings aside).

    Args:
        log_every_n_steps: how often the statistics (norms, weights, system) are logged.
        per_layer: also log gradient norm and weight mean/std/max per module ``layer_depth`` levels deep.
        layer_depth: the grouping depth of parameter names for per-layer statistics.
        action: what a detected anomaly does: ``warn``, ``skip_step``, ``rollback`` or ``stop``.
        spike_factor / spike_window: a loss above ``spike_factor`` x the running median of the last
            ``spike_window`` losses is a spike.
        explode_threshold / vanish_threshold: global gradient-norm bounds.
        data_check_batches: training batches whose inputs and labels are checked at the start.
        report_dir: where the report (and the ``stop`` checkpoint) goes (default: the trainer's log dir).
        rollback_every_n_steps: healthy steps between two snapshots for ``rollback``.
        max_rollbacks: rollbacks to the same snapshot before the run is stopped instead.
    """

    def __init__(
        self,
        log_every_n_steps: int = 50,
        per_layer: bool = True,
        layer_depth: int = 2,
        action: Action = "warn",
        spike_factor: float = 3.0,
        spike_window: int = 50,
        explode_threshold: float = 1e3,
        vanish_threshold: float = 1e-7,
        data_check_batches: int = 2,
        report_dir: str | None = None,
        rollback_every_n_steps: int = 50,
        max_rollbacks: int = 3,
    ) -> None:
        if action not in ACTIONS:
            raise ValueError(f"TrainingMonitor action must be one of {ACTIONS}, got {action!r}")
        if log_every_n_steps < 1:
            raise ValueError(f"TrainingMonitor log_every_n_steps must be >= 1, got {log_every_n_steps}")
        if rollback_every_n_steps < 1 or max_rollbacks < 0:
            raise ValueError(
                "TrainingMonitor needs rollback_every_n_steps >= 1 and max_rollbacks >= 0, got "
                f"{rollback_every_n_steps} and {max_rollbacks}"
            )
        self.log_every_n_steps, self.per_layer, self.layer_depth = log_every_n_steps, per_layer, layer_depth
        self.action, self.spike_factor, self.explode_threshold = action, spike_factor, explode_threshold
        self.vanish_threshold, self.data_check_batches, self.report_dir = (
            vanish_threshold,
            data_check_batches,
            report_dir,
        )
        self.rollback_every_n_steps, self.max_rollbacks = rollback_every_n_steps, max_rollbacks
        self.losses: deque[float] = deque(maxlen=spike_window)
        self.history: list[tuple[int, float]] = []  # (step, loss)
        self.anomalies: list[dict[str, Any]] = []
        self.step_times: list[float] = []
        self.samples_per_s: list[float] = []
        self.tokens_per_s: list[float] = []
        self.peak_rss = 0
        self.data_report: dict[str, Any] = {}
        self.rollbacks = 0
        self.stopped: dict[str, Any] | None = None  # this fit's stop: anomaly, step, origin, checkpoint
        self._pending: list[dict[str, Any]] = []  # anomalies of the current step, acted on before the step
        self._last_start: float | None = None
        self._weights_before: list[Tensor] | None = None  # a logging step's weights before its update
        self._weight_norm: Tensor | None = None  # their norm
        self._weights_buffer: list[Tensor] | None = None  # their memory, kept between logging steps on CPU
        self._named_parameters: list[tuple[str, Tensor]] | None = None
        self._batch_samples: int | None = None
        self._batch_tokens: int | None = None
        self._batches_checked = 0
        self._batch: Any = None  # the current batch, kept for the step (a reference) to trace an anomaly
        self._batch_idx = 0
        self._snapshot: dict[str, Any] | None = None  # rollback: CPU copy of the last good state
        self._healthy_steps = 0  # since the last snapshot or rollback
        self._rollbacks_in_a_row = 0  # to the current snapshot
        self._rollback_pending = False

    @property
    def stopped_checkpoint(self) -> str | None:
        """The checkpoint ``stop`` wrote in this fit, to resume from."""
        return self.stopped["checkpoint"] if self.stopped else None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """What the report and the checks need to carry on after a resume, as plain python values."""
        state = {name: copy.deepcopy(getattr(self, name)) for name in STATE}
        state["losses"] = list(self.losses)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        window = self.losses.maxlen
        for name in STATE:
            setattr(self, name, state_dict[name])
        self.losses = deque(self.losses, maxlen=window)

    # ----------------------------------------------------------------- helpers
    def _log_step(self, trainer: Trainer) -> bool:
        return (trainer.global_step + 1) % self.log_every_n_steps == 0

    def _record(self, trainer: Trainer, kind: str, message: str, **details: Any) -> None:
        anomaly = {"step": trainer.global_step, "kind": kind, "message": message, **details}
        self.anomalies.append(anomaly)
        self._pending.append(anomaly)
        rank_zero_warn(f"TrainingMonitor: step {trainer.global_step}: {message}")

    def _layer(self, name: str) -> str:
        return ".".join(name.split(".")[: self.layer_depth])

    # -------------------------------------------------------------- data check
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._last_start is not None:
            self.step_times.append(now - self._last_start)
            if self._batch_samples:
                self.samples_per_s.append(self._batch_samples / self.step_times[-1])
            if self._batch_tokens:
                self.tokens_per_s.append(self._batch_tokens / self.step_times[-1])
        self._last_start = now
        self._batch_samples = _batch_size(batch)
        self._batch_tokens = _token_count(batch)
        self._batch, self._batch_idx = batch, batch_idx
        if self._batches_checked < self.data_check_batches:  # counted, so a resume does not check twice
            self._batches_checked += 1
            self._check_data(trainer, batch)

    def _check_data(self, trainer: Trainer, batch: Any) -> None:
        items = (
            batch.items()
            if isinstance(batch, dict)
            else enumerate(batch if isinstance(batch, (tuple, list)) else [batch])
        )
        for key, value in items:
            if not isinstance(value, Tensor):
                continue
            entry = self.data_report.setdefault(str(key), {})
            if value.is_floating_point():
                v = value.detach().float()
                finite = torch.isfinite(v)
                entry.update(
                    min=float(v[finite].min()) if finite.any() else math.nan,
                    max=float(v[finite].max()) if finite.any() else math.nan,
                    mean=float(v[finite].mean()) if finite.any() else math.nan,
                    std=float(v[finite].std()) if finite.sum() > 1 else 0.0,
                )
                if not finite.all():
                    self._record(
                        trainer, "data", f"input {key!r} has {int((~finite).sum())} non-finite values"
                    )
                elif max(abs(entry["min"]), abs(entry["max"])) > 1e3:
                    self._record(
                        trainer,
                        "data",
                        f"input {key!r} ranges over [{entry['min']:.3g}, {entry['max']:.3g}]: not normalised?",
                    )
            elif value.ndim == 1:  # class labels
                counts = torch.bincount(value.detach().flatten().clamp(min=0).cpu())
                previous = torch.tensor(entry.get("label_counts", []), dtype=torch.long)
                size = max(len(counts), len(previous))
                total = torch.nn.functional.pad(counts, (0, size - len(counts))) + torch.nn.functional.pad(
                    previous, (0, size - len(previous))
                )
                entry["label_counts"] = total.tolist()
                if (total > 0).sum() == 1 and total.sum() >= 16:
                    self._record(trainer, "data", f"labels {key!r} hold a single class in the first batches")
            elif value.ndim == 2 and ("mask" in str(key) or "input_ids" in str(key) or "tokens" in str(key)):
                mask = (
                    value != 0
                    if "mask" in str(key)
                    else value != getattr(trainer.lightning_module, "padding_idx", 0)
                )
                entry.update(
                    padding_share=float(1 - mask.float().mean()),
                    mean_length=float(mask.sum(-1).float().mean()),
                )

    # ------------------------------------------------------------ loss checks
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        value = float(loss.detach())
        if not math.isfinite(value):
            self._record(trainer, "nan_loss", f"the loss is {value}")
            return
        if len(self.losses) >= 5:
            median = statistics.median(self.losses)
            if median > 0 and value > self.spike_factor * median:
                self._record(
                    trainer,
                    "loss_spike",
                    f"loss {value:.4g} is {value / median:.1f}x the running median {median:.4g}",
                )
        self.losses.append(value)
        self.history.append((trainer.global_step, value))

    # ---------------------------------------------------------- gradient checks
    def _parameters(self, pl_module: LightningModule, refresh: bool) -> list[tuple[str, Tensor]]:
        """The trainable parameters, listed once and re-listed on logging steps (a callback such as
        structured pruning may replace modules); walking the module tree every step costs more than the check."""
        if refresh or self._named_parameters is None:
            self._named_parameters = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        return self._named_parameters

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._named_parameters = None

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        log_now = self._log_step(trainer)
        named = self._parameters(pl_module, refresh=log_now)
        grads = [p.grad for _, p in named]
        if any(g is None for g in grads):
            named = [item for item, g in zip(named, grads) if g is not None]
            grads = [g for g in grads if g is not None]
        if grads:
            # One multi-tensor norm over every gradient (no per-tensor detach: no_grad instead), one host
            # sync. What remains is reading the gradients once, which the check needs.
            with torch.no_grad():
                norms = torch.stack(torch._foreach_norm(grads)).float()
                total = float(torch.linalg.vector_norm(norms))
            self._check_gradients(trainer, named, norms, total)
            if log_now:
                self._log_gradients(trainer, named, norms, total)
        if log_now and self._parameters(pl_module, refresh=False):
            self._weights_before = self._copy_weights(self._parameters(pl_module, refresh=False))
        self._act(trainer, pl_module, optimizer)

    @torch.no_grad()
    def _copy_weights(self, named: list[tuple[str, Tensor]]) -> list[Tensor]:
        """The weights before a logging step's update (for its update norm), and their norm, taken from the
        copy while it is in cache. On the CPU the copy's memory is kept from one logging step to the next:
        fresh host memory costs page faults, several times the copy itself (resident memory is one copy of the
        weights higher between logging steps, its peak unchanged). On an accelerator it comes from the caching
        allocator and goes back after the step, so activations can use it in between."""
        params = [p.detach() for _, p in named]
        buffer, self._weights_buffer = self._weights_buffer, None
        reuse = (
            buffer is not None
            and len(buffer) == len(params)
            and all(
                b.shape == p.shape and b.dtype == p.dtype and b.device == p.device
                for b, p in zip(buffer, params)
            )
        )
        copies: list[Tensor] = []
        norms: list[Tensor] = []
        for run in _runs(params):
            if reuse:
                part = buffer[run]
                for b, p in zip(part, params[run]):
                    b.copy_(p)
            else:
                part = [p.clone() for p in params[run]]
            copies += part
            norms += torch._foreach_norm(part)
        self._weight_norm = torch.linalg.vector_norm(torch.stack(norms).float())
        return copies

    def _check_gradients(self, trainer: Trainer, named: list, norms: Tensor, total: float) -> None:
        if not math.isfinite(total):
            bad = [n for (n, _), ok in zip(named, torch.isfinite(norms).tolist()) if not ok]
            self._record(
                trainer,
                "nan_grad",
                f"non-finite gradients in {len(bad)} parameters: {', '.join(bad[:10])}",
                parameters=bad,
            )
        elif total > self.explode_threshold:
            self._record(
                trainer,
                "exploding_grad",
                f"gradient norm {total:.4g} > {self.explode_threshold:g}",
                grad_norm=total,
            )
        elif total < self.vanish_threshold:
            self._record(
                trainer,
                "vanishing_grad",
                f"gradient norm {total:.3g} < {self.vanish_threshold:g}",
                grad_norm=total,
            )

    def _log_gradients(self, trainer: Trainer, named: list, norms: Tensor, total: float) -> None:
        values = norms.tolist()
        zero = [n for (n, _), v in zip(named, values) if v == 0.0]
        if zero:
            self._record(
                trainer,
                "dead_params",
                f"{len(zero)} parameters have zero gradient: {', '.join(zero[:10])}",
                parameters=zero,
            )
        metrics = {"monitor/grad_norm": total}
        if self.per_layer:
            layers: dict[str, float] = {}
            for (name, _), v in zip(named, values):
                layers[self._layer(name)] = layers.get(self._layer(name), 0.0) + v * v
            metrics.update({f"monitor/grad_norm/{k}": math.sqrt(v) for k, v in layers.items()})
        self._log(trainer, metrics)

    def _log(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """Straight to the loggers, in one call: ``LightningModule.log`` costs about 0.1 ms per key, and
        per-layer statistics are hundreds of keys. Loggers write on rank 0 only, as they do for ``self.log``.

        Under the step Lightning logs the current batch's values at (the batches that stepped before it, as
        ``LearningRateMonitor``), before and after the optimizer step alike: a run resumed from a checkpoint
        written at the end of this step keeps this row (``zoo.loggers`` keeps the rows of earlier steps)."""
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _act(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        pending, self._pending = self._pending, []
        actionable = [a for a in pending if a["kind"] in ACTIONABLE]
        if trainer.world_size > 1 and self.action != "warn":
            # every process acts alike (a loss spike is seen per process), or the replicas would drift apart
            anywhere = trainer.strategy.reduce_boolean_decision(bool(actionable), all=False)
            if anywhere and not actionable:
                self._record(trainer, "other_rank", "another process met an anomaly at this step")
                actionable = self._pending[-1:]
                self._pending = []
        if not actionable:
            self._count_healthy_step(trainer, pl_module)
            return
        self._trace(trainer, pl_module, actionable)
        if self.action == "warn":
            return
        action = self.action
        if action == "rollback" and self._rollbacks_in_a_row >= self.max_rollbacks:
            action = "stop"
        for anomaly in actionable:
            anomaly["action"] = action
        for group in optimizer.param_groups:  # skip this update: optimizers ignore parameters without grads
            for p in group["params"]:
                p.grad = None
        if action == "rollback":
            self._plan_rollback(actionable)
        elif action == "stop":
            self._stop(trainer, actionable)

    # ------------------------------------------------------ tracing non-finite
    def _trace(self, trainer: Trainer, pl_module: LightningModule, actionable: list[dict[str, Any]]) -> None:
        """Attach where a non-finite loss or gradient started to the step's anomalies (a spike or an exploding
        norm is finite: nothing to trace)."""
        non_finite = [a for a in actionable if a["kind"] in NON_FINITE]
        if not non_finite:
            return
        origin = self._first_non_finite(trainer, pl_module)
        origin["message"] = _describe(origin)
        for anomaly in non_finite:
            anomaly["first_non_finite"] = dict(origin)
        rank_zero_warn(f"TrainingMonitor: step {trainer.global_step}: {origin['message']}")

    def _first_non_finite(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        """The input batch, else the first module whose output is non-finite on a re-run of the step (or the
        loss computed outside any module), else the first parameter with a non-finite gradient."""
        if _has_non_finite(self._batch):
            return {"where": "input", "name": None}
        reason = "the re-run forward and every gradient are finite"
        try:
            origin = self._replay(trainer, pl_module)
        except Exception as error:  # a diagnosis must never end the run
            origin, reason = None, f"re-running training_step failed: {error!r}"
        if origin is not None:
            return origin
        for name, p in pl_module.named_parameters():
            if p.grad is not None and _has_non_finite(p.grad):
                return {"where": "gradient", "name": name}
        return {"where": None, "name": None, "reason": reason}

    def _replay(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any] | None:
        """Re-run ``training_step`` on the step's batch with a forward hook on every submodule. Hooks fire as
        each module's forward returns, so the first non-finite output is the innermost, earliest culprit."""
        if self._batch is None:  # training_step reads a dataloader_iter: no batch to replay
            return None
        found: list[dict[str, Any]] = []

        def record(name: str, module: torch.nn.Module, args: Any, output: Any) -> None:
            if not found and _has_non_finite(output):
                found.append({"where": "module", "name": name, "type": type(module).__name__})

        handles = [
            module.register_forward_hook(functools.partial(record, name))
            for name, module in pl_module.named_modules()
            if name
        ]
        takes_index = is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2)
        args = (self._batch, self._batch_idx) if takes_index else (self._batch,)
        try:
            with (
                _side_effects_undone(pl_module),
                torch.no_grad(),
                trainer.precision_plugin.train_step_context(),
            ):
                output = pl_module.training_step(*args)
        finally:
            for handle in handles:
                handle.remove()
        if not found and _has_non_finite(output):
            found.append({"where": "training_step", "name": None})
        return found[0] if found else None

    # --------------------------------------------------------------- rollback
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.action == "rollback":
            self._take_snapshot(trainer, pl_module)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        """A checkpoint is a restore point too: a run resumed from it snapshots the same state at its start,
        so it rolls back exactly as the uninterrupted run does."""
        if self.action == "rollback" and not trainer.should_stop:
            self._take_snapshot(trainer, pl_module)

    def _count_healthy_step(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Every ``rollback_every_n_steps`` healthy steps, snapshot the state just before the update: this
        step's loss and gradients passed the checks, so the weights are known to be good."""
        if self.action != "rollback":
            return
        self._healthy_steps += 1
        if self._healthy_steps >= self.rollback_every_n_steps:
            self._take_snapshot(trainer, pl_module)
            self._healthy_steps = self._rollbacks_in_a_row = 0

    def _take_snapshot(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._snapshot = None  # the old copy goes first: never two in host memory
        self._snapshot = {
            "step": trainer.global_step,  # the state before this step's optimizer update
            "model": _cpu_copy(pl_module.state_dict()),
            "optimizers": [_cpu_copy(optimizer.state_dict()) for optimizer in trainer.optimizers],
            "schedulers": [
                _cpu_copy(config.scheduler.state_dict()) for config in trainer.lr_scheduler_configs
            ],
        }

    def _plan_rollback(self, actionable: list[dict[str, Any]]) -> None:
        self.rollbacks += 1
        self._rollbacks_in_a_row += 1
        self._healthy_steps = 0  # a new snapshot needs rollback_every_n_steps healthy steps from here
        self._rollback_pending = True
        for anomaly in actionable:
            anomaly["rolled_back_to_step"] = self._snapshot["step"]

    def _rollback(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Restore the snapshot at the end of the step, after Lightning's per-step scheduler update, so the next
        step starts from exactly the snapshot's weights, optimizer and learning rate."""
        self._rollback_pending = False
        pl_module.load_state_dict(self._snapshot["model"])  # copies into the live tensors
        # Copies again: on the CPU, load_state_dict would make the live state alias the snapshot.
        for optimizer, state in zip(trainer.optimizers, self._snapshot["optimizers"]):
            optimizer.load_state_dict(_cpu_copy(state))
        for config, state in zip(trainer.lr_scheduler_configs, self._snapshot["schedulers"]):
            config.scheduler.load_state_dict(_cpu_copy(state))

    # ------------------------------------------------------------------- stop
    def _stop(self, trainer: Trainer, actionable: list[dict[str, Any]]) -> None:
        """Write the still-healthy weights (the optimizer has not stepped yet) and end the fit."""
        if self.stopped is not None:
            return
        path = str(Path(self._report_dir(trainer)) / f"before-anomaly-step{trainer.global_step}.ckpt")
        origin = next((a["first_non_finite"] for a in actionable if "first_non_finite" in a), None)
        reason = "action='stop'"
        if self.action == "rollback":
            reason = (
                f"{self._rollbacks_in_a_row} rollbacks to the state before step {self._snapshot['step']} "
            )
            reason += "did not prevent it"
        self.stopped = {
            "step": trainer.global_step,
            "anomalies": [a["kind"] for a in actionable],
            "first_non_finite": origin,
            "action": "stop",
            "reason": reason,
            "checkpoint": path,
        }
        for anomaly in actionable:  # before saving, so the checkpoint's own history records it
            anomaly["checkpoint"] = path
        trainer.should_stop = True
        trainer.save_checkpoint(path, weights_only=False)  # a full checkpoint: resumable

    # ------------------------------------------------------------ statistics
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._rollback_pending:
            self._rollback(trainer, pl_module)
        self._batch = None  # not kept alive through validation
        if self._weights_before is None:  # not a logging step
            return
        before, self._weights_before = self._weights_before, None
        named = self._parameters(pl_module, refresh=False)
        params = [p.detach() for _, p in named]
        weights = _WeightStatistics()
        norms: list[Tensor] = []
        with torch.no_grad():
            for run in _runs(params):
                torch._foreach_sub_(before[run], params[run])  # in place: the update, negated
                norms += torch._foreach_norm(before[run])
                if self.per_layer:  # this run's weights are in cache after the subtraction
                    weights.add(named[run])
            update = torch.linalg.vector_norm(torch.stack(norms).float())
            weight, self._weight_norm = self._weight_norm, None
            update, weight, *values = torch.stack([update, weight, *weights.values]).tolist()
        if all(b.device.type == "cpu" for b in before):
            self._weights_buffer = before
        metrics: dict[str, float] = {"monitor/update_to_weight": update / max(weight, 1e-12)}
        for i, group in enumerate(trainer.optimizers[0].param_groups if trainer.optimizers else []):
            metrics[f"monitor/lr/pg{i}"] = float(group["lr"])
        if self.step_times:
            metrics["monitor/step_time_s"] = self.step_times[-1]
        if self.samples_per_s:
            metrics["monitor/samples_per_s"] = self.samples_per_s[-1]
        if self.tokens_per_s:
            metrics["monitor/tokens_per_s"] = self.tokens_per_s[-1]
        metrics["monitor/rss_gb"] = _rss_bytes() / 2**30
        self.peak_rss = max(self.peak_rss, _peak_rss_bytes())
        if (cpu := _cpu_percent()) is not None:
            metrics["monitor/cpu_percent"] = cpu
        if pl_module.device.type == "cuda":
            metrics["monitor/cuda_allocated_gb"] = torch.cuda.memory_allocated(pl_module.device) / 2**30
            metrics["monitor/cuda_reserved_gb"] = torch.cuda.memory_reserved(pl_module.device) / 2**30
            with contextlib.suppress(Exception):  # NVML (pynvml) absent
                metrics["monitor/gpu_utilization"] = float(torch.cuda.utilization(pl_module.device))
        metrics.update(weights.metrics(values))
        self._log(trainer, metrics)

    @staticmethod
    @torch.no_grad()
    def _weight_statistics(named: list[tuple[str, Tensor]]) -> dict[str, float]:
        """Mean, std and max |w| of every weight matrix, with one host sync (``_WeightStatistics``)."""
        weights = _WeightStatistics()
        weights.add(named)
        return weights.metrics(torch.stack(weights.values).tolist()) if weights.values else {}

    # ---------------------------------------------------------------- report
    def _report_dir(self, trainer: Trainer) -> str:
        directory = self.report_dir or trainer.log_dir or trainer.default_root_dir
        os.makedirs(directory, exist_ok=True)
        return directory

    def report(self) -> dict[str, Any]:
        """The run's summary: convergence, stability, throughput, memory, anomalies and what to do."""
        losses = [loss for _, loss in self.history]
        summary: dict[str, Any] = {"steps": len(losses)}
        if len(losses) >= 2:
            half = max(1, len(losses) // 10)
            first, last = statistics.mean(losses[:half]), statistics.mean(losses[-half:])
            diffs = [b - a for a, b in itertools.pairwise(losses)]
            summary.update(
                loss_first=first,
                loss_last=last,
                loss_min=min(losses),
                # relative loss decrease per 100 steps, from the first and last tenth of the run
                convergence_rate_per_100_steps=(first - last)
                / max(abs(first), 1e-12)
                * 100
                / max(len(losses) - half, 1),
                loss_stability=statistics.pstdev(diffs) / max(abs(statistics.mean(losses)), 1e-12),
            )
        if self.samples_per_s:
            summary.update(
                samples_per_s_mean=statistics.mean(self.samples_per_s),
                samples_per_s_peak=max(self.samples_per_s),
            )
        if self.tokens_per_s:
            summary.update(
                tokens_per_s_mean=statistics.mean(self.tokens_per_s), tokens_per_s_peak=max(self.tokens_per_s)
            )
        if self.step_times:
            summary["step_time_s_median"] = statistics.median(self.step_times)
        summary["peak_rss_gb"] = max(self.peak_rss, _peak_rss_bytes()) / 2**30
        if torch.cuda.is_available():
            summary["peak_cuda_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        kinds = sorted({a["kind"] for a in self.anomalies})
        return {
            "summary": summary,
            "data": self.data_report,
            "anomalies": self.anomalies,
            "recommendations": [RECOMMENDATIONS[k] for k in kinds if k in RECOMMENDATIONS],
            "rollbacks": self.rollbacks,
            "stopped": self.stopped,
            "stopped_checkpoint": self.stopped_checkpoint,
        }

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Also reached when ``stop`` ended the fit: the report then says how to resume."""
        self._snapshot = self._weights_buffer = None  # the host memory they held goes back
        if not trainer.is_global_zero:
            return
        report = self.report()
        directory = Path(self._report_dir(trainer))
        (directory / "training_report.json").write_text(json.dumps(report, indent=2, default=str))
        (directory / "training_report.md").write_text(_markdown(report))


def _anomaly_line(anomaly: dict[str, Any]) -> str:
    line = f"- step {anomaly['step']}: **{anomaly['kind']}** {anomaly['message']}"
    if "first_non_finite" in anomaly:
        line += f"; {anomaly['first_non_finite']['message']}"
    if "action" in anomaly:
        line += f" ({anomaly['action']}"
        if "rolled_back_to_step" in anomaly:
            line += f" to the state before step {anomaly['rolled_back_to_step']}"
        line += ")"
    return line


def _markdown(report: dict[str, Any]) -> str:
    lines = ["# Training report", "", "| metric | value |", "|---|---|"]
    lines += [
        f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
        for k, v in report["summary"].items()
    ]
    lines += ["", f"## Anomalies ({len(report['anomalies'])})", ""]
    lines += [_anomaly_line(a) for a in report["anomalies"][:100]]
    if report["rollbacks"]:
        lines += ["", f"Rollbacks: {report['rollbacks']}."]
    if stopped := report["stopped"]:
        origin = stopped["first_non_finite"]
        lines += [
            "",
            f"## Stopped at step {stopped['step']}",
            "",
            f"- anomaly: {', '.join(stopped['anomalies'])}",
            f"- first non-finite: {origin['message'] if origin else 'none (finite loss and gradients)'}",
            f"- action: stop ({stopped['reason']})",
            f"- resume from `{stopped['checkpoint']}` (the weights before the offending update): "
            f"`Trainer.fit(model, ckpt_path=...)` once the cause is fixed",
        ]
    lines += [
        "",
        "## Recommendations",
        "",
        *(f"- {r}" for r in report["recommendations"] or ["None: no anomalies seen."]),
    ]
    return "\n".join(lines) + "\n"
