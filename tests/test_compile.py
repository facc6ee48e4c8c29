"""``compile`` on every family: ``self.model`` is compiled in place by ``ZooModule.configure_model``.

Per family: the compiled network gives the eager one's outputs and gradients, a compiled module trains a step,
its checkpoint has the eager module's keys and loads into one, and a compiled module resumes from it. Then the
callbacks that hold parameters or hooks: EMA, distillation (a teacher, feature hooks, an EMA teacher copied from
the compiled student) and the training monitor's layer trace, each against the same run without compiling;
and DDP/FSDP2 on two processes.

The fast tests compile with ``backend="aot_eager"``: Dynamo's graph capture and AOTAutograd's forward/backward
graphs, the parts that decide what runs, without inductor's C++ code generation, which costs 1-2 minutes per
network on a loaded 2-core CPU (a tiny ViT's first training step: 104 s with inductor, 13 s with aot_eager).
Inductor itself is checked in the ``slow`` tests at the end, against fp32 eager within 1e-4.
"""

from __future__ import annotations

import copy
import inspect
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback
from torch._dynamo.utils import counters

from tests.conftest import REPO_ROOT, tiny_trainer
from zoo.base import ZooModule, compile_options
from zoo.errors import ZooError

AOT = {"backend": "aot_eager"}
ATOL = RTOL = 1e-4  # fp32


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with empty Dynamo caches and counters, and leaves none: compiled entries are kept per
    code object (``nn.Module._call_impl`` for every compiled module), and ``recompile_limit`` (8) counts them
    across all networks of a process; past it Dynamo runs eagerly and a test would compare eager with eager."""
    torch._dynamo.reset()
    counters.clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch._dynamo.config.patch(
        recompile_limit=torch._dynamo.config.recompile_limit
    ):  # compile raises it
        yield
    torch._dynamo.reset()
    counters.clear()
    torch.set_num_threads(threads)


def graphs_compiled() -> int:
    return counters["stats"]["unique_graphs"]


def is_compiled(module: ZooModule) -> bool:
    """Every network the module compiles (``compiled_networks``) is compiled; ``False`` if none is."""
    states = {getattr(n, "_compiled_call_impl", None) is not None for n in module.compiled_networks()}
    assert len(states) == 1, "some of the networks were compiled, not all"
    return states.pop()


# ------------------------------------------------------------------------------------------------- families
@dataclass
class Family:
    """A tiny module of one family (``build(compile)``) and data for a training step."""

    build: Callable[[bool | dict], ZooModule]
    data: Callable[[], L.LightningDataModule]


def _vit(compile, depth: int = 2):
    from zoo.vision import ImageClassifier

    return ImageClassifier(
        "vit_tiny_patch16_224", num_classes=12, img_size=32, patch_size=8,
        model_kwargs={"depth": depth, "embed_dim": 48, "num_heads": 3}, compile=compile,
    )  # fmt: skip


def _vpt(compile):
    from zoo.vision import VisualPromptTuning

    vit = {"model_name": "vit_tiny_patch16_224", "patch_size": 8, "model_kwargs": {"depth": 2}}
    with pytest.warns(UserWarning, match="randomly initialised"):
        return VisualPromptTuning(
            **vit, num_classes=12, img_size=32, num_prompts=2, deep=True, compile=compile
        )


def _images():
    from zoo.datamodules import ImageClassificationDataModule

    return ImageClassificationDataModule(train_size=32, val_size=16, test_size=16, batch_size=16)


PROTEIN_TINY = {"num_layers": 2, "embed_dim": 32, "attention_heads": 2}


def _esm2(compile):
    from zoo.protein import ESM2MaskedLM

    return ESM2MaskedLM(model_kwargs=PROTEIN_TINY, compile=compile)


def _proteins():
    from zoo.datamodules.proteins import ProteinDataModule

    return ProteinDataModule(batch_size=8, max_length=30)


def _esm2_sequence(compile):
    from zoo.protein import ESM2SequencePredictor

    return ESM2SequencePredictor(num_classes=2, model_kwargs=PROTEIN_TINY, compile=compile)


def _labelled_proteins():
    from zoo.datamodules.protein_labels import ProteinLabelDataModule

    return ProteinLabelDataModule(batch_size=8, max_length=30)


def _multitask_data():
    from zoo.datamodules import MultitaskDataModule

    return MultitaskDataModule(train_size=32, val_size=16, test_size=16, batch_size=16)


def _multitask(compile):
    from zoo.multitask import MultitaskModule

    data = _multitask_data()
    return MultitaskModule(
        data.vocab_size, data.tasks, model_name="multitask_tiny", vocab_tokens=data.vocab_tokens,
        tokenizer=data.tokenizer, compile=compile,
    )  # fmt: skip


BEV_SMALL = {"num_query": 20, "bev_h": 12, "bev_w": 12, "encoder_layers": 1, "decoder_layers": 2}


def _bev_data():
    from zoo.datamodules import BEVDetectionDataModule

    return BEVDetectionDataModule(batch_size=2, img_size=(32, 56), queue_length=2, train_scenes=1,
                                  val_scenes=1, test_scenes=1, frames_per_scene=2, num_objects=8)  # fmt: skip


def _bev(compile):
    from zoo.bev import BEVFormerDetector

    data = _bev_data()
    return BEVFormerDetector(model_kwargs=BEV_SMALL, class_names=data.class_names,
                             point_cloud_range=data.point_cloud_range, compile=compile)  # fmt: skip


def _ldm_kwargs() -> dict:
    from tests.diffusion.conftest import TINY_AE, TINY_UNET
    from zoo.diffusion import ClassConditioning, SamplingConfig

    return {"autoencoder": dict(TINY_AE), "scale_factor": 1.0, "img_size": 16, "model_kwargs": dict(TINY_UNET),
            "conditioning": ClassConditioning(dim=16), "num_classes": 12, "sampling": SamplingConfig(steps=2)}  # fmt: skip


def _ldm(compile):
    """The DiT denoiser (the UNet is compiled in the ControlNet case: Dynamo traces it for about a minute)."""
    from tests.diffusion.conftest import TINY_DIT
    from zoo.diffusion import LatentDiffusion

    return LatentDiffusion(
        **{**_ldm_kwargs(), "model_name": "dit", "model_kwargs": dict(TINY_DIT)}, compile=compile
    )


def _controlnet(compile):
    from zoo.diffusion import ControlNetDiffusion

    return ControlNetDiffusion(**_ldm_kwargs(), compile=compile)


def _autoencoder(compile):
    from zoo.diffusion import Autoencoder
    from zoo.diffusion.losses import DiscriminatorConfig

    return Autoencoder(model_kwargs={"base_channels": 8, "norm_num_groups": 8, "latent_channels": 4}, img_size=16,
                       discriminator=DiscriminatorConfig(channels=8, layers=2), compile=compile)  # fmt: skip


def _captioned_images():
    from zoo.datamodules.captioned_images import CaptionedImageDataModule

    return CaptionedImageDataModule(train_size=8, val_size=8, test_size=8, batch_size=8, img_size=16)


FAMILIES = {
    "vit": Family(_vit, _images),
    "vpt": Family(_vpt, _images),
    "esm2": Family(_esm2, _proteins),
    "esm2_sequence": Family(_esm2_sequence, _labelled_proteins),
    "multitask": Family(_multitask, _multitask_data),
    "bev": Family(_bev, _bev_data),
    "ldm": Family(_ldm, _captioned_images),
    "controlnet": Family(_controlnet, _captioned_images),
    "autoencoder": Family(_autoencoder, _captioned_images),
}


def twins(chosen: Family, options: dict) -> tuple[ZooModule, ZooModule]:
    """An eager module and a compiled one with the same weights."""
    torch.manual_seed(0)
    eager = chosen.build(False)
    compiled = chosen.build(options)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_network()  # what configure_model calls under a trainer
    return eager, compiled


def tensors(output) -> list[torch.Tensor]:
    """The tensors of a (nested) output, in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for v in output.values() for t in tensors(v)]
    if isinstance(output, (list, tuple)):
        return [t for v in output for t in tensors(v)]
    if hasattr(output, "to_tuple"):  # diffusers outputs
        return tensors(output.to_tuple())
    return []


