"""Exact resume under DDP and FSDP2 on 2 gloo CPU processes, through ``zoo fit``: one rank is SIGKILLed
mid-epoch, the other must end (not hang), and ``zoo fit ... --ckpt_path last`` on 2 processes ends where an
uninterrupted 2-process run ends, bit for bit, on every rank: weights, optimizer, schedulers, loops, callback
states, generators and the logged metrics. Under FSDP2 ``last.ckpt`` is a sharded directory, compared
consolidated; it is replaced crash-safely (``ResumeCheckpoint._save_checkpoint``): a rank killed while
writing it leaves the previous complete one.
"""

from __future__ import annotations

import os

import pytest

from tests.conftest import CONFIGS
from tests.resume.distributed_harness import (
    assert_same_end,
    assert_same_ranks,
    final_checkpoint,
    fit,
    kill_rank,
    record_ranks,
    zoo_fit_group,
)
from zoo import resume
from zoo.resume import find_last_checkpoint

EVERY = 3  # --resume.every_n_train_steps
STEPS = 16  # 2 epochs of 8 steps (2 ranks x 8 batches of 16 images; 8 token-budget batches for ESM-2)
KILL_AT = 7  # last.ckpt is then step 6's, mid-epoch (a step that logs: log_every_n_steps=2); the resumed
# run crosses the epoch end and its validation

FAMILIES = {
    "vision": [
        *("--config", "deit_tiny", "--model.init_args.model_kwargs={depth: 2}"),
        *(
            "--data.init_args.train_size=256",
            "--data.init_args.val_size=64",
            "--data.init_args.batch_size=16",
        ),
    ],
    "esm2": [
        *(
            "--config",
            "esm2_t6_8M",
            "--model.init_args.model_kwargs={num_layers: 1, embed_dim: 32, attention_heads: 2}",
        ),
        *("--data.init_args.max_tokens=256", "--data.init_args.max_length=62"),
        *("--trainer.limit_train_batches=8", "--trainer.limit_val_batches=2"),
    ],
}
STRATEGIES = {
    "ddp": ["--config", str(CONFIGS / "strategy" / "ddp.yaml")],
    "fsdp2": ["--config", str(CONFIGS / "strategy" / "fsdp2.yaml")],
}
# FSDP2 neither shards nor synchronises buffers: each rank's BatchNorm running statistics (DeiT's convolutional
# stem) are its own, and the checkpoint holds rank 0's, so a resumed rank 1 evaluates with rank 0's statistics
# (val/loss, averaged over ranks, then differs in the 3rd digit). Not a resume matter; timm's patch stem has no
# BatchNorm. Under DDP, rank 0's buffers are broadcast at every forward.
SHARDED_EXTRA = {"vision": ["--model.init_args.stem=patch"], "esm2": []}


def arguments(family: str, strategy: str) -> list[str]:
    extra = SHARDED_EXTRA[family] if strategy == "fsdp2" else []
    common = [
        "--trainer.max_epochs=2",
        "--trainer.log_every_n_steps=2",
        f"--resume.every_n_train_steps={EVERY}",
    ]
    return [*FAMILIES[family], *extra, *STRATEGIES[strategy], *common]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``reference(family, strategy)``: the folder of an uninterrupted 2-process run (each made once)."""
    runs = {}

    def run(family: str, strategy: str):
        if (family, strategy) not in runs:
            root = tmp_path_factory.mktemp(f"{family}-{strategy}-uninterrupted")
            fit(root, *arguments(family, strategy), *record_ranks(root))
            assert final_checkpoint(root, root / "consolidated")["global_step"] == STEPS
            runs[family, strategy] = root
        return runs[family, strategy]

    return run


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.parametrize("family", ["vision", "esm2"])
def test_one_rank_killed_mid_epoch_then_both_resume_from_last(family, strategy, reference, tmp_path):
    full = reference(family, strategy)
    args, killed = arguments(family, strategy), tmp_path / "killed"
    # rank 0 meets the dead peer in its next collective (gloo: "Connection reset by peer") or is killed by
    # Lightning's launcher, which watches rank 1; zoo_fit_group fails the test if any process is left
    status, output = zoo_fit_group(killed, *args, *kill_rank(KILL_AT))
    assert status != 0, output[-3000:]
    saved = find_last_checkpoint(killed)
    assert saved is not None and saved.is_dir() == (strategy == "fsdp2")  # FSDP2: really sharded
    assert final_checkpoint(killed, tmp_path / "saved")["global_step"] == KILL_AT // EVERY * EVERY
    fit(killed, *args, *record_ranks(killed), "--ckpt_path", "last")
    assert_same_end(killed, full, tmp_path / "compared")
    assert_same_ranks(killed, full)


@pytest.mark.distributed
def test_a_rank_killed_while_writing_the_sharded_last_ckpt_leaves_the_previous_one(reference, tmp_path):
    """Without the crash-safe swap the directory would hold step 6's shards with step 3's metadata (measured:
    it loads, silently, and the resumed run ends elsewhere)."""
    full = reference("vision", "fsdp2")
    args, killed = arguments("vision", "fsdp2"), tmp_path / "killed"
    status, output = zoo_fit_group(killed, *args, *kill_rank(2 * EVERY, during_save=True))
    assert status != 0, output[-3000:]
    last = find_last_checkpoint(killed)
    partial = last.parent / resume.PARTIAL
    # the fault struck mid-save: rank 1's shard written, no metadata yet
    assert (partial / "__1_0.distcp").is_file(), sorted(os.listdir(last.parent))
    assert not (partial / ".metadata").exists() and not (partial / "meta.pt").exists()
    assert final_checkpoint(killed, tmp_path / "saved")["global_step"] == EVERY  # the previous one, whole
    fit(killed, *args, *record_ranks(killed), "--ckpt_path", "last")
    assert not partial.exists()  # cleared by the resumed run's first save
    assert_same_end(killed, full, tmp_path / "compared")
    assert_same_ranks(killed, full)


def test_a_sharded_last_ckpt_replaced_when_the_kill_came_is_still_found(tmp_path, monkeypatch):
    """A directory cannot replace another in one rename: killed between ``last.ckpt -> .last.ckpt.previous``
    and ``.last.ckpt.partial -> last.ckpt``, the run resumes from the previous checkpoint."""
    checkpoints = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    for name, content in ((resume.LAST, "step 3"), (resume.PARTIAL, "step 6")):
        (checkpoints / name).mkdir(parents=True)
        (checkpoints / name / "meta.pt").write_text(content)
    real_replace, calls = os.replace, []

    def replace_then_die(source, target):
        calls.append(source)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands for the SIGKILL between the two renames
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        resume._put_in_place(checkpoints / resume.PARTIAL, checkpoints / resume.LAST)
    monkeypatch.setattr(os, "replace", real_replace)
    found = find_last_checkpoint(tmp_path)
    assert found == checkpoints / resume.PREVIOUS and (found / "meta.pt").read_text() == "step 3"

    (checkpoints / resume.PARTIAL / "meta.pt").write_text("step 9")  # the resumed run's first save
    resume._put_in_place(checkpoints / resume.PARTIAL, checkpoints / resume.LAST)
    assert sorted(p.name for p in checkpoints.iterdir()) == [resume.LAST]
    assert find_last_checkpoint(tmp_path) == checkpoints / resume.LAST
    assert (checkpoints / resume.LAST / "meta.pt").read_text() == "step 9"
