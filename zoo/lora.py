"""LoRA adapters, one description for every family (ESM-2 fine-tuning, latent diffusion).

``LoRAConfig`` is a part (``zoo.parts``): a YAML group such as ``lora: {rank: 8, alpha: 16}``, saved in
checkpoints as plain data. peft applies it; each family names the layers that get adapters by default.
"""

from __future__ import annotations

from dataclasses import dataclass

from zoo.errors import ZooError

__all__ = ["LoRAConfig"]


@dataclass(frozen=True)
class LoRAConfig:
    """A LoRA adapter: ``W + (alpha / rank) * B A`` on every module named in ``targets``.

    Args:
        rank: inner dimension of the update (>= 1).
        alpha: scale numerator; ``None`` uses ``rank`` (a scale of 1).
        dropout: dropout on the adapter's input.
        targets: module names (or name suffixes) to adapt; ``None`` uses the model family's default
            (the denoiser's and ESM-2's attention projections).
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    targets: list[str] | None = None

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ZooError(f"LoRA rank must be >= 1, got {self.rank}")

    def to_peft(self, default_targets: tuple[str, ...] | list[str], **options):
        """peft's ``LoraConfig`` for this adapter (``options``: further ``LoraConfig`` arguments)."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha if self.alpha is not None else self.rank,
            lora_dropout=self.dropout,
            target_modules=list(self.targets or default_targets),
            **options,
        )