def outputs_and_gradients(module: ZooModule, inputs: tuple) -> tuple[list[torch.Tensor], dict]:
    """``module(*inputs)`` in eval mode (no dropout) and the gradients of the sum of its float outputs."""
    module.eval()
    module.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    out = [t for t in tensors(module(*inputs)) if t.is_floating_point()]
    sum(t.float().sum() for t in out).backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return [t.detach() for t in out], grads


# --------------------------------------------------------------------------------------- per family tests
#: Over a minute each test even with aot_eager (2 loaded cores): BEVFormer's spatial attention gathers a
#: data-dependent number of queries (``.item()``), about 20 graphs with graph breaks between them; Dynamo traces
#: diffusers' UNet (the ControlNet case) for 1-2 minutes
SLOW_FAMILIES = ("bev", "controlnet")
PER_FAMILY = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_FAMILIES else n for n in FAMILIES]


@pytest.mark.parametrize("name", PER_FAMILY)
def test_compiled_network_gives_the_eager_outputs_and_gradients(name):
    eager, compiled = twins(FAMILIES[name], AOT)
    assert is_compiled(compiled) and not is_compiled(eager)
    inputs = eager.example_inputs(2)
    expected, expected_grads = outputs_and_gradients(eager, inputs)
    got, grads = outputs_and_gradients(compiled, inputs)
    assert graphs_compiled() > 0  # Dynamo captured graphs: the comparison is not eager against eager
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    assert grads.keys() == expected_grads.keys() and grads
    for key, value in expected_grads.items():
        torch.testing.assert_close(grads[key], value, atol=ATOL, rtol=RTOL, msg=key)


