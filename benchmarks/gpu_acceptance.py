"""GPU acceptance: every figure the zoo claims on one H100/H200-class GPU, in one run of at most 8 minutes.

Sections, each with its own time budget; a section that fails, crashes or runs out of time is recorded as
such in the JSON (with whatever figures it had) and the run goes on:

1. ``esm2_training``: ESM-2 t33_650M (``configs/protein/sizes/esm2_t33_650M_UR50D.yaml``, random weights) trained
   by masked LM with the zoo's ``Trainer`` + ``ESM2MaskedLM``, bf16-mixed, 1,024-token crops: tokens/s/GPU and
   MFU, eager and ``torch.compile``; FLOPs counted by ``zoo.callbacks.ThroughputMonitor`` on the first batch,
   the peak from ``zoo.flops.peak_flops``. Anchors: BioNeMo ~96k tokens/s/GPU at ~59% MFU on an H100,
   fair-esm about half of that.
2. ``vit_training``: ViT-B/16 at 224 px, training images/s of the zoo's ``Trainer`` + ``ImageClassifier`` and of
   a plain PyTorch loop (same weights, AdamW, batches), in float32 and in bf16-mixed with channels-last.
3. ``ldm_sampling``: DDIM sampling time of ``zoo.diffusion.sampling.sample`` vs diffusers' ``DDIMPipeline`` on
   the same UNet and seed (``benchmarks/ldm_sampling.py``'s ``throughput``).
4. ``bevformer_inference``: BEVFormer-tiny (``configs/bev/sizes/bevformer_tiny.yaml``) frame-by-frame
   inference as at test time (previous BEV carried over, boxes decoded), six 480 x 800 cameras, batch 1: FPS
   and peak memory, float32 and float16 autocast (anchor: 15.9 FPS on an RTX 3090, PyTorch); plus one encoder
   layer's latency (``benchmarks/bev_scaling.py``'s ``measure``).
5. ``torchao_inference``: ESM-2 t33_650M inference in bf16 vs torchao int8 (dynamic, the zoo's
   ``quantize_dynamic_int8``; weight-only) and weight-only int4 (tinygemm): latency, tokens/s, memory and
   agreement of the logits with bf16 (``benchmarks/esm2_inference.py``'s batches and ``measure``).
6. ``gpu_tests``: ``pytest -m gpu`` (FSDP1, DeepSpeed ZeRO-2/3 ...): pass/fail counts, with the time left.

Each section runs in a child process forked from this one (the libraries are imported once, here; CUDA is
initialised only in the children), so a hard time limit can stop it, a CUDA error or an out-of-memory cannot
spoil the next one, and its peak-memory figures are its own. A section writes its figures as it goes, so one
stopped by its limit keeps what it measured.

    python benchmarks/gpu_acceptance.py                     # on the GPU machine: writes results/gpu_acceptance.json
    python benchmarks/gpu_acceptance.py --only esm2_training vit_training --total-budget 300
    OMP_NUM_THREADS=1 python benchmarks/gpu_acceptance.py --cpu-smoke --output /tmp/acceptance.json

``--cpu-smoke`` runs every section on the CPU with tiny sizes (2-3 steps; the GPU tests are collected, not run;
torchao's int4 kernel, CUDA-only, is recorded as skipped with the reason) so that the script is tested where
no GPU is. Prints a table; the exit status is 1 when a section failed or ran out of time. Without a GPU (and
without ``--cpu-smoke``) it measures nothing, says so and exits 0, so that ``make bench`` goes on.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import gc
import importlib
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results" / "gpu_acceptance.json"
ESM2_CONFIG = ROOT / "configs" / "protein" / "sizes" / "esm2_t33_650M_UR50D.yaml"
BEV_CONFIG = ROOT / "configs" / "bev" / "sizes" / "bevformer_tiny.yaml"

#: Published figures the measurements are read against.
ANCHORS = {
    "esm2_training": {
        "bionemo_h100_tokens_per_s": 96_000,
        "bionemo_h100_mfu": 0.59,
        "fair_esm_h100_tokens_per_s": 48_000,  # "about half" of BioNeMo's
    },
    "bevformer_inference": {"bevformer_tiny_rtx3090_fps": 15.9},
}

#: Sizes on the GPU, and the tiny ones of ``--cpu-smoke`` (same code, 2-3 steps).
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "gpu": {
        "esm2_training": {"model_kwargs": None, "batch_size": 16, "length": 1024, "warmup": 3, "steps": 8,
                          "compile_backend": "inductor"},
        "vit_training": {"model_name": "vit_base_patch16_224", "img_size": 224, "patch_size": None,
                         "model_kwargs": None, "num_classes": 1000, "batch_size": 128, "warmup": 3, "steps": 10},
        "ldm_sampling": {"image_size": 64, "batch_size": 32, "steps": 50, "repeats": 3},
        "bevformer_inference": {"model_name": None, "img_size": None, "dtypes": ("float32", "float16"),
                                "warmup": 3, "frames": 20, "layer": (50, 6, (15, 25), 5)},
        "torchao_inference": {"model_kwargs": None, "batch_sizes": (1, 16), "batches": 2, "lengths": (100, 400),
                              "repeats": 5, "group_size": 128},
    },
    "cpu-smoke": {
        "esm2_training": {"model_kwargs": {"num_layers": 2, "embed_dim": 64, "attention_heads": 4},
                          "batch_size": 2, "length": 32, "warmup": 1, "steps": 2, "compile_backend": "eager"},
        "vit_training": {"model_name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8,
                         "model_kwargs": {"depth": 2}, "num_classes": 10, "batch_size": 4, "warmup": 1,
                         "steps": 2},
        "ldm_sampling": {"image_size": 16, "batch_size": 2, "steps": 2, "repeats": 1},
        "bevformer_inference": {"model_name": "bevformer_cpu", "img_size": (64, 112),
                                "dtypes": ("float32", "bfloat16"), "warmup": 1, "frames": 2,
                                "layer": (8, 1, (4, 6), 1)},
        "torchao_inference": {"model_kwargs": {"num_layers": 2, "embed_dim": 64, "attention_heads": 4},
                              "batch_sizes": (2,), "batches": 1, "lengths": (20, 60), "repeats": 2,
                              "group_size": 32},
    },
}  # fmt: skip

#: Seconds each section may take on the GPU (a hard limit); the GPU tests get what is left of the total (about
#: 100 s of the default 480).
BUDGETS = {"esm2_training": 140, "vit_training": 70, "ldm_sampling": 30, "bevformer_inference": 50,
           "torchao_inference": 70}  # fmt: skip
SMOKE_BUDGET = 60  # per section on the CPU: generous, a smoke section takes a few seconds
START = time.perf_counter()


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s] {message}", flush=True)


# ------------------------------------------------------------------------------------------- recording
class Recorder:
    """A section's record, rewritten to its JSON file at every change: a section stopped keeps its figures."""

    def __init__(self, path: Path, deadline: float) -> None:
        self.path, self.deadline = path, deadline
        self.data: dict[str, Any] = {"status": "running", "figures": {}, "table": []}
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=_jsonable))
        os.replace(tmp, self.path)

    def figure(self, key: str, value: Any) -> None:
        self.data["figures"][key] = value
        self.save()

    def row(self, label: str, text: str) -> None:
        self.data["table"].append([label, text])
        self.save()

    def skip(self, key: str, reason: str) -> None:
        """A part of the section not measured, and why."""
        self.figure(key, {"status": "skipped", "reason": reason})
        self.row(key, f"skipped: {reason}")

    def fail(self, key: str, error: BaseException) -> None:
        """A part of the section that failed; the section goes on and ends ``failed``."""
        self.figure(key, {"status": "failed", "error": _short_error(error)})
        self.row(key, f"FAILED: {_short_error(error)}")
        self.data["failed_parts"] = [*self.data.get("failed_parts", []), key]

    def time_left(self) -> float:
        return self.deadline - time.perf_counter()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _short_error(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"[:400]


def _attempt(recorder: Recorder, key: str, run: Callable[[], None]) -> None:
    """Run one part of a section; an exception is recorded under ``key`` and the section continues."""
    try:
        run()
    except Exception as error:  # every failure is a result here
        traceback.print_exc()
        recorder.fail(key, error)
    finally:
        _release_memory()


@dataclass
class Context:
    smoke: bool
    device: str
    sizes: dict[str, Any]
    work_dir: Path

    def sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _config_value(path: Path, *keys: str) -> Any:
    """A value of a zoo YAML config, looked up through its ``extends`` chain."""
    import yaml

    data = yaml.safe_load(path.read_text())
    node: Any = data
    try:
        for key in keys:
            node = node[key]
        return node
    except (KeyError, TypeError):
        if "extends" not in data:
            raise KeyError(f"{'.'.join(keys)} not in {path}") from None
        return _config_value(path.parent / data["extends"], *keys)


def _quiet_trainer(ctx: Context, **kwargs) -> Any:
    import lightning as L

    defaults = dict(
        accelerator="gpu" if ctx.device == "cuda" else "cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=ctx.work_dir,
    )  # fmt: skip
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def _step_timer(ctx: Context, warmup: int, total: int) -> Any:
    """A callback timing training batches ``warmup`` .. ``total - 1`` (device synchronised), and the first one."""
    import lightning as L

    class StepTimer(L.Callback):
        first_step = elapsed = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx in (0, warmup):
                ctx.sync()
                self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0 and warmup > 0:
                ctx.sync()
                self.first_step = time.perf_counter() - self.started
            if batch_idx == total - 1:
                ctx.sync()
                self.elapsed = time.perf_counter() - self.started

    return StepTimer()


def _metrics_logger() -> Any:
    """A Lightning logger keeping the last value of every metric in memory (the ThroughputMonitor's figures)."""
    from lightning.pytorch.loggers.logger import Logger

    class MemoryLogger(Logger):
        def __init__(self) -> None:
            super().__init__()
            self.metrics: dict[str, float] = {}

        @property
        def name(self) -> str:
            return "memory"

        @property
        def version(self) -> int:
            return 0

        def log_metrics(self, metrics, step=None) -> None:
            self.metrics.update({k: float(v) for k, v in metrics.items()})

        def log_hyperparams(self, params, *args, **kwargs) -> None:
            pass

    return MemoryLogger()


def _peak_memory_mb(ctx: Context) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if ctx.device == "cuda" else None


def _reset_peak(ctx: Context) -> None:
    import torch

    if ctx.device == "cuda":
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------------------------------------- probe
def probe(ctx: Context, recorder: Recorder) -> None:
    """What the run is measured on: the GPU's name and peak, or the CPU's measured matmul rate."""
    import lightning
    import torch

    from zoo.flops import peak_flops

    info: dict[str, Any] = {
        "torch": torch.__version__, "lightning": lightning.__version__, "platform": platform.platform(),
        "threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available(),
    }  # fmt: skip
    if ctx.device == "cuda" and info["cuda_available"]:
        try:
            torch.cuda.init()
        except Exception as error:  # e.g. CUDA initialised before the fork: the parent retries
            info.update(cuda_available=False, cuda_error=_short_error(error))
    if ctx.device == "cuda" and info["cuda_available"]:
        device = torch.device("cuda")
        properties = torch.cuda.get_device_properties(device)
        info.update(
            name=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)),
            memory_gb=properties.total_memory / 2**30, cuda=torch.version.cuda, count=torch.cuda.device_count(),
            cudnn=torch.backends.cudnn.version(),
        )  # fmt: skip
    else:
        device = torch.device("cpu")
        info["name"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    info["peak_bf16_flops"] = peak_flops(device, torch.bfloat16)
    name = str(info["name"]).lower()
    if ("h100" in name or "h200" in name) and (info["peak_bf16_flops"] or 0) > 1.2e15:
        info["peak_note"] = "the peak looks like a with-sparsity figure; the dense bf16 peak is half of it"
    try:
        import torchao

        info["torchao"] = torchao.__version__
    except ImportError:
        info["torchao"] = None
    recorder.data["figures"] = info


# ------------------------------------------------------------------------------------ 1. ESM-2 training
def _protein_batches(count: int, batch_size: int, length: int) -> list[dict]:
    """Full-length random proteins (``<cls>`` + residues + ``<eos>``, no padding): every token is real."""
    import torch

    from zoo.protein import Alphabet

    alphabet = Alphabet()
    generator = torch.Generator().manual_seed(0)
    amino = torch.tensor(alphabet.amino_acid_ids)
    batches = []
    for _ in range(count):
        residues = amino[torch.randint(len(amino), (batch_size, length - 2), generator=generator)]
        cls = torch.full((batch_size, 1), alphabet.cls_idx)
        eos = torch.full((batch_size, 1), alphabet.eos_idx)
        batches.append({"tokens": torch.cat([cls, residues, eos], dim=1)})
    return batches


def esm2_training(ctx: Context, recorder: Recorder) -> None:
    import torch
    from lightning.pytorch.trainer.states import RunningStage
    from torch.utils.data import DataLoader

    from zoo.callbacks import ThroughputMonitor
    from zoo.protein import ESM2MaskedLM

    size = ctx.sizes
    model_name = _config_value(ESM2_CONFIG, "model", "init_args", "model_name")
    optimizer_args = _config_value(ESM2_CONFIG, "model", "init_args", "optimizer", "init_args")
    warmup, steps = size["warmup"], size["steps"]
    distinct = [
        {"tokens": b["tokens"].to(ctx.device)}
        for b in _protein_batches(2, size["batch_size"], size["length"])
    ]
    data = [distinct[i % len(distinct)] for i in range(warmup + steps)]
    tokens_per_batch = size["batch_size"] * size["length"]
    recorder.figure(
        "setup",
        {"config": str(ESM2_CONFIG.relative_to(ROOT)), "model_name": model_name,
         "model_kwargs": size["model_kwargs"], "precision": "bf16-mixed", "batch_size": size["batch_size"],
         "tokens_per_sequence": size["length"],
         "warmup_steps": warmup, "timed_steps": steps, "optimizer": {"AdamW": optimizer_args},
         "anchors": ANCHORS["esm2_training"]},
    )  # fmt: skip
    counted: dict[str, int] = {}

    def run(variant: str, compiled: bool) -> None:
        torch.manual_seed(0)
        with torch.device(ctx.device):
            module = ESM2MaskedLM(
                model_name=model_name, model_kwargs=size["model_kwargs"], lr_scheduler=None,
                optimizer=lambda params: torch.optim.AdamW(
                    params, lr=optimizer_args["lr"], betas=tuple(optimizer_args["betas"]),
                    eps=optimizer_args["eps"], weight_decay=optimizer_args["weight_decay"],
                ),
            )  # fmt: skip
        parameters = sum(p.numel() for p in module.parameters())
        # a window of the timed steps only: the monitor's figures leave the warm-up out, as the timer does
        monitor = ThroughputMonitor(window_size=steps + 1)
        if compiled:  # regional: each transformer layer, compiled once and reused by all 33 (cold start in s)
            for layer in module.model.layers:
                layer.compile(backend=size["compile_backend"])
            if "flops" in counted:  # the eager run counted them: the counter is not run under the compiler
                monitor.flops[RunningStage.TRAINING] = counted["flops"]
        timer, logger = _step_timer(ctx, warmup, warmup + steps), _metrics_logger()
        trainer = _quiet_trainer(
            ctx, precision="bf16-mixed", max_steps=warmup + steps, logger=logger, log_every_n_steps=1,
            callbacks=[monitor, timer],
        )  # fmt: skip
        _reset_peak(ctx)
        trainer.fit(module, DataLoader(data, batch_size=None))
        flops = monitor.flops.get(RunningStage.TRAINING)
        if not compiled and flops:
            counted["flops"] = flops
        seconds = timer.elapsed
        tokens_per_s = steps * tokens_per_batch / seconds
        peak = monitor.available_flops
        mfu = flops * steps / seconds / peak if flops and peak else None
        result = {
            "tokens_per_s_per_gpu": tokens_per_s, "mfu": mfu, "step_seconds": seconds / steps,
            "first_step_seconds": timer.first_step, "flops_per_batch": flops, "peak_flops": peak,
            "parameters": parameters, "peak_memory_mb": _peak_memory_mb(ctx),
            "monitor": {k: v for k, v in logger.metrics.items() if k.startswith("train/")},
            "vs_bionemo_h100": tokens_per_s / ANCHORS["esm2_training"]["bionemo_h100_tokens_per_s"],
        }  # fmt: skip
        if compiled:
            result["compile"] = f"torch.compile of each ESM2Layer, backend {size['compile_backend']}"
        recorder.figure(variant, result)
        mfu_text = f", MFU {mfu:.1%}" if mfu is not None else ""
        recorder.row(
            variant, f"{tokens_per_s:,.0f} tokens/s/GPU{mfu_text}, first step {timer.first_step:.1f} s "
            f"({result['vs_bionemo_h100']:.2f}x BioNeMo's 96k)",
        )  # fmt: skip

    _attempt(recorder, "eager", lambda: run("eager", compiled=False))
    if ctx.device == "cuda" and recorder.time_left() < 0.4 * BUDGETS["esm2_training"]:
        recorder.skip(
            "compiled", f"{recorder.time_left():.0f} s of the section's budget left, too few to compile"
        )
    else:
        _attempt(recorder, "compiled", lambda: run("compiled", compiled=True))


# ------------------------------------------------------------------------------------ 2. ViT training
def vit_training(ctx: Context, recorder: Recorder) -> None:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from vision_throughput import optimizer_for  # the same optimizer as the CPU comparison

    from zoo.flops import count_flops, peak_flops
    from zoo.vision import ImageClassifier

    size = ctx.sizes
    warmup, steps, batch = size["warmup"], size["steps"], size["batch_size"]
    torch.manual_seed(0)
    template = ImageClassifier(
        model_name=size["model_name"], num_classes=size["num_classes"], img_size=size["img_size"],
        patch_size=size["patch_size"], model_kwargs=size["model_kwargs"], optimizer=optimizer_for,
        lr_scheduler=None,
    )  # fmt: skip
    side = size["img_size"]
    generator = torch.Generator().manual_seed(0)
    distinct = [
        {"image": torch.randn(batch, 3, side, side, generator=generator).to(ctx.device),
         "label": torch.randint(size["num_classes"], (batch,), generator=generator).to(ctx.device)}
        for _ in range(2)
    ]  # fmt: skip
    recorder.figure(
        "setup",
        {"model_name": size["model_name"], "img_size": side, "batch_size": batch, "warmup_steps": warmup,
         "timed_steps": steps, "optimizer": "AdamW lr 1e-3, weight decay 0.05 (benchmarks/vision_throughput.py)",
         "data": "random batches already on the device (no input pipeline in the timing)",
         "float32_matmul_precision": torch.get_float32_matmul_precision(),
         "parameters": sum(p.numel() for p in template.parameters())},
    )  # fmt: skip

    def batches(channels_last: bool) -> list[dict]:
        chosen = [distinct[i % len(distinct)] for i in range(warmup + steps)]
        if not channels_last:
            return chosen
        converted = [
            {**b, "image": b["image"].contiguous(memory_format=torch.channels_last)} for b in distinct
        ]
        return [converted[i % len(converted)] for i in range(warmup + steps)]

    def plain(bf16: bool, channels_last: bool) -> float:
        model = copy.deepcopy(template.model).to(ctx.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.train()
        optimizer = optimizer_for(model.parameters())
        for i, b in enumerate(batches(channels_last)):
            if i == warmup:
                ctx.sync()
                start = time.perf_counter()
            with torch.autocast(ctx.device, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(b["image"]), b["label"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        ctx.sync()
        return steps * batch / (time.perf_counter() - start)

    def zoo(bf16: bool, channels_last: bool) -> float:
        module = copy.deepcopy(template)
        if channels_last:
            module.model = module.model.to(memory_format=torch.channels_last)
        timer = _step_timer(ctx, warmup, warmup + steps)
        trainer = _quiet_trainer(
            ctx, precision="bf16-mixed" if bf16 else "32-true", max_steps=warmup + steps, callbacks=[timer]
        )
        trainer.fit(module, DataLoader(batches(channels_last), batch_size=None))
        return steps * batch / timer.elapsed

    flops: dict[str, int] = {}

    def count() -> None:
        model = copy.deepcopy(template.model).to(ctx.device)
        b = distinct[0]
        flops["per_batch"] = count_flops(lambda: F.cross_entropy(model(b["image"]), b["label"]).backward())
        recorder.figure("flops_per_batch", flops["per_batch"])

    _attempt(recorder, "flops_per_batch", count)
    for variant, bf16, channels_last in (("float32", False, False), ("bf16-mixed channels-last", True, True)):

        def run(variant=variant, bf16=bf16, channels_last=channels_last) -> None:
            rates = {"plain_pytorch": plain(bf16, channels_last)}
            _release_memory()
            rates["zoo_trainer"] = zoo(bf16, channels_last)
            peak = peak_flops(torch.device(ctx.device), torch.bfloat16 if bf16 else torch.float32)
            result = {
                "images_per_s": rates,
                "zoo_over_plain": rates["zoo_trainer"] / rates["plain_pytorch"],
                "mfu_zoo": flops["per_batch"] * rates["zoo_trainer"] / batch / peak
                if flops and peak
                else None,
            }
            recorder.figure(variant, result)
            mfu = f", MFU {result['mfu_zoo']:.1%}" if result["mfu_zoo"] is not None else ""
            recorder.row(
                variant, f"zoo {rates['zoo_trainer']:,.1f} img/s, plain {rates['plain_pytorch']:,.1f} img/s, "
                f"ratio {result['zoo_over_plain']:.3f}{mfu}",
            )  # fmt: skip

        _attempt(recorder, variant, run)


# ------------------------------------------------------------------------------------ 3. LDM sampling
def ldm_sampling(ctx: Context, recorder: Recorder) -> None:
    from ldm_sampling import throughput  # the CPU benchmark's comparison, run on this device

    size = ctx.sizes
    result = throughput(size["image_size"], size["batch_size"], size["steps"], size["repeats"], ctx.device)
    result["seconds_per_batch_ours"] = result["batch_size"] / result["images_per_s_ours"]
    result["seconds_per_batch_diffusers"] = result["batch_size"] / result["images_per_s_diffusers"]
    result["sampler"] = f"DDIM, {size['steps']} steps, UNet2DModel (benchmarks/ldm_sampling.py)"
    recorder.figure("ddim", result)
    recorder.row(
        "ddim",
        f"ours {result['seconds_per_batch_ours']:.3f} s, diffusers {result['seconds_per_batch_diffusers']:.3f} s "
        f"per {result['batch_size']} images of {result['image_size']} px; ratio {result['ratio']:.3f}, "
        f"max |diff| {result['max_abs_difference']:.1e}",
    )


# ---------------------------------------------------------------------------------- 4. BEVFormer inference
def bevformer_inference(ctx: Context, recorder: Recorder) -> None:
    import torch

    from zoo.bev import BEVFormerDetector
    from zoo.bev.export import FrameGraph
    from zoo.datamodules.bev_scenes import CAMERA_NAMES, nuscenes_rig

    size = ctx.sizes
    from_config = size["model_name"] is None  # the published size; --cpu-smoke names the CPU-sized model
    model_name = (
        _config_value(BEV_CONFIG, "model", "init_args", "model_name") if from_config else size["model_name"]
    )
    img_size = tuple(
        _config_value(BEV_CONFIG, "data", "init_args", "img_size") if from_config else size["img_size"]
    )
    torch.manual_seed(0)
    detector = BEVFormerDetector(model_name=model_name, max_detections=300).eval().to(ctx.device)
    model = detector.model
    config = model.config
    graph = FrameGraph(model).eval()
    rig = nuscenes_rig(img_size, CAMERA_NAMES[: config.num_cameras])
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(1, config.num_cameras, 3, *img_size, generator=generator).to(ctx.device)
    lidar2img = torch.from_numpy(rig.lidar2img).float()[None].to(ctx.device)
    can_bus = torch.zeros(1, config.can_bus_dims, device=ctx.device)
    can_bus[0, 0] = 0.5  # the ego 0.5 m further on at every frame (2 Hz keyframes at ~4 km/h)
    recorder.figure(
        "setup",
        {"config": str(BEV_CONFIG.relative_to(ROOT)) if from_config else None, "model_name": model_name,
         "img_size": list(img_size), "cameras": config.num_cameras, "bev": [config.bev_h, config.bev_w], "batch_size": 1,
         "parameters": sum(p.numel() for p in model.parameters()),
         "per_frame": "cameras + previous BEV -> BEV, decoder, top-300 boxes decoded (BEVFormer's test mode)",
         "warmup_frames": size["warmup"], "timed_frames": size["frames"],
         "anchors": ANCHORS["bevformer_inference"]},
    )  # fmt: skip

    def frames(count: int, dtype: torch.dtype) -> None:
        prev = torch.zeros(1, config.bev_h * config.bev_w, config.embed_dims, device=ctx.device)
        exists = torch.zeros(1, dtype=torch.bool, device=ctx.device)
        for _ in range(count):
            with (
                torch.inference_mode(),
                torch.autocast(ctx.device, dtype=dtype, enabled=dtype != torch.float32),
            ):
                out = graph(images, lidar2img, can_bus, prev, exists)
                model.head.decode(
                    out["logits"].float(),
                    out["box_codes"].float(),
                    detector.hparams.max_detections,
                    detector.hparams.score_threshold,
                    detector.post_center_range,
                )
            prev, exists = out["bev"].float(), torch.ones_like(exists)

    def run(dtype_name: str) -> None:
        dtype = getattr(torch, dtype_name)
        frames(size["warmup"], dtype)
        ctx.sync()
        weights = torch.cuda.memory_allocated() / 2**20 if ctx.device == "cuda" else None
        _reset_peak(ctx)
        start = time.perf_counter()
        frames(size["frames"], dtype)
        ctx.sync()
        fps = size["frames"] / (time.perf_counter() - start)
        anchor = ANCHORS["bevformer_inference"]["bevformer_tiny_rtx3090_fps"]
        result = {"fps": fps, "latency_ms": 1000 / fps, "peak_memory_mb": _peak_memory_mb(ctx),
                  "allocated_before_mb": weights, "vs_rtx3090_anchor": fps / anchor}  # fmt: skip
        key = f"{dtype_name}" + (" autocast" if dtype != torch.float32 else "")
        recorder.figure(key, result)
        memory = f", peak {result['peak_memory_mb']:,.0f} MiB" if result["peak_memory_mb"] is not None else ""
        recorder.row(
            key, f"{fps:.1f} FPS ({1000 / fps:.1f} ms/frame){memory}; {fps / anchor:.2f}x the 3090's 15.9"
        )

    for dtype_name in size["dtypes"]:
        _attempt(recorder, dtype_name, lambda dtype_name=dtype_name: run(dtype_name))

    def layer() -> None:
        from bev_scaling import measure

        grid, cameras, features, repeats = size["layer"]
        row = measure(grid, cameras, "deformable", repeats, torch.get_num_threads(), ctx.device, features)
        recorder.figure("encoder_layer", row)
        text = f"one encoder layer, grid {grid}, {cameras} cameras: {row['latency_ms']:.1f} ms"
        recorder.row("encoder_layer", f"{text}, {row['peak_mb']:.0f} MiB (benchmarks/bev_scaling.py)")

    _attempt(recorder, "encoder_layer", layer)


# ------------------------------------------------------------------------------------ 5. torchao inference
def torchao_inference(ctx: Context, recorder: Recorder) -> None:
    import torch

    try:
        import torchao.quantization as tq
    except ImportError as error:
        recorder.data.update(
            status="skipped", reason=f"torchao is not installed ({error}): pip install '.[compression]'"
        )
        return
    from esm2_inference import make_batches, measure  # the ESM-2 inference benchmark's batches and timing

    from zoo.callbacks.compression import quantize_dynamic_int8, state_dict_bytes
    from zoo.protein import ESM2

    size = ctx.sizes
    model_name = _config_value(ESM2_CONFIG, "model", "init_args", "model_name")
    torch.manual_seed(0)
    with torch.device(ctx.device):
        base = ESM2.from_config(model_name, **(size["model_kwargs"] or {})).eval().to(torch.bfloat16)
    skip = ("contact_head",)  # not used by forward; its 1-output layer does not fit int4 groups

    def linear(module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and not fqn.startswith(skip)

    group = size["group_size"]
    variants: dict[str, Callable[[torch.nn.Module], Any] | None] = {
        "bf16": None,
        "int8 dynamic": lambda m: quantize_dynamic_int8(m, backend="torchao", skip=skip),
        "int8 weight-only": lambda m: tq.quantize_(m, tq.Int8WeightOnlyConfig(), filter_fn=linear),
        "int4 weight-only": lambda m: tq.quantize_(
            m,
            tq.Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d"),
            filter_fn=linear,
        ),
    }
    low, high = size["lengths"]
    inputs = {
        b: [t.to(ctx.device) for t in make_batches(size["batches"], b, low, high, 0)]
        for b in size["batch_sizes"]
    }
    recorder.figure(
        "setup",
        {"model_name": model_name, "model_kwargs": size["model_kwargs"], "lengths": [low, high],
         "batch_sizes": list(size["batch_sizes"]), "batches": size["batches"], "repeats": size["repeats"],
         "int4_group_size": group, "mode": "eager (no torch.compile)",
         "data": "real proteins of the embedded proteome (benchmarks/esm2_inference.py)"},
    )  # fmt: skip
    with torch.inference_mode():
        reference = base(inputs[size["batch_sizes"][0]][0])["logits"].float()

    def run(name: str, quantize) -> None:
        before = torch.cuda.memory_allocated() if ctx.device == "cuda" else None
        model = copy.deepcopy(base)
        if quantize is not None:
            quantize(model)
        _release_memory()
        result: dict[str, Any] = {}
        if (
            before is not None
        ):  # the model's memory on the GPU (the copy's bf16 weights, once replaced, are freed)
            result["weights_mb"] = (torch.cuda.memory_allocated() - before) / 2**20
        with torch.inference_mode():
            logits = model(inputs[size["batch_sizes"][0]][0])["logits"].float()
        result["logits_cosine_vs_bf16"] = torch.nn.functional.cosine_similarity(
            logits.flatten(), reference.flatten(), dim=0
        ).item()
        for b, batches in inputs.items():
            times, peak = measure(model, batches, torch.device(ctx.device), size["repeats"])
            seconds = statistics.median(times)
            real = sum(int(t.ne(base.alphabet.padding_idx).sum()) for t in batches)
            result[f"batch_{b}"] = {"ms_per_batch": 1000 * seconds / len(batches), "tokens_per_s": real / seconds,
                                    "peak_memory_mb": peak / 2**20}  # fmt: skip
        recorder.figure(name, result)
        result["state_dict_mb"] = state_dict_bytes(model) / 2**20  # its size on disk (torch.save)
        recorder.figure(name, result)
        latency = ", ".join(f"b{b} {result[f'batch_{b}']['ms_per_batch']:.1f} ms" for b in inputs)
        memory = result.get("weights_mb", result["state_dict_mb"])
        recorder.row(
            name,
            f"{latency}; weights {memory:,.1f} MiB; cosine vs bf16 {result['logits_cosine_vs_bf16']:.4f}",
        )
        del model

    for name, quantize in variants.items():
        if name.startswith("int4") and ctx.device != "cuda":
            recorder.skip(name, "torchao's weight-only int4 (tinygemm's tile-packed format) runs on CUDA only "
                          "(compute capability 8.0 or more); this torchao has no CPU kernel for it")  # fmt: skip
            continue
        _attempt(recorder, name, lambda name=name, quantize=quantize: run(name, quantize))


# ---------------------------------------------------------------------------------------- 6. GPU tests
RESULT_LINE = re.compile(r"^(tests/\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", re.MULTILINE)


def start_gpu_tests(smoke: bool) -> tuple[subprocess.Popen, Path]:
    """``pytest -m gpu`` (collection only with ``--cpu-smoke``) in its own process group, output to a file."""
    log = Path(tempfile.mkstemp(prefix="gpu_tests_", suffix=".log")[1])
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider"]
    command += ["--collect-only", "-q"] if smoke else ["-v", "-rfE"]
    with log.open("w") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return process, log


def finish_gpu_tests(process: subprocess.Popen, log: Path, limit: float, smoke: bool) -> dict:
    timed_out = False
    try:
        process.wait(timeout=max(limit, 1))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    output = log.read_text(errors="replace")
    log.unlink(missing_ok=True)
    if smoke:
        collected = re.search(r"(\d+)(?:/\d+)? tests? collected", output)
        count = int(collected.group(1)) if collected else 0
        return {
            "status": "skipped", "reason": "no CUDA device (--cpu-smoke): the gpu-marked tests are collected, not run",
            "figures": {"collected": count, "exit_code": process.returncode},
            "table": [["collected", f"{count} gpu-marked tests"]],
        }  # fmt: skip
    results = {name: outcome for name, outcome in RESULT_LINE.findall(output)}
    counts = {
        k: sum(v == k.upper() for v in results.values()) for k in ("passed", "failed", "error", "skipped")
    }
    selected = re.search(r"collected (\d+) items?(?: / (\d+) deselected)?", output)  # None: out of time first
    total = int(selected.group(1)) - int(selected.group(2) or 0) if selected else None
    not_run = max(total - len(results), 0) if total is not None else None
    figures = {**counts, "selected": total, "not_run": not_run, "exit_code": process.returncode,
               "failures": [n for n, v in results.items() if v in ("FAILED", "ERROR")]}  # fmt: skip
    if figures["failures"] or process.returncode not in (0, 5):
        figures["output_tail"] = output[-4000:]
    passed = process.returncode in (0, 5) and not figures["failures"]  # 5: no gpu-marked test collected
    status = "timeout" if timed_out else ("ok" if passed else "failed")
    text = ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "error", "skipped"))
    text += f", {not_run if not_run is not None else 'all'} not run (out of time)" if timed_out else ""
    return {"status": status, "figures": figures, "table": [["pytest -m gpu", text]]}


# ------------------------------------------------------------------------------------------ the runner
SECTIONS: dict[str, tuple[Callable[[Context, Recorder], None], str]] = {
    "esm2_training": (esm2_training, "ESM-2 t33_650M masked-LM training, bf16-mixed: tokens/s/GPU, MFU; "
                                     "eager and compiled"),
    "vit_training": (vit_training, "ViT-B/16 224 px training img/s: zoo Trainer vs plain PyTorch; float32, "
                                   "bf16 channels-last"),
    "ldm_sampling": (ldm_sampling, "DDIM sampling time: zoo.diffusion.sampling.sample vs diffusers' DDIMPipeline"),
    "bevformer_inference": (bevformer_inference, "BEVFormer-tiny frame-by-frame inference FPS and peak memory"),
    "torchao_inference": (torchao_inference, "ESM-2 t33_650M inference: bf16 vs torchao int8 and int4 weight-only"),
    "gpu_tests": (None, "pytest -m gpu: FSDP1, DeepSpeed ZeRO-2/3 and the other CUDA-only tests"),
}  # fmt: skip


#: Imported before the sections fork: the libraries and the benchmarks whose pieces the sections reuse.
PRELOADED = ("torch", "lightning", "zoo.bev", "zoo.callbacks", "zoo.protein", "zoo.vision", "bev_scaling",
             "esm2_inference", "ldm_sampling", "vision_throughput")  # fmt: skip


def _preload() -> None:
    """Import what the sections use once, here, so that a forked section starts at once (CUDA stays untouched)."""
    from zoo.quiet import silence_third_party_noise

    silence_third_party_noise()
    for module in PRELOADED:
        importlib.import_module(module)

    gc.freeze()  # what is imported stays: a section's gc.collect() scans its own objects only (~1 s less each)


def _child(name: str, ctx: Context, path: Path, deadline: float) -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*validation_step` but have no `val_dataloader.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    import torch

    torch.manual_seed(0)
    recorder = Recorder(path, deadline)
    run = probe if name == "probe" else SECTIONS[name][0]
    try:
        run(ctx, recorder)
        if recorder.data["status"] == "running":
            recorder.data["status"] = "failed" if recorder.data.get("failed_parts") else "ok"
    except Exception as error:  # recorded, and the run goes on in the parent
        traceback.print_exc()
        recorder.data.update(
            status="failed", error=_short_error(error), traceback=traceback.format_exc()[-3000:]
        )
    recorder.save()
    sys.stdout.flush()
    sys.stderr.flush()


def run_isolated(name: str, ctx: Context, limit: float, isolation: str, argv: list[str]) -> dict:
    """Run one section in a child process (``fork`` or ``subprocess``) for at most ``limit`` seconds; return
    its record."""
    path = Path(tempfile.mkstemp(prefix=f"acceptance_{name}_", suffix=".json")[1])
    path.write_text(json.dumps({"status": "not started", "figures": {}, "table": []}))
    started = time.perf_counter()
    sys.stdout.flush()
    sys.stderr.flush()
    if isolation == "fork":
        process = mp.get_context("fork").Process(target=_child, args=(name, ctx, path, started + limit))
        process.start()
        process.join(limit)
        timed_out = process.is_alive()
        if timed_out:
            process.kill()
            process.join()
        exit_code = process.exitcode
    else:
        command = [sys.executable, __file__, *argv, "--run-section", name, "--section-output", str(path),
                   "--section-limit", str(limit)]  # fmt: skip
        child = subprocess.Popen(command, start_new_session=True)
        try:
            exit_code, timed_out = child.wait(timeout=limit), False
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            exit_code, timed_out = child.wait(), True
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        record = {"figures": {}, "table": []}
    path.unlink(missing_ok=True)
    if timed_out:
        record.update(
            status="timeout", reason=f"stopped at its {limit:.0f} s limit; the figures are those it had"
        )
    elif record.get("status") in ("running", "not started"):
        record.update(status="failed", error=f"the section's process died (exit code {exit_code})")
    record["seconds"] = time.perf_counter() - started
    return record


def print_table(result: dict) -> None:
    device = result["device"].get("name", "?")
    seconds, budget = result["total_seconds"], result["total_budget_seconds"]
    print(f"\nGPU acceptance ({result['mode']}) on {device}: {seconds:.0f} s of {budget:.0f}")
    print(f"{'section':<21} {'status':<8} {'s':>6}  figures")
    for name, section in result["sections"].items():
        rows = section.get("table") or [["", section.get("reason") or section.get("error") or ""]]
        for i, (label, text) in enumerate(rows):
            head = f"{name:<21} {section['status']:<8} {section['seconds']:6.1f}" if i == 0 else " " * 37
            print(f"{head}  {label + ': ' if label else ''}{text}")
        if section["status"] not in ("ok", "skipped") and section.get("error"):
            print(f"{'':37}  error: {section['error']}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu-smoke", action="store_true", help="every section on the CPU with tiny sizes")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--total-budget", type=float, help="seconds for the whole run (default 480; smoke 240)"
    )
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run these sections only")
    parser.add_argument("--isolation", choices=["auto", "fork", "subprocess"], default="auto",
                        help="how sections are isolated (auto: fork unless CUDA was initialised here)")  # fmt: skip
    parser.add_argument("--run-section", help=argparse.SUPPRESS)  # internal: one section, in a subprocess
    parser.add_argument("--section-output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--section-limit", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    # torch.cuda.is_available() (which diffusers and torchao call on import) must not initialise CUDA here
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    sys.path.insert(0, str(BENCHMARKS))
    mode = "cpu-smoke" if args.cpu_smoke else "gpu"
    device = "cpu" if args.cpu_smoke else "cuda"
    work_dir = Path(tempfile.mkdtemp(prefix="gpu_acceptance_"))  # the trainers' root: nothing is kept
    atexit.register(
        shutil.rmtree, work_dir, ignore_errors=True
    )  # forked sections leave by os._exit: not theirs

    def context(name: str) -> Context:
        return Context(args.cpu_smoke, device, SIZES[mode].get(name, {}), work_dir)

    if args.run_section:  # a section in a fresh process (isolation "subprocess")
        _preload()
        deadline = time.perf_counter() + args.section_limit
        _child(args.run_section, context(args.run_section), args.section_output, deadline)
        return 0

    total = args.total_budget or (240.0 if args.cpu_smoke else 480.0)
    deadline = START + total
    names = [n for n in SECTIONS if not args.only or n in args.only]
    argv = sys.argv[1:]
    tests = start_gpu_tests(smoke=True) if args.cpu_smoke and "gpu_tests" in names else None
    progress(f"{mode}: importing the libraries")
    _preload()
    import torch

    result: dict[str, Any] = {
        "benchmark": "gpu_acceptance", "mode": mode, "total_budget_seconds": total,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": {}, "sections": {},
    }  # fmt: skip

    def save() -> None:
        result["total_seconds"] = time.perf_counter() - START
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")

    isolation = args.isolation
    # a forked child cannot use CUDA once this process initialised it (nothing here does)
    if isolation == "auto":
        isolation = "subprocess" if torch.cuda.is_initialized() else "fork"
    probe_record = run_isolated("probe", context("probe"), 120, isolation, argv)
    if not args.cpu_smoke and args.isolation == "auto" and probe_record.get("figures", {}).get("cuda_error"):
        error = probe_record["figures"]["cuda_error"]
        progress(f"CUDA failed in a forked child ({error}): each section in a fresh process instead")
        isolation = "subprocess"
        probe_record = run_isolated("probe", context("probe"), 120, isolation, argv)
    result["device"] = probe_record.get("figures", {})
    result["isolation"] = isolation
    result["gpu_name"] = result["device"].get("name")
    if not args.cpu_smoke and not result["device"].get("cuda_available"):
        # nothing to measure: `make bench` goes on, and a GPU run's JSON is not overwritten
        reason = result["device"].get("cuda_error", "no CUDA device")
        print(
            f"{reason}: nothing measured, {args.output} left as it is (--cpu-smoke checks the script on a CPU)"
        )
        return 0
    progress(f"device: {result['gpu_name']}")
    for name in names:
        left = deadline - time.perf_counter()
        if args.cpu_smoke:
            budget = max(left, 30) if name == "gpu_tests" else min(SMOKE_BUDGET, left)
        else:
            budget = min(BUDGETS.get(name, left), left)  # the GPU tests: whatever the sections left
        if budget < 10:
            record = {"status": "timeout", "reason": "not run: the run's total budget was spent", "figures": {},
                      "table": [], "seconds": 0.0}  # fmt: skip
        elif name == "gpu_tests":
            progress(f"{name}: {'collecting' if args.cpu_smoke else 'running'} (limit {budget:.0f} s)")
            started = time.perf_counter()
            record = finish_gpu_tests(*(tests or start_gpu_tests(args.cpu_smoke)), budget, args.cpu_smoke)
            record["seconds"] = time.perf_counter() - started
        else:
            progress(f"{name}: {SECTIONS[name][1]} (limit {budget:.0f} s)")
            record = run_isolated(name, context(name), budget, isolation, argv)
        record.update(what=SECTIONS[name][1], budget_seconds=budget)
        result["sections"][name] = record
        save()
        progress(f"{name}: {record['status']} in {record['seconds']:.1f} s")
    save()
    print_table(result)
    print(f"\nwritten: {args.output}")
    bad = [n for n, s in result["sections"].items() if s["status"] not in ("ok", "skipped")]
    if bad:
        print(f"not passed: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
