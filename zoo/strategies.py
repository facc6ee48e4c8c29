"""Lightning strategies that read the model's ``sharding_units``, so one YAML file serves every family.

``FSDPStrategy`` and ``DeepSpeedStrategy`` take the block classes to wrap or to checkpoint as Python
objects, which a strategy YAML written once for all models cannot name. The subclasses here take
switches instead (``auto_wrap: true``, ``activation_checkpointing: true``) and fill in the classes from
``lightning_module.sharding_units`` when the trainer sets the strategy up. Enum-valued FSDP options
(``backward_prefetch``, ``sharding_strategy``) are accepted as strings for the same reason.

FSDP2 (``ModelParallelStrategy``) needs no subclass: ``ZooModule.configure_model`` shards the same units.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from torch import nn

__all__ = [
    "ShardingUnitsDeepSpeed",
    "ShardingUnitsFSDP",
    "apply_activation_checkpointing",
    "empty_parameters",
    "materialize_parameters",
    "sharding_units_of",
]


@contextmanager
def empty_parameters() -> Iterator[None]:
    """Build models with their parameters on the meta device (no memory), buffers real.

    ``torch.device("meta")`` (Lightning's ``init_module(empty_init=True)``) also empties buffers, and
    ``reset_parameters`` does not refill computed ones such as ESM-2's rotary ``inv_freq``; buffers are
    small, so they are built for real here. Under FSDP2 ``ZooModule.configure_model`` materialises the
    parameters one sharding unit at a time (``materialize_parameters``) right before sharding it.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, parameter: nn.Parameter | None) -> None:
        if parameter is not None and parameter.device.type != "meta":
            parameter = nn.Parameter(parameter.detach().to("meta"), requires_grad=parameter.requires_grad)
        register(module, name, parameter)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def materialize_parameters(module: nn.Module, device: torch.device | str) -> int:
    """Give ``module``'s meta parameters real storage on ``device`` and initialise them.

    A submodule owning a meta parameter is initialised by the model's ``init_weights(submodule)`` when the
    model (``module`` or, for a unit, the model it is passed from) defines one, else by its own
    ``reset_parameters()`` (PyTorch's default, as Lightning's materialisation does); a submodule with
    neither gets zeros for 1-D parameters (biases) and normal(0, 0.02) for the others. Tied parameters
    stay tied. Parameters already real (or sharded) are left alone. Returns how many were materialised.
    """
    made: dict[int, nn.Parameter] = {}
    initialise = getattr(module, "init_weights", None)
    for owner in [m for m in module.modules() if any(p.is_meta for p in m.parameters(recurse=False))]:
        fresh = []
        for name, parameter in list(owner._parameters.items()):
            if parameter is None or not parameter.is_meta:
                continue
            if id(parameter) not in made:
                real = torch.empty_like(parameter, device=device)
                made[id(parameter)] = nn.Parameter(real, requires_grad=parameter.requires_grad)
                fresh.append(made[id(parameter)])
            owner._parameters[name] = made[id(parameter)]
        with torch.no_grad():
            if callable(initialise):
                initialise(owner)
            elif callable(reset := getattr(owner, "reset_parameters", None)):
                reset()
            else:
                for parameter in fresh:
                    parameter.zero_() if parameter.dim() == 1 else parameter.normal_(0.0, 0.02)
    return len(made)


def sharding_units_of(module: nn.Module) -> tuple[type[nn.Module], ...]:
    """The module's declared ``sharding_units``; an empty tuple is an error, as nothing would be wrapped."""
    units = tuple(getattr(module, "sharding_units", ()) or ())
    if not units:
        raise ValueError(
            f"{type(module).__name__} declares no `sharding_units`: list its repeated block classes "
            "(e.g. the transformer layer) so the strategy knows what to wrap"
        )
    return units


