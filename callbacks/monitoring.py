"""``TrainingMonitor``: training statistics, anomaly detection with an action, and an end-of-fit report.

Lightning's pieces each do one part: ``grad_norm`` (a utility, per-parameter keys), ``ThroughputMonitor``
(needs ``flops_per_batch``), ``DeviceStatsMonitor`` (no GPU utilisation), ``SpikeDetection`` (loss only,
raises), ``EarlyStopping(check_finite=True)`` (stops after the NaN reached the weights). This callback
computes what is cheap every step (the loss, one fused ``torch._foreach_norm`` over the gradients), the rest
every ``log_every_n_steps``, and acts *before* the optimizer step: a non-finite gradient or a loss spike can
``warn``, ``skip_step`` (gradients dropped, weights untouched) or ``stop`` (a checkpoint of the still-healthy
weights is written first). At fit end it writes ``training_report.json`` and ``training_report.md``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import statistics
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

__all__ = ["TrainingMonitor"]

Action = Literal["warn", "skip_step", "stop"]

RECOMMENDATIONS = {
    "nan_loss": "A non-finite loss: lower the learning rate, add gradient clipping, or use bf16 instead of fp16.",
    "nan_grad": "Non-finite gradients in the named parameters: check their inputs, clip gradients, lower the lr.",
    "loss_spike": "Loss spikes: lower the peak learning rate, lengthen warmup, or clip gradients.",
    "exploding_grad": "Exploding gradients: set gradient_clip_val (e.g. 1.0) and lower the learning rate.",
    "vanishing_grad": "Vanishing gradients: check the initialisation, normalisation layers and the learning rate.",
    "dead_params": "Parameters with zero gradient: check they are used in forward (or freeze them on purpose).",
    "data": "Suspicious input data: check normalisation and the label distribution.",
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


class TrainingMonitor(Callback):
    """Statistics, diagnostics and a report for any LightningModule.

    Args:
        log_every_n_steps: how often the statistics (norms, weights, system) are logged.
        per_layer: also log gradient norm and weight mean/std/max per module ``layer_depth`` levels deep.
        layer_depth: the grouping depth of parameter names for per-layer statistics.
        action: what a detected anomaly does: ``warn``, ``skip_step`` or ``stop``.
        spike_factor / spike_window: a loss above ``spike_factor`` x the running median of the last
            ``spike_window`` losses is a spike.
        explode_threshold / vanish_threshold: global gradient-norm bounds.
        data_check_batches: training batches whose inputs and labels are checked at the start.
        report_dir: where the report goes (default: the trainer's log dir).
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
    ) -> None:
        if action not in ("warn", "skip_step", "stop"):
            raise ValueError(f"TrainingMonitor action must be 'warn', 'skip_step' or 'stop', got {action!r}")
        if log_every_n_steps < 1:
            raise ValueError(f"TrainingMonitor log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.log_every_n_steps, self.per_layer, self.layer_depth = log_every_n_steps, per_layer, layer_depth
        self.action, self.spike_factor, self.explode_threshold = action, spike_factor, explode_threshold
        self.vanish_threshold, self.data_check_batches, self.report_dir = (
            vanish_threshold,
            data_check_batches,
            report_dir,
        )
        self.losses: deque[float] = deque(maxlen=spike_window)
        self.history: list[tuple[int, float]] = []  # (step, loss)
        self.anomalies: list[dict[str, Any]] = []
        self.step_times: list[float] = []
        self.samples_per_s: list[float] = []
        self.peak_rss = 0
        self.data_report: dict[str, Any] = {}
        self._pending: list[dict[str, Any]] = []  # anomalies of the current step, acted on before the step
        self._last_start: float | None = None
        self._weights_before: list[Tensor] | None = None
        self._named_parameters: list[tuple[str, Tensor]] | None = None
        self._batch_samples: int | None = None
        self._batch_tokens: int | None = None
        self.tokens_per_s: list[float] = []
        self.stopped_checkpoint: str | None = None

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
        if batch_idx < self.data_check_batches and trainer.current_epoch == 0:
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
        named = [(n, p) for n, p in self._parameters(pl_module, refresh=log_now) if p.grad is not None]
        if named:
            # One fused kernel over every gradient, one host sync: cheap enough for every step.
            norms = torch.stack(torch._foreach_norm([p.grad.detach() for _, p in named])).float()
            total = float(norms.norm())
            self._check_gradients(trainer, named, norms, total)
            if log_now:
                self._log_gradients(trainer, named, norms, total)
        if log_now:
            self._weights_before = [p.detach().clone() for _, p in self._parameters(pl_module, refresh=False)]
        self._act(trainer, pl_module, optimizer)

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
        per-layer statistics are hundreds of keys. Loggers write on rank 0 only, as they do for ``self.log``."""
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _act(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        pending, self._pending = self._pending, []
        actionable = [
            a for a in pending if a["kind"] in ("nan_loss", "nan_grad", "loss_spike", "exploding_grad")
        ]
        if not actionable or self.action == "warn":
            return
        if self.action == "stop" and self.stopped_checkpoint is None:
            # The optimizer has not stepped yet: these weights are still healthy.
            path = Path(self._report_dir(trainer)) / f"before-anomaly-step{trainer.global_step}.ckpt"
            trainer.save_checkpoint(path)
            self.stopped_checkpoint = str(path)
            trainer.should_stop = True
        for group in optimizer.param_groups:  # skip this update: optimizers ignore parameters without grads
            for p in group["params"]:
                p.grad = None
        for anomaly in actionable:
            anomaly["action"] = self.action

    # ------------------------------------------------------------ statistics
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._weights_before is None:  # not a logging step
            return
        before, self._weights_before = self._weights_before, None
        named = self._parameters(pl_module, refresh=False)
        params = [p.detach() for _, p in named]
        update = float(torch.stack(torch._foreach_norm(torch._foreach_sub(params, before))).norm())
        weight = float(torch.stack(torch._foreach_norm(before)).norm())
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
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            metrics["monitor/cuda_allocated_gb"] = torch.cuda.memory_allocated(pl_module.device) / 2**30
            metrics["monitor/cuda_reserved_gb"] = torch.cuda.memory_reserved(pl_module.device) / 2**30
            with contextlib.suppress(Exception):  # NVML (pynvml) absent
                metrics["monitor/gpu_utilization"] = float(torch.cuda.utilization(pl_module.device))
        if self.per_layer:
            metrics.update(self._weight_statistics(named))
        self._log(trainer, metrics)

    @staticmethod
    @torch.no_grad()
    def _weight_statistics(named: list[tuple[str, Tensor]]) -> dict[str, float]:
        """Mean, std and max |w| of every weight matrix, from fused norms and one host sync.

        std comes from the L2 norm and the mean (``E[w^2] - E[w]^2``), max |w| from the infinity norm, so
        the whole model costs three multi-tensor kernels and a stack instead of three reductions and three
        syncs per tensor.
        """
        weights = [(n, p.detach()) for n, p in named if p.ndim > 1]  # weights, not biases / norms
        if not weights:
            return {}
        tensors = [w for _, w in weights]
        sizes = torch.tensor([w.numel() for w in tensors], dtype=torch.float64)
        means = torch.stack([w.mean() for w in tensors]).double().cpu()
        l2 = torch.stack(torch._foreach_norm(tensors)).double().cpu()
        peak = torch.stack(torch._foreach_norm(tensors, ord=math.inf)).double().cpu()
        variance = (l2.square() / sizes - means.square()).clamp(min=0) * sizes / (sizes - 1).clamp(min=1)
        metrics = {}
        for (name, _), mean, std, top in zip(
            weights, means.tolist(), variance.sqrt().tolist(), peak.tolist()
        ):
            metrics[f"monitor/weight_mean/{name}"] = mean
            metrics[f"monitor/weight_std/{name}"] = std
            metrics[f"monitor/weight_max/{name}"] = top
        return metrics

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
            "stopped_checkpoint": self.stopped_checkpoint,
        }

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        report = self.report()
        directory = Path(self._report_dir(trainer))
        (directory / "training_report.json").write_text(json.dumps(report, indent=2, default=str))
        lines = ["# Training report", "", "| metric | value |", "|---|---|"]
        lines += [
            f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
            for k, v in report["summary"].items()
        ]
        lines += ["", f"## Anomalies ({len(report['anomalies'])})", ""]
        lines += [
            f"- step {a['step']}: **{a['kind']}** {a['message']}"
            + (f" ({a['action']})" if "action" in a else "")
            for a in report["anomalies"][:100]
        ]
        lines += [
            "",
            "## Recommendations",
            "",
            *(f"- {r}" for r in report["recommendations"] or ["None: no anomalies seen."]),
        ]
        if report["stopped_checkpoint"]:
            lines += ["", f"Stopped; the last healthy weights are in `{report['stopped_checkpoint']}`."]
        (directory / "training_report.md").write_text("\n".join(lines) + "\n")
