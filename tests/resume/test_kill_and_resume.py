"""A ``zoo fit`` killed at a random optimizer step mid-epoch and resumed with ``--ckpt_path last`` ends where
an uninterrupted run with the same seed ends: weights, optimizer, schedulers, EMA, generators and logs.

Every family's default config, shrunk by overrides to seconds, goes through the real CLI three times: the
uninterrupted run, the run killed (``SIGKILL``) at a step inside an epoch, and its resume from ``last``.
Bit-identical (``atol=0``) except where a comment next to the tolerance says why not."""

from __future__ import annotations

import gzip
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import CONFIGS
from tests.resume import harness
from tests.resume.harness import assert_same_end, last_checkpoint, zoo_fit
from zoo.resume import find_last_checkpoint

EVERY = 3  # --resume.every_n_train_steps: a kill loses at most this many steps


@dataclass
class Run:
    """A case: its ``zoo fit`` arguments and the optimizer steps (``trainer.global_step``) it takes."""

    args: list[str]
    steps: int  # in all
    epoch_steps: int  # per epoch
    stride: int = 1  # global steps per batch (2: manual optimization with a generator and a discriminator)
    every: int = EVERY
    atol: float = 0.0
    uncompared: set[str] = field(default_factory=set)  # callback state keys that measure the machine
    uncompared_columns: set[str] = field(default_factory=set)  # metrics.csv columns that do


def kill_step(name: str, run: Run) -> int:
    """A random step (fixed per case) to kill at: one a batch ends on, inside an epoch, and such that the newest
    ``last.ckpt`` before it (every ``run.every`` steps, and at epoch ends) is inside an epoch too, so the
    resume starts mid-epoch."""
    candidates = []
    for step in range(run.stride, run.steps, run.stride):
        saved = max(
            (step - 1) // run.every * run.every,  # the step-triggered save (on a reachable step)
            (step - 1) // run.epoch_steps * run.epoch_steps,
        )
        if step % run.epoch_steps and saved % run.epoch_steps and saved % run.stride == 0 and saved:
            candidates.append(step)
    return random.Random(name).choice(candidates)


def kill_and_resume(root: Path, name: str, run: Run, monkeypatch: pytest.MonkeyPatch | None = None) -> dict:
    """Runs the case uninterrupted, then killed by ``SIGKILL`` mid-epoch and resumed from ``last``; asserts the
    kill landed mid-epoch, lost at most ``run.every`` steps, and both runs ended alike. Returns the end state."""
    resume_every = f"--resume.every_n_train_steps={run.every}"
    zoo_fit(root / "full", *run.args, resume_every)
    assert last_checkpoint(root / "full")["global_step"] == run.steps, "the case's step count is stale"
    kill_at = kill_step(name, run)
    fault = ["--trainer.callbacks+=tests.resume.faults.SignalAtStep", f"--trainer.callbacks.step={kill_at}"]
    zoo_fit(root / "killed", *run.args, resume_every, *fault, expect=-9)
    saved = last_checkpoint(root / "killed")
    assert kill_at % run.epoch_steps, f"step {kill_at} ends an epoch of {run.epoch_steps} steps"
    assert kill_at - run.every <= saved["global_step"] < kill_at, (saved["global_step"], kill_at)
    # the batches of the epoch the checkpoint had seen: the resume starts inside an epoch
    position = saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"]
    epoch_batches = run.epoch_steps // run.stride
    assert 0 < position < epoch_batches, f"last.ckpt after batch {position} of {epoch_batches}: not mid-epoch"
    assert position == saved["global_step"] % run.epoch_steps // run.stride, (position, saved["global_step"])
    zoo_fit(root / "killed", *run.args, resume_every, "--ckpt_path", "last")
    if run.uncompared or run.uncompared_columns:
        assert monkeypatch is not None
        monkeypatch.setattr(
            harness, "UNCOMPARED_CALLBACK_KEYS", harness.UNCOMPARED_CALLBACK_KEYS | run.uncompared
        )
        monkeypatch.setattr(
            harness, "UNCOMPARED_COLUMNS", harness.UNCOMPARED_COLUMNS | run.uncompared_columns
        )
    return assert_same_end(root / "killed", root / "full", atol=run.atol)