@pytest.mark.parametrize("name", PER_FAMILY)
def test_compiled_module_trains_and_its_checkpoint_is_an_eager_one(name, tmp_path):
    chosen = FAMILIES[name]
    torch.manual_seed(0)
    module, data = chosen.build(AOT), chosen.data()
    trainer = tiny_trainer(tmp_path, max_steps=1, limit_val_batches=0, deterministic=False)
    trainer.fit(module, data)
    assert trainer.global_step == 1 and is_compiled(module)
    assert graphs_compiled() > 0
    path = tmp_path / "step1.ckpt"
    trainer.save_checkpoint(path)

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    eager = chosen.build(False)
    assert list(checkpoint["state_dict"]) == list(eager.state_dict())  # no `_orig_mod.` anywhere
    eager.load_state_dict(checkpoint["state_dict"])  # strict
    assert checkpoint["hyper_parameters"]["compile"] == AOT
    loaded = type(module).load_from_checkpoint(path)  # no trainer: nothing is compiled
    assert not is_compiled(loaded) and loaded.hparams.compile == AOT

    # a compiled module resumes from it: compiled by configure_model, then the base checks the checkpoint's keys
    # against its own (the step after it is in test_checkpoints_cross_between_eager_and_compiled_runs)
    resumed = chosen.build(AOT)
    trainer = tiny_trainer(tmp_path, max_steps=1, limit_val_batches=0, deterministic=False)
    trainer.fit(resumed, chosen.data(), ckpt_path=path)
    assert trainer.global_step == 1 and is_compiled(resumed)
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, checkpoint["state_dict"][key]), key


def test_checkpoints_cross_between_eager_and_compiled_runs(tmp_path):
    """An eager run's checkpoint resumes a compiled run, and the compiled run's resumes an eager one."""
    chosen = FAMILIES["vit"]
    runs = [False, AOT, False]
    path = None
    for step, option in enumerate(runs, start=1):
        module = chosen.build(option)
        trainer = tiny_trainer(tmp_path, max_steps=step, limit_val_batches=0)
        trainer.fit(module, chosen.data(), ckpt_path=path)
        assert trainer.global_step == step
        path = tmp_path / f"step{step}.ckpt"
        trainer.save_checkpoint(path)
    assert graphs_compiled() > 0


