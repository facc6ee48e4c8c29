"""Training metrics' accumulated states in a mid-epoch checkpoint: each rank gets its own back when the run
resumes on as many processes (the sums then add in the uninterrupted run's order, bit for bit), rank 0 gets
the ranks' total when it resumes on another number, and checkpoints that stored the total alone still load."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torchmetrics import MetricCollection
from torchmetrics.aggregation import SumMetric

from zoo.base import METRIC_STATES_KEY, ZooModule


class Counting(ZooModule):
    """A module whose one training metric sums what it is given."""

    def __init__(self) -> None:
        super().__init__(optimizer=lambda params: torch.optim.SGD(params, lr=0.1), lr_scheduler=None)

    def configure_models(self) -> None:
        self.model = torch.nn.Linear(1, 1)

    def configure_metrics(self) -> MetricCollection:
        return MetricCollection({"total": SumMetric()})


def on_rank(module: Counting, rank: int, world_size: int) -> Counting:
    fitting = SimpleNamespace(fn="fit")
    module._trainer = SimpleNamespace(world_size=world_size, global_rank=rank, state=fitting)
    return module


def resumed_total(saved: dict, rank: int, world_size: int) -> float:
    module = on_rank(Counting(), rank, world_size)
    module.on_load_checkpoint({METRIC_STATES_KEY: saved})
    module.on_train_start()
    metric = module.stage_metrics("train")["total"]
    return metric.sum_value.item() if metric.update_count else 0.0


def single_process_states(*values: float) -> dict:
    module = on_rank(Counting(), 0, 1)
    for value in values:
        module.update_metrics("train", torch.tensor(value))
    return module._metric_states()


def test_a_rank_gets_its_own_states_back_on_as_many_processes():
    ranks = [single_process_states(1.0, 2.0)["ranks"][0], single_process_states(10.0)["ranks"][0]]
    saved = {"ranks": ranks, "merged": single_process_states(1.0, 2.0, 10.0)["merged"]}
    assert [resumed_total(saved, rank, 2) for rank in range(2)] == [3.0, 10.0]


def test_on_another_number_of_processes_rank_0_carries_the_total():
    ranks = [single_process_states(1.0, 2.0)["ranks"][0], single_process_states(10.0)["ranks"][0]]
    saved = {"ranks": ranks, "merged": single_process_states(1.0, 2.0, 10.0)["merged"]}
    assert resumed_total(saved, 0, 1) == 13.0
    assert [resumed_total(saved, rank, 4) for rank in range(4)] == [13.0, 0.0, 0.0, 0.0]


def test_a_checkpoint_holding_the_total_alone_still_loads():
    legacy = single_process_states(4.0, 5.0)["merged"]  # the flat {metric: state} an earlier version wrote
    assert resumed_total(legacy, 0, 1) == 9.0
    assert resumed_total(legacy, 1, 2) == 0.0
