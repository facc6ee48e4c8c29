"""One short training run of a zoo model, launched by the tests in this folder as a subprocess.

A script, because DDP and ``ModelParallelStrategy`` re-launch the running command once per rank, and
because the resume test kills it with SIGKILL.

    python train_run.py OUT FAMILY STRATEGY MAX_STEPS [--ckpt-every N] [--resume CKPT] [--step-delay S]
                        [--fixed-masks] [--clip NORM] [--accumulate N]

FAMILY is ``vit``, ``esm2``, ``multitask`` or ``ldm`` (tiny sizes); STRATEGY ``single``, ``ddp`` or ``fsdp2`` (2 gloo processes).
The global batch is 8 (4 a rank on 2 processes), 48 samples an epoch (6 steps), so the data each optimizer
step sees is the same for every strategy. Rank 0 writes ``OUT/result.pt``: the global-mean loss of every
step, and at the end the full weights, optimizer and scheduler state, EMA weights and logged metrics.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from zoo.callbacks import EMA
from zoo.checkpointing import AtomicCheckpointIO
from zoo.diffusion import LatentDiffusion
from zoo.multitask import MultitaskModule
from zoo.multitask.tasks import GENERATION, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION, TaskSpec
from zoo.optim import WarmupCosineLR
from zoo.protein import Alphabet, ESM2MaskedLM
from zoo.resume import ResumableDataLoader, ResumeState
from zoo.vision import ImageClassifier

SAMPLES, GLOBAL_BATCH, LENGTH = 48, 8, 16


class ImageSet(Dataset):
    def __init__(self, size: int) -> None:
        g = torch.Generator().manual_seed(1)
        self.images, self.labels = (
            torch.randn(size, 3, 32, 32, generator=g),
            torch.randint(0, 12, (size,), generator=g),
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": self.labels[i]}


class ProteinSet(Dataset):
    """Fixed-length random sequences; ``inputs``/``labels`` mask exactly 3 residues a row (for ``--fixed-masks``)."""

    def __init__(self, size: int) -> None:
        alphabet, g = Alphabet(), torch.Generator().manual_seed(2)
        amino = torch.tensor(alphabet.amino_acid_ids)
        body = amino[torch.randint(len(amino), (size, LENGTH), generator=g)]
        cls, eos = torch.full((size, 1), alphabet.cls_idx), torch.full((size, 1), alphabet.eos_idx)
        self.tokens = torch.cat([cls, body, eos], 1)
        positions = torch.argsort(torch.rand(size, LENGTH, generator=g), 1)[:, :3] + 1
        self.labels = torch.full_like(self.tokens, -100).scatter(
            1, positions, self.tokens.gather(1, positions)
        )
        self.inputs = self.tokens.scatter(1, positions, alphabet.mask_idx)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict:
        return {"tokens": self.tokens[i], "inputs": self.inputs[i], "labels": self.labels[i]}


class FixedMaskESM2(ESM2MaskedLM):
    """The same masks on every strategy: equal token counts per rank make the global loss the mean of ranks'."""

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch["inputs"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        self.log("train/loss", loss, sync_dist=True, batch_size=len(logits))
        return loss


TASKS = [
    TaskSpec("kind", SEQUENCE_CLASSIFICATION, num_classes=3),
    TaskSpec("tags", TOKEN_CLASSIFICATION, num_classes=4),
    TaskSpec("copy", GENERATION, max_target_length=5),
]
VOCAB = 24


class TaskSet(Dataset):
    """Unpadded random sequences for three tasks, so every rank's loss averages the same number of terms."""

    def __init__(self, size: int) -> None:
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(4, VOCAB, (size, LENGTH), generator=g)  # ids 0-3: special tokens
        self.kind = torch.randint(0, 3, (size,), generator=g)
        self.tags = torch.randint(0, 4, (size, LENGTH), generator=g)
        self.targets = torch.randint(4, VOCAB, (size, 5), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        ids, mask = self.ids[i], torch.ones(LENGTH, dtype=torch.bool)
        return {
            "kind": {"input_ids": ids, "padding_mask": mask, "labels": self.kind[i]},
            "tags": {"input_ids": ids, "padding_mask": mask, "labels": self.tags[i]},
            "copy": {"input_ids": ids, "padding_mask": mask, "target_ids": self.targets[i]},
        }


class NoisedImageSet(Dataset):
    """Images with the diffusion noise and timestep each sample gets (see ``FixedNoiseLDM``)."""

    def __init__(self, size: int) -> None:
        g = torch.Generator().manual_seed(4)
        self.images = torch.rand(size, 3, 16, 16, generator=g) * 2 - 1
        self.labels = torch.randint(0, 12, (size,), generator=g)
        self.noise = torch.randn(size, 4, 4, 4, generator=g)
        self.timesteps = torch.randint(0, 1000, (size,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {
            "image": self.images[i],
            "label": self.labels[i],
            "noise": self.noise[i],
            "timestep": self.timesteps[i],
        }


class FixedNoiseLDM(LatentDiffusion):
    """Noise and timesteps come with each sample instead of from a per-rank generator: 1 and N processes then
    draw the same ones for the same samples (condition dropout is off for the same reason)."""

    def draw_noise(self, batch, latents, generator=None):
        return batch["noise"].to(latents), batch["timestep"].to(latents.device)


def batch_fingerprint(batch) -> float:
    """A number that identifies a (possibly nested) batch's samples."""
    if isinstance(batch, dict):
        return sum(batch_fingerprint(v) for v in batch.values())
    return float(batch.float().sum())


class RecordLosses(Callback):
    def __init__(self, delay: float) -> None:
        self.losses, self.batches, self.delay = [], [], delay

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")
        self.losses.append(float(loss))
        self.batches.append(batch_fingerprint(batch))
        time.sleep(self.delay)  # lets the resume test kill the run between two checkpoints


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for name, value in module.state_dict().items():
        value = value.full_tensor() if hasattr(value, "full_tensor") else value
        state[name] = value.detach().clone().cpu()
    return state


def build_model(family: str, fixed_masks: bool):
    optimizer = lambda params: torch.optim.AdamW(params, lr=1e-3)  # noqa: E731
    scheduler = lambda opt: WarmupCosineLR(opt, warmup_steps=2)  # noqa: E731
    if family == "vit":
        return ImageClassifier(
            "vit_tiny_patch16_224",
            num_classes=12,
            img_size=32,
            patch_size=8,
            model_kwargs={"depth": 2, "embed_dim": 48, "num_heads": 3},
            optimizer=optimizer,
            lr_scheduler=scheduler,
        ), ImageSet
    if family == "multitask":
        architecture = {"num_heads": 4, "num_kv_heads": 2, "num_layers": 2, "task_layers": 1}
        return MultitaskModule(
            VOCAB, TASKS, model_name="multitask_tiny", model_kwargs=architecture, optimizer=optimizer,
            lr_scheduler=scheduler,
        ), TaskSet  # fmt: skip
    if family == "ldm":
        from tests.diffusion.conftest import TINY_AE, TINY_UNET
        from zoo.diffusion import ClassConditioning

        return FixedNoiseLDM(
            autoencoder=dict(TINY_AE), scale_factor=1.0, img_size=16, model_kwargs=dict(TINY_UNET), num_classes=12,
            conditioning=ClassConditioning(dim=16, dropout=0.0), optimizer=optimizer, lr_scheduler=scheduler,
        ), NoisedImageSet  # fmt: skip
    cls = FixedMaskESM2 if fixed_masks else ESM2MaskedLM
    architecture = {"num_layers": 2, "embed_dim": 32, "attention_heads": 4}
    return cls(model_kwargs=architecture, optimizer=optimizer, lr_scheduler=scheduler), ProteinSet


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("family", choices=["vit", "esm2", "multitask", "ldm"])
    parser.add_argument("strategy", choices=["single", "ddp", "fsdp2"])
    parser.add_argument("max_steps", type=int)
    parser.add_argument("--ckpt-every", type=int, default=0)
    parser.add_argument("--resume")
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--fixed-masks", action="store_true")
    parser.add_argument("--clip", type=float, help="trainer.gradient_clip_val (global gradient norm)")
    parser.add_argument("--accumulate", type=int, default=1, help="trainer.accumulate_grad_batches")
    args = parser.parse_args()

    L.seed_everything(0)
    processes = 1 if args.strategy == "single" else 2
    strategy = {
        "single": "auto",
        "ddp": DDPStrategy(process_group_backend="gloo"),
        "fsdp2": ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
    }[args.strategy]
    model, dataset_cls = build_model(args.family, args.fixed_masks)
    ema, losses = EMA(decay=0.9, warmup=True), RecordLosses(args.step_delay)
    callbacks = [ema, losses, ResumeState()]
    if args.ckpt_every:
        callbacks.append(
            ModelCheckpoint(
                dirpath=f"{args.out}/checkpoints",
                every_n_train_steps=args.ckpt_every,
                save_top_k=-1,
                save_last=True,
            )
        )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=processes,
        strategy=strategy,
        plugins=[AtomicCheckpointIO()] if args.strategy != "fsdp2" else None,
        max_steps=args.max_steps,
        gradient_clip_val=args.clip,
        accumulate_grad_batches=args.accumulate,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=bool(args.ckpt_every),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.out,
        callbacks=callbacks,
    )
    loader = ResumableDataLoader(dataset_cls(SAMPLES), batch_size=GLOBAL_BATCH // processes, shuffle=True)
    val_loader = ResumableDataLoader(dataset_cls(16), batch_size=GLOBAL_BATCH // processes)
    trainer.fit(model, loader, val_loader, ckpt_path=args.resume)

    weights, ema_state = full_state(model), ema.state_dict()  # collectives under FSDP2: every rank calls
    if trainer.is_global_zero:
        optimizer = trainer.optimizers[0].state_dict() if args.strategy != "fsdp2" else None
        result = {
            "losses": losses.losses,
            "batches": losses.batches,
            "weights": weights,
            "ema": dict(zip(ema_state["names"], ema_state["ema"])),
            "optimizer": optimizer,
            "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "global_step": trainer.global_step,
        }
        Path(args.out).mkdir(parents=True, exist_ok=True)
        torch.save(result, f"{args.out}/result.pt")


if __name__ == "__main__":
    main()