def test_compiled_once_and_only_under_a_trainer():
    from zoo.base import RECOMPILE_LIMIT

    torch._dynamo.config.recompile_limit = 8
    module = _vit(AOT)
    module.configure_model()  # as load_from_checkpoint calls it: no trainer, the module stays eager
    assert module.model._compiled_call_impl is None
    module.compile_network()
    compiled = module.model._compiled_call_impl
    assert compiled is not None and torch._dynamo.config.recompile_limit == RECOMPILE_LIMIT
    module.compile_network()  # a trainer calls configure_model again at each fit/validate/test/predict
    assert module.model._compiled_call_impl is compiled
    eager = _vit(False)
    eager.compile_network()
    assert eager.model._compiled_call_impl is None


def test_compile_true_is_torch_defaults_and_bad_options_fail_when_the_module_is_built():
    assert compile_options(True) == {} and compile_options(False) is None and compile_options(None) is None
    assert compile_options({"mode": "max-autotune", "dynamic": False}) == {
        "mode": "max-autotune",
        "dynamic": False,
    }
    bad = {
        "unknown options": {"modes": "default"},
        "not both": {"mode": "default", "options": {"max_autotune": True}},
        "unknown mode": {"mode": "fastest"},
        "unknown backend": {"backend": "nonexistent"},
        "`fullgraph` must be bool": {"fullgraph": "yes"},
        "must be true, false or a dict": "inductor",
    }
    for message, value in bad.items():
        with pytest.raises(ZooError, match=message):
            _vit(value)


def test_compile_is_a_yaml_argument_of_every_family():
    from zoo.bev import BEVFormerDetector
    from zoo.cli import ZooCLI
    from zoo.diffusion import Autoencoder, LatentDiffusion
    from zoo.multitask import MultitaskModule
    from zoo.protein import ESM2MaskedLM, ESM2ResiduePredictor, ESM2SequencePredictor
    from zoo.protein.finetune import ESM2Finetuner
    from zoo.vision import ImageClassifier, VisualPromptTuning

    for cls in (
        ImageClassifier,
        VisualPromptTuning,
        ESM2MaskedLM,
        ESM2Finetuner,
        MultitaskModule,
        BEVFormerDetector,
        LatentDiffusion,
        Autoencoder,
    ):
        parameter = inspect.signature(cls).parameters["compile"]
        assert parameter.default is False and "compile:" in cls.__doc__, cls
    for cls in (ESM2SequencePredictor, ESM2ResiduePredictor):
        assert "compile" in cls(model_kwargs=PROTEIN_TINY, compile=True).hparams
    assert _controlnet(True).hparams.compile is True  # a LatentDiffusion argument, passed through
    config = str(REPO_ROOT / "configs/vision/deit_tiny.yaml")
    for given, expected in (("true", True), ("{mode: max-autotune}", {"mode": "max-autotune"})):
        cli = ZooCLI(args=["--config", config, f"--model.compile={given}"], run=False)
        assert cli.model.hparams.compile == expected
    assert ZooCLI(args=["--config", config], run=False).model.hparams.compile is False


# ------------------------------------------------------------------------------------------------ callbacks
def fit_twins(build: Callable[[bool | dict], ZooModule], callbacks: Callable[[], list], tmp_path, **kwargs):
    """The same seeded run eager and compiled: ``[(module, trainer, callbacks), ...]``."""
    runs = []
    for option in (False, AOT):
        L.seed_everything(0)
        module, made = build(option), callbacks()
        trainer = tiny_trainer(tmp_path / str(bool(option)), callbacks=made, **kwargs)
        trainer.fit(module, _images())
        runs.append((module, trainer, made))
    assert graphs_compiled() > 0
    return runs


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5, msg=name)


