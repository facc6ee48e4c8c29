"""bf16 mixed precision through `zoo` on CPU: every family trains, validates and predicts with
``--trainer.precision=bf16-mixed``, so dtype mistakes show up before a GPU run does.

CPU autocast lowers matmuls, convolutions and also softmax, log-softmax, sigmoid, sums and norms to bf16
(CUDA keeps several of those in float32), so it is the stricter of the two. Each run checks that

- every training loss is finite and float32 (a loss reduced in bf16 has 8 bits of mantissa);
- no torchmetrics metric is updated with a bf16 tensor (torchmetrics computes in the input's dtype: SSIM
  casts its target down to bf16, accuracy breaks ties differently);
- validation logs its metrics, finite;
- ``zoo predict`` from the checkpoint, still in bf16-mixed, writes records, their tensors in float32
  (written as ``.npz``: numpy has no bf16, so a bf16 tensor in a record fails there).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image
from torchmetrics import Metric

from zoo.cli import ZooCLI
from zoo.predict import RecordPredictionWriter, load_predictions, load_records

from .conftest import CONFIGS, TINY_BEV_ARGS
from .diffusion.conftest import TINY_AE, TINY_DIT, TINY_UNET

LOW_PRECISION = (torch.bfloat16, torch.float16)
COMMON = [
    "--trainer.precision=bf16-mixed",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
FIT = [
    "--trainer.max_steps=2",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.callbacks+=tests.test_bf16.PrecisionChecks",
]
PREDICT = [
    "--trainer.limit_predict_batches=1",
    "--trainer.callbacks+=RecordPredictionWriter",
    "--trainer.callbacks.init_args.tensor_format=npz",
]


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


class PrecisionChecks(Callback):
    """Records each training loss and every low-precision tensor a metric is updated with."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.low_precision_updates: list[str] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        for name, module in pl_module.named_modules():
            if isinstance(module, Metric):
                module.update = self._spy(name, module.update)

    def _spy(self, name: str, update):
        def checked(*args, **kwargs):
            dtypes = {t.dtype for t in _tensors((args, kwargs)) if t.dtype in LOW_PRECISION}
            if dtypes:
                self.low_precision_updates.append(f"{name} <- {sorted(map(str, dtypes))}")
            return update(*args, **kwargs)

        return checked

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.automatic_optimization:
            self.losses.append(outputs["loss"].detach())
        else:  # the autoencoder steps its optimizers itself and logs the generator's loss
            self.losses.append(trainer.callback_metrics["train/loss"].detach())


@dataclass
class Family:
    config: str
    val_metric: str
    options: list[str] = field(default_factory=list)  # fit and predict
    fit: list[str] = field(default_factory=list)
    predict: list[str] = field(default_factory=list)  # `{tmp}` is the test's folder


IMAGES = ["--data.init_args.train_size=32", "--data.init_args.val_size=16", "--data.init_args.batch_size=8"]
PROTEINS = [
    "--model.init_args.model_kwargs={num_layers: 2, embed_dim: 32, attention_heads: 2}",
    "--data.init_args.max_tokens=512",
    "--data.init_args.max_length=126",
    "--data.init_args.predict_path={tmp}/query.fasta",
]
TINY_LDM = [
    f"--model.init_args.autoencoder={TINY_AE}",
    "--model.init_args.conditioning.init_args.dim=16",
    "--model.init_args.sampling.steps=2",
    "--model.init_args.sampling.samples_per_prompt=2",
    "--data.init_args.img_size=16",
    "--data.init_args.train_size=16",
    "--data.init_args.val_size=8",
    "--data.init_args.batch_size=8",
]
FAMILIES = {
    # mixup, cutmix and label smoothing: the soft-target loss is a log-softmax over the logits
    "vision": Family(
        "vision/vit_tiny.yaml", "val/acc", IMAGES, ["--model.init_args.model_kwargs={depth: 2}"]
    ),
    "vision-vpt": Family(
        "vision/vpt_deep.yaml", "val/acc", IMAGES, ["--model.init_args.model_kwargs={depth: 2}"]
    ),
    # the records' contact maps (the checkpoint's hyper-parameters win over predict's command line)
    "protein": Family(
        "protein/esm2_t6_8M.yaml", "val/perplexity", PROTEINS, ["--model.init_args.predict_contacts=true"]
    ),
    "protein-finetune": Family("protein/esm2_t6_8M_membrane.yaml", "val/f1", PROTEINS),
    "multitask": Family(
        "multitask/arithmetic.yaml",
        "val/value/exact_match",  # the generation task, decoded with beams (log-softmax scores, top-k)
        [
            "--model.init_args.model_name=multitask_tiny",
            "--model.init_args.num_beams=2",
            "--data.init_args.train_size=32",
            "--data.init_args.val_size=8",
            "--data.init_args.batch_size=8",
            "--data.init_args.task_batch_sizes={wellformed: 8, roles: 8}",
        ],
        ["--trainer.limit_val_batches=3"],  # one batch of each task
        ["--data.init_args.predict_path={tmp}/expressions.txt"],
    ),
    "diffusion-unet": Family(
        "diffusion/ldm_unet_class.yaml",
        "val/loss",
        [
            *TINY_LDM,
            f"--model.init_args.model_kwargs={TINY_UNET}",
            "--data.init_args.predict_path={tmp}/prompts.txt",
        ],
    ),
    "diffusion-dit": Family(
        "diffusion/ldm_dit_class.yaml",
        "val/loss",
        [
            *TINY_LDM,
            f"--model.init_args.model_kwargs={TINY_DIT}",
            "--data.init_args.predict_path={tmp}/prompts.txt",
        ],
    ),
    "autoencoder": Family(
        "diffusion/autoencoder_kl_f4.yaml",
        "val/ssim",
        [
            f"--model.init_args.model_kwargs={TINY_AE['model_kwargs']}",
            "--model.init_args.discriminator.channels=8",
        ],
        [*IMAGES, "--model.init_args.discriminator.start=1"],  # the second step trains the discriminator
        ["--data=ImageClassificationDataModule", "--data.init_args.predict_path={tmp}/images"],
    ),
    "bev": Family(
        "bev/bevformer_cpu.yaml",
        "val/NDS",
        TINY_BEV_ARGS,
    ),
}


