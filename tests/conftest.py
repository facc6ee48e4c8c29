"""Shared fixtures: tiny trainers, data and models, one thread, a private working folder.

Every test starts and ends with the same global torch thread count and environment variables, whatever it
sets inside.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"
#: Seconds a test's ``zoo fit`` subprocess (2 ranks, or a kill-and-resume run) gets before it counts as hung:
#: about a minute alone, several times that on CI's 2 cores beside the other xdist worker.
SUBPROCESS_TIMEOUT = 600
#: ``zoo`` command-line overrides that make configs/bev/bevformer_cpu.yaml a seconds-long run: one small scene
#: of two frames per split, one sample a batch
TINY_BEV_ARGS = [
    '--model.init_args.model_kwargs={"num_query": 20, "bev_h": 12, "bev_w": 12, "encoder_layers": 1, '
    '"decoder_layers": 2}',
    "--data.init_args.img_size=[32, 56]",
    "--data.init_args.train_scenes=1",
    "--data.init_args.val_scenes=1",
    "--data.init_args.test_scenes=1",
    "--data.init_args.frames_per_scene=2",
    "--data.init_args.num_objects=8",
    "--data.init_args.batch_size=1",
]


def pytest_configure(config):
    """Under ``pytest -n N`` (pytest-xdist, what ``make test`` runs) each worker, and every process a test
    starts, computes on one thread: N workers of the default thread count would share the cores N times over,
    which makes each 5-20x slower on a 2-core machine."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def tiny_trainer(root: Path, **kwargs) -> L.Trainer:
    """A quiet CPU trainer writing under ``root``: no logger, checkpoints, progress bar or sanity check."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        deterministic=True,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


@pytest.fixture
def make_trainer(tmp_path):
    """``make_trainer(max_steps=3, ...)``: a ``tiny_trainer`` in the test's temporary folder."""
    return lambda **kwargs: tiny_trainer(tmp_path, **kwargs)


@pytest.fixture(autouse=True)
def _restore_environment():
    """No test leaves an environment variable for the next one. An in-process DDP test sets ``MASTER_PORT``
    (and ``PL_GLOBAL_SEED``), and its rendezvous store can stay open in the worker on that port. Left set, every
    later 2-process ``zoo fit`` of the worker inherited the port: its rank 0 could not bind it and exited, and
    its rank 1 joined the worker's stale store and waited until the test's timeout (measured: ``ss`` showed the
    pytest worker listening on the port the hung rank was connected to)."""
    environment = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(environment)


@pytest.fixture(autouse=True)
def _restore_thread_count():
    """No test leaves the process's torch thread count changed for the next one."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def single_thread():
    """One torch thread: tiny models only pay for OpenMP synchronisation, and a shared CPU makes spinning
    threads 10-100x slower. Restored afterwards by ``_restore_thread_count``."""
    torch.set_num_threads(1)


@pytest.fixture
def run_in_tmp_path(tmp_path, monkeypatch):
    """Trainers without a logger write into the working directory (LoRA adapters...): keep it the test's."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tiny_image_data():
    """A few batches of the embedded shapes."""
    from zoo.datamodules import ImageClassificationDataModule

    return ImageClassificationDataModule(train_size=64, val_size=32, test_size=32, batch_size=16)


@pytest.fixture
def tiny_deit_kwargs() -> dict:
    """DeiT-Ti width, 2 blocks, 8 px tokens on 32 px images."""
    return {"model_name": "deit_tiny_patch16_224", "patch_size": 8, "model_kwargs": {"depth": 2}}