# ------------------------------------------------------------------------------------------ vision
SMALL_VISION = [
    *("--data.init_args.train_size=192", "--data.init_args.val_size=64", "--data.init_args.batch_size=32"),
    "--trainer.max_epochs=3",
]


def test_vision(tmp_path):
    """DeiT-Ti: seeded augmentation per sample, a warmup-cosine schedule sized by the run."""
    kill_and_resume(
        tmp_path, "vision", Run(["--config", "deit_tiny", *SMALL_VISION], steps=18, epoch_steps=6)
    )


# ------------------------------------------------------------------------------------------ protein
def small_fasta(path: Path, records: int = 300) -> Path:
    """The first ``records`` proteins of the embedded proteome (most longer than the crop: crops are drawn)."""
    from zoo.datamodules.proteins import embedded_fasta

    with gzip.open(embedded_fasta(), "rt") as file:
        text = file.read()
    path.write_text(">" + ">".join(text.split(">")[1 : records + 1]))
    return path


def test_protein_token_budget_batches(tmp_path):
    """ESM-2's default config: token-budget batches of length-sorted, randomly cropped sequences, and masking
    drawn from the global generator in ``training_step``."""
    args = [
        *("--config", "esm2_t6_8M", f"--data.init_args.fasta={small_fasta(tmp_path / 'small.fasta')}"),
        "--model.init_args.model_kwargs={num_layers: 1, embed_dim: 32, attention_heads: 2}",
        *("--data.init_args.max_length=62", "--data.init_args.max_tokens=1024"),
        *("--data.init_args.val_fraction=0.1", "--trainer.max_epochs=2"),
    ]
    kill_and_resume(tmp_path, "protein", Run(args, steps=32, epoch_steps=16))


# ------------------------------------------------------------------------------------------ multitask
MULTITASK = [
    *("--config", "configs/multitask/arithmetic.yaml", "--trainer.max_epochs=3"),
    *("--data.init_args.val_size=32", "--data.init_args.test_size=32"),
    "--model.init_args.model_kwargs={d_model: 32, num_heads: 4, num_kv_heads: 2, num_layers: 2, decoder_layers: 2}",
]
MULTITASK_CASES = {
    # min_size CombinedLoader: a batch of every task per step, the value task's 8 batches set the epoch
    "static": (["--data.init_args.train_size=512"], 24, 8),
    # GradNorm: learnt task weights (own parameter group), initial losses, renormalised after every step
    "gradnorm": (["--data.init_args.train_size=512", "--model.init_args.weighting=GradNorm"], 24, 8),
    # the proportional task sampler's epoch plan (one task per step); DWA's two epochs of loss history
    "dwa_proportional": (
        [
            *("--data.init_args.train_size=128", "--data.init_args.mode=proportional"),
            "--model.init_args.weighting=DynamicWeightAverage",
        ],
        54,
        18,
    ),
    # learnt log-variances, trained with the model
    "uncertainty": (
        ["--data.init_args.train_size=512", "--model.init_args.weighting=UncertaintyWeighting"],
        24,
        8,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MULTITASK_CASES))
def test_multitask(case, tmp_path):
    extra, steps, epoch_steps = MULTITASK_CASES[case]
    kill_and_resume(tmp_path, f"multitask-{case}", Run([*MULTITASK, *extra], steps, epoch_steps))


# ------------------------------------------------------------------------------------------ BEV
@pytest.mark.slow
def test_bev_temporal(tmp_path):
    """BEVFormer with temporal self-attention: every item is a queue of 2 frames (the previous frame's BEV is
    computed from the queue in the step, so nothing crosses batches)."""
    args = [
        *("--config", "configs/bev/bevformer_cpu.yaml", "--trainer.max_epochs=2"),
        *("--data.init_args.train_scenes=4", "--data.init_args.frames_per_scene=6"),
        *("--data.init_args.val_scenes=1", "--data.init_args.test_scenes=1"),
        "--model.init_args.model_kwargs={num_query: 30, decoder_layers: 1, bev_h: 16, bev_w: 16}",
    ]
    kill_and_resume(tmp_path, "bev", Run(args, steps=12, epoch_steps=6))


