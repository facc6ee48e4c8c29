"""Task weightings against their published formulas, on hand-made losses."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from zoo.multitask import (
    DynamicWeightAverage,
    GradNorm,
    LossTrend,
    StaticWeighting,
    TaskSpec,
    UncertaintyWeighting,
)
from zoo.multitask.weighting import weighting_from_config

TASKS = [
    TaskSpec("a", "sequence_classification", num_classes=2, loss_weight=2.0),
    TaskSpec("b", "regression"),
    TaskSpec("c", "generation"),
]


def bound(weighting):
    weighting.bind(TASKS)
    return weighting


def test_static_uses_the_declared_loss_weights():
    w = bound(StaticWeighting())
    losses = {"a": torch.tensor(1.0), "b": torch.tensor(3.0), "c": torch.tensor(5.0)}
    assert w(losses).item() == pytest.approx(2 * 1 + 3 + 5)
    assert w.weights() == {"a": 2.0, "b": 1.0, "c": 1.0}
    assert w.parameter_group() is None


def test_uncertainty_weighting_is_kendalls_formula_and_learns():
    w = bound(UncertaintyWeighting())
    with torch.no_grad():
        w.log_variances.copy_(torch.tensor([0.5, -1.0, 0.2]))
    losses = {"a": torch.tensor(1.5), "b": torch.tensor(0.7), "c": torch.tensor(2.0)}
    s = [0.5, -1.0, 0.2]
    expected = 2.0 * math.exp(-s[0]) * 1.5 + 0.5 * math.exp(-s[1]) * 0.7 + math.exp(-s[2]) * 2.0 + sum(s) / 2
    total = w(losses)
    assert total.item() == pytest.approx(expected, rel=1e-6)
    total.backward()
    # d/ds_i (c_i e^{-s_i} L_i + s_i / 2) = -c_i e^{-s_i} L_i + 1/2
    manual = [
        -2.0 * math.exp(-s[0]) * 1.5 + 0.5,
        -0.5 * math.exp(-s[1]) * 0.7 + 0.5,
        -math.exp(-s[2]) * 2.0 + 0.5,
    ]
    torch.testing.assert_close(w.log_variances.grad, torch.tensor(manual))
    group = w.parameter_group()
    assert group["params"] == [w.log_variances] and group["weight_decay"] == 0.0


def test_dwa_is_one_for_two_epochs_then_a_softmax_of_loss_ratios():
    w = bound(DynamicWeightAverage(temperature=2.0))
    w.epoch_end({"a": 1.0, "b": 2.0, "c": 4.0})
    assert w.weights() == {"a": 2.0, "b": 1.0, "c": 1.0}  # prior x 1
    w.epoch_end({"a": 0.5, "b": 2.0, "c": 2.0})
    ratios = torch.tensor([0.5, 1.0, 0.5])
    expected = 3 * torch.softmax(ratios / 2.0, 0) * torch.tensor([2.0, 1.0, 1.0])
    torch.testing.assert_close(w.coefficients(), expected)
    w.epoch_end({"a": 0.5, "b": 1.0, "c": 2.0})  # uses the last two epochs only
    expected = 3 * torch.softmax(torch.tensor([1.0, 0.5, 1.0]) / 2.0, 0) * torch.tensor([2.0, 1.0, 1.0])
    torch.testing.assert_close(w.coefficients(), expected)


def toy_network():
    torch.manual_seed(0)
    shared = nn.Linear(4, 8)
    heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(3))
    x = torch.randn(16, 4)
    h = shared(x).tanh()
    losses = {name: heads[i](h).pow(2).mean() * (i + 1) for i, name in enumerate("abc")}
    return shared, heads, losses


def test_gradnorm_trains_weights_on_the_balance_loss_and_the_network_on_weighted_losses():
    w = bound(GradNorm(alpha=1.5))
    with torch.no_grad():
        w.task_weights.copy_(torch.tensor([1.2, 0.5, 1.3]))
    prior = torch.tensor([2.0, 1.0, 1.0])
    coeff = prior * w.task_weights.detach()
    shared, _, losses = toy_network()
    w(losses, shared.weight).backward()
    # the network sees sum_i w_i L_i only; the balance loss reaches the weights alone
    ref_shared, _, ref_losses = toy_network()
    sum(coeff[i] * ref_losses[n] for i, n in enumerate("abc")).backward()
    torch.testing.assert_close(shared.weight.grad, ref_shared.weight.grad)
    # first step: L(0) = L, so every inverse rate is 1 and the target is the mean of G_i = w_i ||grad_W L_i||
    ref_shared, _, ref_losses = toy_network()
    norms = torch.stack(
        [torch.autograd.grad(ref_losses[n], ref_shared.weight, retain_graph=True)[0].norm() for n in "abc"]
    )
    g = coeff * norms
    manual = torch.sign(g - g.mean()) * prior * norms
    torch.testing.assert_close(w.task_weights.grad, manual)
    with torch.no_grad():
        w.task_weights.sub_(0.3 * w.task_weights.grad)
    w.after_optimizer_step()
    assert w.task_weights.sum().item() == pytest.approx(3.0)
    assert (w.task_weights > 0).all()


def test_gradnorm_inverse_training_rate_uses_the_first_losses():
    shared, _, losses = toy_network()
    w = bound(GradNorm(alpha=1.0))
    w(losses, shared.weight)
    first = w.initial_losses.clone()
    halved = {n: losses[n] * (0.5 if n == "a" else 1.0) for n in losses}
    w.task_weights.grad = None
    w(halved, shared.weight).backward()
    torch.testing.assert_close(w.initial_losses, first)  # L(0) is kept
    assert w.task_weights.grad is not None


def test_loss_trend_boosts_a_stalled_task_and_renormalises():
    w = bound(LossTrend(patience=2, tolerance=0.01, boost=1.5))
    for a, b, c in [(1.0, 1.0, 1.0), (0.8, 1.0, 0.5), (0.6, 1.0, 0.3)]:
        w.epoch_end({"a": a, "b": b, "c": c})
    assert w.stalled().tolist() == [False, True, False]
    current = w.current
    assert current.sum().item() == pytest.approx(3.0)
    assert current[1] > current[0] == current[2]
    assert current[1] / current[0] == pytest.approx(1.5)
    w.epoch_end({"a": 0.4, "b": 0.5, "c": 0.2})  # b falls again: no further boost
    assert current[1] / current[0] == pytest.approx(1.5)


def test_weighting_state_is_in_the_state_dict():
    w = bound(DynamicWeightAverage())
    w.epoch_end({"a": 1.0, "b": 1.0, "c": 1.0})
    w.epoch_end({"a": 0.5, "b": 1.0, "c": 1.0})
    copy = bound(DynamicWeightAverage())
    copy.load_state_dict(w.state_dict())
    assert copy.weights() == w.weights()


@pytest.mark.parametrize(
    "weighting",
    [StaticWeighting(), UncertaintyWeighting(0.5, lr=0.01), DynamicWeightAverage(3.0), GradNorm(alpha=1.0),
     LossTrend(patience=3, boost=2.0)],
    ids=lambda w: type(w).__name__,
)  # fmt: skip
def test_a_weighting_is_built_again_from_its_config(weighting):
    config = weighting.config()
    rebuilt = weighting_from_config(config)
    assert type(rebuilt) is type(weighting) and rebuilt.config() == config
    bound(rebuilt).load_state_dict(bound(weighting).state_dict())
    with pytest.raises(ValueError, match=r"'torch\.nn\.Linear' is not a TaskWeighting"):
        weighting_from_config({"class_path": "torch.nn.Linear", "init_args": {}})