def test_ema_follows_the_compiled_network(tmp_path):
    """The EMA is read from the module's parameters by name: compiled in place, they are the network's own, so
    the EMA moves exactly as in the eager run, and validation runs the compiled network on the EMA weights."""
    from zoo.callbacks import EMA

    L.seed_everything(0)
    initial = _vit(False).state_dict()  # what both runs start from
    (eager, eager_trainer, (eager_ema,)), (compiled, trainer, (ema,)) = fit_twins(
        _vit, lambda: [EMA(decay=0.5)], tmp_path, max_steps=3, limit_val_batches=1
    )
    assert ema.num_updates == eager_ema.num_updates == 3
    assert ema.names == eager_ema.names and not any("_orig_mod" in n for n in ema.names)
    moved = [n for n, t in zip(ema.names, ema.ema) if n in initial and not torch.equal(t, initial[n])]
    assert "model.head.weight" in moved and len(moved) > len(ema.names) // 2
    live = dict(compiled.named_parameters())
    assert any(not torch.equal(t, live[n]) for n, t in zip(ema.names, ema.ema) if n in live)  # an average
    for name, a, b in zip(ema.names, ema.ema, eager_ema.ema):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    assert_same_weights(compiled, eager)
    torch.testing.assert_close(
        trainer.callback_metrics["val/loss"], eager_trainer.callback_metrics["val/loss"]
    )


def test_distillation_into_a_compiled_student(tmp_path):
    """A fixed teacher with feature hooks on the compiled student's blocks, and a teacher that is an EMA copy
    of the compiled student (``copy.deepcopy`` gives the copy its own compiled call, on its own weights)."""
    from zoo.callbacks import Distillation, SelfDistillation

    def teacher():
        torch.manual_seed(5)
        return _vit(False)

    def callbacks():
        return [
            Distillation(teacher=teacher(), alpha=0.5, feature_layers={"model.blocks.0": "model.blocks.1"})
        ]

    (eager, eager_trainer, _), (compiled, trainer, _) = fit_twins(
        _vit, callbacks, tmp_path / "fixed", max_steps=2, limit_val_batches=0
    )
    assert trainer.callback_metrics["train/feature_loss"] > 0  # the hooks fired inside the compiled network
    for key in ("train/feature_loss", "train/distill_loss", "train/loss"):
        torch.testing.assert_close(
            trainer.callback_metrics[key], eager_trainer.callback_metrics[key], msg=key
        )
    assert_same_weights(compiled, eager)

    (eager, _, (eager_self,)), (compiled, _, (self_distill,)) = fit_twins(
        _vit, lambda: [SelfDistillation(decay=0.5)], tmp_path / "self", max_steps=3, limit_val_batches=0
    )
    assert_same_weights(self_distill.teacher, eager_self.teacher)
    assert_same_weights(compiled, eager)
    copied = copy.deepcopy(compiled).eval()
    assert copied.model._compiled_call_impl is not compiled.model._compiled_call_impl
    with torch.no_grad():
        copied.model.head.weight.zero_()
        copied.model.head.bias.fill_(1.0)
        images = torch.randn(2, 3, 32, 32)
        assert torch.equal(copied(images), torch.ones(2, 12))  # the copy runs on its own weights
        assert not torch.equal(compiled.eval()(images), torch.ones(2, 12))