# ------------------------------------------------------------------------------------------ diffusion
TINY_AUTOENCODER = "{model_name: kl, model_kwargs: {downsample_factor: 4, latent_channels: 4, base_channels: 8, norm_num_groups: 8}}"
LDM = [
    *("--config", "configs/diffusion/ldm_unet_class.yaml", "--trainer.max_epochs=3"),
    *("--data.init_args.train_size=64", "--data.init_args.val_size=16", "--data.init_args.batch_size=16"),
    # an untrained first stage from an architecture dict, as the shipped config (no stage-1 run needed)
    f"--model.init_args.autoencoder={TINY_AUTOENCODER}",
    "--model.init_args.model_kwargs={block_out_channels: [16, 32], down_block_types: [CrossAttnDownBlock2D,"
    " DownBlock2D], up_block_types: [UpBlock2D, CrossAttnUpBlock2D], layers_per_block: 1, norm_num_groups: 8,"
    " attention_head_dim: 2}",
    *("--model.init_args.conditioning.init_args.dim=16", "--model.init_args.sampling={steps: 3}"),
]


@pytest.mark.slow
def test_latent_diffusion_with_ema(tmp_path):
    """The class-conditional UNet config: noise, timesteps and condition dropout from the global generator, the
    EMA callback's weights, the sample grid every 2 epochs."""
    end = kill_and_resume(tmp_path, "ldm", Run(LDM, steps=12, epoch_steps=4))
    (ema,) = [state for name, state in end["callbacks"].items() if name.startswith("EMA")]
    assert ema["num_updates"] == 12 and len(ema["ema"]) == len(ema["names"]) > 0


@pytest.mark.slow
def test_latent_diffusion_with_cached_latents(tmp_path):
    """``cache_latents=true``: the cache is not checkpointed, so the resumed run encodes again every latent the
    killed run had cached, in other batch compositions."""
    # Not bit-exact: the frozen encoder's convolutions give a sample's latent different last bits in a batch of
    # another size (measured up to 1.3e-6 on these latents), so the resumed steps train on latents a few ulps
    # off and the weights drift by ~2e-6 over these 12 steps. Checkpointing the cache would make it exact at
    # the cost of a latent per training image in every checkpoint.
    run = Run([*LDM, "--model.init_args.cache_latents=true"], steps=12, epoch_steps=4, atol=2e-5)
    kill_and_resume(tmp_path, "ldm-cached", run)


@pytest.mark.slow
def test_autoencoder_with_discriminator(tmp_path):
    """Stage 1 (KL-f4): manual optimization of the autoencoder and the PatchGAN (two optimizer steps per batch
    once the discriminator is on: here from the first step), the generator-step counter that starts it."""
    args = [
        *("--config", "configs/diffusion/autoencoder_kl_f4.yaml", "--trainer.max_epochs=3"),
        *("--data.init_args.train_size=64", "--data.init_args.val_size=16", "--data.init_args.batch_size=16"),
        "--model.init_args.model_kwargs={downsample_factor: 4, latent_channels: 4, base_channels: 8,"
        " norm_num_groups: 8}",
        "--model.init_args.discriminator={start: 0, weight: 0.5, channels: 8, regularizer: none}",
        "--model.init_args.lr_scheduler.init_args.warmup_steps=2",
    ]
    # every=4: global steps go 2, 4, 6...; a save every 2 batches
    kill_and_resume(tmp_path, "autoencoder", Run(args, steps=24, epoch_steps=8, stride=2, every=4))


# ------------------------------------------------------------------------------------------ callbacks
def teacher_checkpoint(root: Path) -> Path:
    """A DeiT-Ti checkpoint written by ``zoo fit`` (it names its class and arguments) after 2 steps."""
    zoo_fit(root, "--config", "deit_tiny", "--data.init_args.train_size=64", "--trainer.max_steps=2")
    path = find_last_checkpoint(root)
    assert path is not None
    return path


@pytest.mark.slow
def test_distillation_from_a_teacher_checkpoint(tmp_path):
    """DeiT-Ti distilled (hard-label DeiT mode) from a teacher checkpoint, with a feature projector whose weights
    live in the callback's state."""
    teacher = teacher_checkpoint(tmp_path / "teacher")
    args = [
        *("--config", "configs/vision/deit_tiny_distilled.yaml", *SMALL_VISION),
        *(
            "--trainer.callbacks+=zoo.callbacks.Distillation",
            f"--trainer.callbacks.teacher_checkpoint={teacher}",
        ),
        *("--trainer.callbacks.mode=deit", "--trainer.callbacks.alpha=0.5"),
        "--trainer.callbacks.feature_layers={model.blocks.11: model.blocks.11}",
    ]
    kill_and_resume(tmp_path, "distillation", Run(args, steps=18, epoch_steps=6))