def apply_activation_checkpointing(module: nn.Module, units: tuple[type[nn.Module], ...]) -> int:
    """Wrap every instance of ``units`` in torch's non-reentrant checkpoint wrapper; returns how many."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        CheckpointWrapper,
        checkpoint_wrapper,
    )
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing as torch_apply,
    )

    if any(isinstance(m, CheckpointWrapper) for m in module.modules()):
        return 0
    count = sum(isinstance(m, units) for m in module.modules())

    def wrapper(m: nn.Module) -> nn.Module:
        return checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT)

    torch_apply(module, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: isinstance(m, units))
    return count


class ShardingUnitsFSDP(FSDPStrategy):
    """``FSDPStrategy`` whose auto-wrap and activation-checkpointing policies are the model's ``sharding_units``.

    Args:
        auto_wrap: wrap each ``sharding_units`` instance as its own FSDP unit (else one flat unit).
        activation_checkpointing: recompute each unit's activations in backward (less memory, ~1/3 more compute).
        sharding_strategy: ``FULL_SHARD`` (ZeRO-3), ``SHARD_GRAD_OP`` (ZeRO-2), ``HYBRID_SHARD`` (full shard
            within a node, replicate across nodes; give ``device_mesh: [num_nodes, gpus_per_node]``),
            ``_HYBRID_SHARD_ZERO2`` or ``NO_SHARD``.
        backward_prefetch: ``BACKWARD_PRE`` (prefetch the next unit's parameters before the current
            gradient computation: fastest, most memory), ``BACKWARD_POST`` or ``None``.
        forward_prefetch: prefetch the next unit's all-gather in forward (CPU-bound models gain).
        cpu_offload: keep parameters and gradients on the CPU between uses (the optimizer steps there).
        device_mesh: ``[num_nodes, gpus_per_node]`` for the hybrid strategies.
        Further keyword arguments go to ``FSDPStrategy`` (``state_dict_type``, ``limit_all_gathers``...).
    """

    def __init__(
        self,
        auto_wrap: bool = True,
        activation_checkpointing: bool = False,
        sharding_strategy: str = "FULL_SHARD",
        backward_prefetch: Literal["BACKWARD_PRE", "BACKWARD_POST"] | None = "BACKWARD_PRE",
        forward_prefetch: bool = False,
        cpu_offload: bool = False,
        device_mesh: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> None:
        from torch.distributed.fsdp import BackwardPrefetch

        if backward_prefetch is not None:
            kwargs["backward_prefetch"] = BackwardPrefetch[backward_prefetch]
        if device_mesh is not None:  # (replicas, shards per replica): the hybrid strategies' 2-D layout
            kwargs["device_mesh"] = tuple(device_mesh)
        super().__init__(
            sharding_strategy=sharding_strategy,
            cpu_offload=cpu_offload,
            forward_prefetch=forward_prefetch,
            **kwargs,
        )
        self.auto_wrap = auto_wrap
        self.activation_checkpointing = activation_checkpointing

    def resolve_sharding_units(self, module: nn.Module) -> None:
        """Fill the wrap / checkpoint policies from ``module.sharding_units`` (idempotent)."""
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        if not (self.auto_wrap or self.activation_checkpointing):
            return
        units = sharding_units_of(module)
        if self.auto_wrap and "auto_wrap_policy" not in self.kwargs:
            self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(set(units))
        if self.activation_checkpointing and not self._activation_checkpointing_kwargs:
            self._activation_checkpointing_kwargs = {"auto_wrap_policy": ModuleWrapPolicy(set(units))}

    def setup(self, trainer) -> None:
        self.resolve_sharding_units(self.lightning_module)
        super().setup(trainer)


class ShardingUnitsDeepSpeed(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` with activation checkpointing of the model's ``sharding_units``.

    DeepSpeed's own activation checkpointing needs ``deepspeed.checkpointing.checkpoint`` calls inside the
    model's forward; wrapping the units with torch's non-reentrant checkpoint wrapper gives the same memory
    saving to any family without touching its code. ``force_ds_cpu_optimizer: false`` lets a torch optimizer
    (the zoo's YAML default, AdamW) step on offloaded states; name ``deepspeed.ops.adam.DeepSpeedCPUAdam`` as
    the model's optimizer for DeepSpeed's faster CPU kernel instead. Further keyword arguments go to
    ``DeepSpeedStrategy`` (``stage``, ``offload_optimizer``, ``offload_parameters``...).
    """

    def __init__(
        self, activation_checkpointing: bool = False, force_ds_cpu_optimizer: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.activation_checkpointing = activation_checkpointing
        if isinstance(self.config, dict):
            self.config.setdefault("zero_force_ds_cpu_optimizer", force_ds_cpu_optimizer)

    def setup(self, trainer) -> None:
        if self.activation_checkpointing:
            apply_activation_checkpointing(self.lightning_module, sharding_units_of(self.lightning_module))
        super().setup(trainer)