def _write_predict_inputs(folder: Path) -> None:
    (folder / "query.fasta").write_text(">P1\nMKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ\n>P2\nMKVLACLLLAG\n")
    (folder / "expressions.txt").write_text("3+4*2\n(1+2)*3\n7\n")
    (folder / "prompts.txt").write_text("red circle\ngreen cross\n")
    images = folder / "images"
    images.mkdir()
    for i in range(2):
        pixels = np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"image{i}.png")


def _cli(command: str, family: Family, extra: list[str], root: Path) -> ZooCLI:
    options = [arg.replace("{tmp}", str(root)) for arg in [*family.options, *extra]]
    args = [command, "--config", str(CONFIGS / family.config), *COMMON, *options]
    return ZooCLI(args=[*args, f"--trainer.default_root_dir={root}"])


def _numbers(value) -> Iterator[float]:
    """The floats of a JSON record."""
    if isinstance(value, float):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)


def _finite(value) -> bool:
    return bool(torch.isfinite(torch.as_tensor(value, dtype=torch.float32)).all())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_bf16_mixed_trains_validates_and_predicts(name, tmp_path, single_thread):
    family = FAMILIES[name]
    _write_predict_inputs(tmp_path)
    cli = _cli("fit", family, [*FIT, *family.fit], tmp_path)
    (checks,) = [c for c in cli.trainer.callbacks if isinstance(c, PrecisionChecks)]
    assert len(checks.losses) == 2 and all(_finite(loss) for loss in checks.losses), checks.losses
    assert {loss.dtype for loss in checks.losses} == {torch.float32}
    assert checks.low_precision_updates == []
    metrics = cli.trainer.callback_metrics
    assert family.val_metric in metrics, sorted(metrics)
    assert all(_finite(v) for k, v in metrics.items() if k.startswith("val/")), dict(metrics)

    checkpoint = next(tmp_path.rglob("last.ckpt"))
    cli = _cli("predict", family, [*PREDICT, *family.predict, f"--ckpt_path={checkpoint}"], tmp_path)
    (writer,) = [c for c in cli.trainer.callbacks if isinstance(c, RecordPredictionWriter)]
    records = load_records(writer.folder)
    assert records and all("id" in record for record in records)
    for tensors in writer.folder.glob("tensors*"):
        for values in load_predictions(tensors).values():
            for value in values.values():
                assert value.dtype not in LOW_PRECISION and _finite(value)
    for record in records:
        assert all(math.isfinite(v) for v in _numbers(record)), record


BEV_SMALL = {"num_query": 20, "bev_h": 12, "bev_w": 12, "encoder_layers": 1, "decoder_layers": 2}


def test_bev_box_centres_stay_float32_under_autocast(single_thread):
    """The decoder's reference points, from which every box centre is refined, are float32 under bf16 autocast:
    a bf16 sigmoid places a centre in steps of up to 1/256 of the BEV range (measured on these inputs: centres
    0.20 m from float32's over the +-25.6 m range with bf16 references, 0.02 m with float32 ones)."""
    from zoo.bev import BEVFormerDetector

    torch.manual_seed(0)
    detector = BEVFormerDetector(model_kwargs=BEV_SMALL).eval()
    inputs = detector.example_inputs(1)
    references = []
    detector.model.head.register_forward_pre_hook(lambda head, args: references.append(args[1]))
    with torch.no_grad():
        exact = detector.model(*inputs)[1][-1][..., :3]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = detector.model(*inputs)[1][-1][..., :3]
    assert {r.dtype for r in references[1]} == {torch.float32}
    assert mixed.dtype == torch.float32
    assert (mixed - exact).abs().max() < 0.1  # metres


def test_bev_scores_are_ranked_in_float32():
    """bf16 logits are scored by a float32 sigmoid: a bf16 one keeps 3 digits and ties the top-k ranking."""
    from zoo.bev import BEVFormerDetector

    head = BEVFormerDetector(model_kwargs=BEV_SMALL).model.head
    logits = (torch.randn(1, 20, head.num_classes) - 3).bfloat16()
    (decoded,) = head.decode(logits, torch.randn(1, 20, 10), max_detections=50)
    expected = logits.float().sigmoid().flatten().topk(50).values
    torch.testing.assert_close(decoded["scores"], expected, rtol=0, atol=0)