@pytest.mark.slow
def test_compression_pipeline(tmp_path):
    """The compression config: heads and MLP units pruned in ``setup`` (the resumed run rebuilds the pruned model
    before loading), soft distillation from the dense teacher, dynamic int8 at the end."""
    teacher = teacher_checkpoint(tmp_path / "teacher")
    args = [
        *("--config", "configs/compression/deit_tiny_compress.yaml", *SMALL_VISION),
        f"--trainer.callbacks.init_args.teacher_checkpoint={teacher}",
    ]
    kill_and_resume(tmp_path, "compression", Run(args, steps=18, epoch_steps=6))


# The compression config with its state during training: quantization-aware training (observers and fake
# quantizers sized by what they saw, replayed on the resumed model) and magnitude pruning on a step schedule
# (pruning points before and after the kill, masks kept). Quantization comes before MagnitudePruning: QAT swaps
# the layers that the pruning callback collects in its own setup.
COMPRESSION_DURING_TRAINING = """\
extends: {config}
trainer:
  callbacks:
    - class_path: StructuredPruning
      init_args: {{head_fraction: 0.34, mlp_fraction: 0.5, importance: l2, start_from_teacher: true}}
    - class_path: Quantization
      init_args: {{mode: qat, save_path: compressed.ckpt}}
    - class_path: MagnitudePruning
      init_args: {{target_sparsity: 0.5, start: 2, end: 14, frequency: 3, unit: step, skip: [model.head]}}
    - class_path: Distillation
      init_args:
        teacher: zoo.vision.ImageClassifier
        teacher_checkpoint: {teacher}
        mode: soft
"""


@pytest.mark.slow
def test_compression_with_qat_and_a_pruning_schedule(tmp_path):
    config = tmp_path / "compress_during_training.yaml"
    config.write_text(
        COMPRESSION_DURING_TRAINING.format(
            config=CONFIGS / "compression" / "deit_tiny_compress.yaml",
            teacher=teacher_checkpoint(tmp_path / "teacher"),
        )
    )
    end = kill_and_resume(tmp_path, "compression-qat", Run(["--config", str(config), *SMALL_VISION], 18, 6))
    kinds = [record["kind"] for record in end["zoo_compression"]]
    assert kinds == ["transformer_structured", "int8_prepare"], kinds
    (pruning,) = [state for name, state in end["callbacks"].items() if name.startswith("MagnitudePruning")]
    sparsity = [float((mask == 0).float().mean()) for mask in pruning["masks"].values()]
    assert 0.3 < sum(sparsity) / len(sparsity) < 0.7


@pytest.mark.slow
def test_training_monitor(tmp_path, monkeypatch):
    """``TrainingMonitor``: its loss window, history and anomaly records travel in the checkpoint."""
    args = [
        *("--config", "deit_tiny", *SMALL_VISION, "--trainer.callbacks+=TrainingMonitor"),
        "--trainer.callbacks.log_every_n_steps=3",  # the steps last.ckpt is written at
    ]
    # what the monitor measured of the machine: wall-clock times, throughput, memory, load (the lengths of its
    # timing lists are checked below)
    timings = {"step_times", "samples_per_s", "tokens_per_s", "peak_rss"}
    run = Run(args, 18, 6, uncompared=timings, uncompared_columns={"monitor/cpu_percent"})
    end = kill_and_resume(tmp_path, "monitor", run, monkeypatch)
    resumed = last_checkpoint(tmp_path / "killed")["callbacks"]
    (name,) = [name for name in end["callbacks"] if name.startswith("TrainingMonitor")]
    assert len(end["callbacks"][name]["history"]) == 18
    for key in ("step_times", "samples_per_s"):  # batch start to batch start: none spans the restart
        assert len(resumed[name][key]) == len(end["callbacks"][name][key]) - 1 == 16, key