def test_training_monitor_traces_a_non_finite_loss_to_a_layer_of_the_compiled_network(tmp_path):
    """The monitor re-runs the step with a forward hook on every submodule: its trace names the same layer as
    in the eager run, at each anomaly (the hooks of an earlier trace must not answer a later one)."""
    from zoo.callbacks import TrainingMonitor
    from zoo.vision import ImageClassifier

    class Poisoned(ImageClassifier):
        """A weight of the second block's MLP is infinite during steps 1 and 3 (restored after them)."""

        def on_train_batch_start(self, batch, batch_idx):
            self._saved = None
            if self.trainer.global_step in (1, 3):
                weight = self.model.blocks[1].mlp.fc2.weight
                self._saved = weight.detach().clone()
                with torch.no_grad():
                    weight[0, 0] = float("inf")

        def on_train_batch_end(self, outputs, batch, batch_idx):
            if self._saved is not None:
                with torch.no_grad():
                    self.model.blocks[1].mlp.fc2.weight.copy_(self._saved)

    def build(compile):
        return Poisoned("vit_tiny_patch16_224", num_classes=12, img_size=32, patch_size=8,
                        model_kwargs={"depth": 2, "embed_dim": 48, "num_heads": 3}, compile=compile)  # fmt: skip

    runs = fit_twins(
        build,
        lambda: [TrainingMonitor(action="skip_step", report_dir=str(tmp_path))],
        tmp_path,
        max_steps=5,
        limit_val_batches=0,
    )
    (_, _, (eager_monitor,)), (_, _, (monitor,)) = runs
    found = [(a["kind"], a["step"], a.get("first_non_finite")) for a in monitor.anomalies]
    expected = [(a["kind"], a["step"], a.get("first_non_finite")) for a in eager_monitor.anomalies]
    assert [(kind, step) for kind, step, _ in expected] == [
        (k, s) for s in (1, 3) for k in ("nan_loss", "nan_grad")
    ]
    assert all(origin["name"] == "model.blocks.1.mlp.fc2" for _, _, origin in expected)
    assert found == expected


# ------------------------------------------------------------------------------------------------ distributed
class RecordCompiled(Callback):
    """Writes, per rank, whether the network was compiled and Dynamo captured graphs (for the CLI run below)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module) -> None:
        compiled = getattr(pl_module.model, "_compiled_call_impl", None) is not None
        graphs = counters["stats"]["unique_graphs"]
        Path(self.directory, f"rank{trainer.global_rank}.txt").write_text(f"{compiled} {graphs}")


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_train_a_compiled_network(strategy, tmp_path):
    """``configure_model`` runs on every rank: FSDP2 shards first, then the network is compiled in place."""
    command = [
        sys.executable, "-m", "zoo", "fit",
        "--config", str(REPO_ROOT / "configs/protein/esm2_t6_8M.yaml"),
        "--config", str(REPO_ROOT / f"configs/strategy/{strategy}.yaml"),
        "--trainer.accelerator=cpu", "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
        "--model.init_args.model_kwargs={num_layers: 2, embed_dim: 32, attention_heads: 2}",
        "--model.init_args.compile={backend: aot_eager}",
        "--data.init_args.max_tokens=256", "--data.init_args.max_length=62",
        "--trainer.callbacks+=tests.test_compile.RecordCompiled", f"--trainer.callbacks.directory={tmp_path}",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in (0, 1):
        compiled, graphs = (tmp_path / f"rank{rank}.txt").read_text().split()
        assert compiled == "True" and int(graphs) > 0, rank


# ------------------------------------------------------------------------------------------------- inductor
#: one-block networks: inductor's code generation and C++ builds grow with the graph (the other families compile
#: with inductor in benchmarks/compile.py)
ONE_BLOCK = {
    "vit": lambda compile: _vit(compile, depth=1),
    "esm2": lambda compile: _esm2_layers(compile, 1),
}


def _esm2_layers(compile, layers: int):
    from zoo.protein import ESM2MaskedLM

    return ESM2MaskedLM(model_kwargs={**PROTEIN_TINY, "num_layers": layers}, compile=compile)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ONE_BLOCK))
def test_inductor_gives_the_eager_outputs_and_gradients(name):
    """PyTorch's default compiler (``compile: true``): code generated and built with the system C compiler."""
    eager, compiled = twins(Family(ONE_BLOCK[name], lambda: None), {})
    inputs = eager.example_inputs(2)
    expected, expected_grads = outputs_and_gradients(eager, inputs)
    got, grads = outputs_and_gradients(compiled, inputs)
    assert graphs_compiled() > 0
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    assert grads.keys() == expected_grads.keys()
    for key, value in expected_grads.items():
        torch.testing.assert_close(grads[key], value, atol=ATOL, rtol=RTOL, msg=key)
