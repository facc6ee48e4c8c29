"""ESM-2 t33_650M built on the meta device starts under FSDP2 on 2 CPU processes, each holding half."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from zoo.strategies import empty_parameters, materialize_parameters

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).with_name("meta_init_run.py")


def test_esm2_650m_meta_init_under_fsdp2_holds_half_per_rank(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "t33_650M"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    total = ranks[0]["total_bytes"]
    assert total > 2.5e9  # 650M float32 parameters
    for rank in ranks:
        assert not rank["any_meta"] and rank["finite"]
        assert abs(rank["local_bytes"] / total - 0.5) < 0.01, rank  # uneven dims leave shards a few KB apart
    assert sum(r["local_bytes"] for r in ranks) == total
    assert ranks[0]["val_loss"] == ranks[1]["val_loss"] < 4.0  # a sane init: about ln(33) at the start


def test_empty_parameters_keeps_buffers_and_ties():
    """Parameters are built on meta, buffers for real; materialising keeps tied weights tied."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10)
            self.head.weight = self.embed.weight
            self.register_buffer("scale", torch.arange(4.0))

    with empty_parameters():
        model = Tied()
    assert all(p.is_meta for p in model.parameters()) and torch.equal(model.scale, torch.arange(4.0))
    assert materialize_parameters(model, "cpu") == 2  # the shared weight once, the head's bias
    assert model.head.weight is model.embed.weight and not model.embed.weight.is_meta
    assert torch.isfinite(model.head(model.embed(torch.tensor([1])))).all()
