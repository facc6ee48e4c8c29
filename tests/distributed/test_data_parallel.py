"""DDP and FSDP2 on 2 gloo CPU processes train the zoo's models like one process on the same global batch."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.runs import run

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("single")
    return {family: run(base / family, family, "single", 3, "--fixed-masks") for family in ("vit", "esm2")}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.parametrize("family", ["vit", "esm2"])
def test_two_processes_match_one(family, strategy, single_runs, tmp_path):
    single = single_runs[family]
    parallel = run(tmp_path, family, strategy, 3, "--fixed-masks")
    assert len(parallel["losses"]) == 3
    torch.testing.assert_close(parallel["losses"], single["losses"], rtol=0, atol=1e-5)
    for name, value in single["weights"].items():
        torch.testing.assert_close(parallel["weights"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    for name, value in single["ema"].items():
        torch.testing.assert_close(parallel["ema"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert parallel["scheduler"]["last_epoch"] == single["scheduler"]["last_epoch"] == 3
