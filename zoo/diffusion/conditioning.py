"""What the denoiser is conditioned on: class labels, captions, or nothing, with classifier-free dropout.

The part (``LatentDiffusion(conditioning=...)``) is one of three small configs, chosen in YAML by class:
``ClassConditioning``, ``CaptionConditioning`` or ``NoConditioning``. Each ``build``s its conditioner, the
``nn.Module`` that turns a batch or a prompt into a ``Conditioning``: cross-attention tokens (``context``,
with a padding mask) and/or ``class_labels``. Every conditioner has a learned *null* condition, which
condition dropout substitutes during training and guidance uses as the unconditional branch:

- ``ClassConditioner``: class ``num_classes`` is the null class (LDM's cin256-v2 has 1001 classes for
  1000 for the same reason); labels feed the denoiser's class embedding and one context token.
- ``CaptionConditioner``: a small transformer trained jointly with the denoiser, over a word tokenizer
  built from the dataset's captions (the vocabulary is a constructor argument of the module, so it is
  saved with the checkpoint); or a frozen local ``CLIPTextModel`` directory. The null caption is the empty
  string, which is also what a negative prompt replaces.
- ``UnconditionalConditioner``: only the null token.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from zoo.datamodules.captioned_images import tokenize_words

__all__ = [
    "CaptionConditioner",
    "CaptionConditioning",
    "CaptionEncoder",
    "ClassConditioner",
    "ClassConditioning",
    "Conditioning",
    "ConditioningConfig",
    "NoConditioning",
    "UnconditionalConditioner",
    "WordTokenizer",
]


@dataclass
class Conditioning:
    """Inputs of the denoiser besides the noisy latents; ``None`` fields are not used."""

    context: torch.Tensor | None = None  # (B, L, D) cross-attention tokens
    context_mask: torch.Tensor | None = None  # (B, L), 1 = attend
    class_labels: torch.Tensor | None = None  # (B,) with the null class for "unconditional"
    time_ids: torch.Tensor | None = None  # (B, n) micro-conditions (``zoo.diffusion.micro_conditioning``)

    def cat(self, other: Conditioning) -> Conditioning:
        """Both conditionings in one batch (``self`` first): how guidance runs cond and uncond together."""

        def join(a, b):
            return None if a is None else torch.cat([a, b])

        return Conditioning(
            join(self.context, other.context),
            join(self.context_mask, other.context_mask),
            join(self.class_labels, other.class_labels),
            join(self.time_ids, other.time_ids),
        )

    def repeat(self, n: int) -> Conditioning:
        def rep(a):
            return None if a is None else a.repeat_interleave(n, dim=0)

        return replace(
            self,
            context=rep(self.context),
            context_mask=rep(self.context_mask),
            class_labels=rep(self.class_labels),
            time_ids=rep(self.time_ids),
        )


# ------------------------------------------------------------------------------------------------ configs
@dataclass(frozen=True)
class ConditioningConfig(ABC):
    """The conditioning part of ``LatentDiffusion``: which condition, its encoder and its dropout.

    Args:
        dim: width of the condition tokens (the denoiser's cross-attention width), unless a CLIP text
            encoder fixes it.
        dropout: probability of training a sample on the null condition, what classifier-free guidance needs.
    """

    dim: int = 128
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"condition dropout must be in [0, 1), got {self.dropout}")
        if self.dim < 1:
            raise ValueError(f"the condition width dim must be >= 1, got {self.dim}")

    @abstractmethod
    def build(self, num_classes: int, vocabulary: list[str] | None) -> nn.Module:
        """The conditioner for data of ``num_classes`` classes and this caption ``vocabulary``."""


@dataclass(frozen=True)
class ClassConditioning(ConditioningConfig):
    """Class labels (``num_classes`` comes from the data), with a learned null class."""

    def build(self, num_classes: int, vocabulary: list[str] | None) -> nn.Module:
        return ClassConditioner(num_classes, self.dim)


@dataclass(frozen=True)
class CaptionConditioning(ConditioningConfig):
    """Captions through a jointly trained transformer over the data's words, or a frozen local CLIP.

    Args:
        layers / heads / max_length: the caption transformer and its token limit (captions are truncated).
        text_encoder_path: a local ``CLIPTextModel`` directory used instead (frozen; sets the width).
    """

    layers: int = 2
    heads: int = 4
    max_length: int = 16
    text_encoder_path: str | None = None

    def build(self, num_classes: int, vocabulary: list[str] | None) -> nn.Module:
        return CaptionConditioner(
            vocabulary, self.dim, self.layers, self.heads, self.max_length, self.text_encoder_path
        )


@dataclass(frozen=True)
class NoConditioning(ConditioningConfig):
    """Unconditional generation: every sample gets the one learned null token (dropout changes nothing)."""

    dropout: float = 0.0

    def build(self, num_classes: int, vocabulary: list[str] | None) -> nn.Module:
        return UnconditionalConditioner(self.dim)


# --------------------------------------------------------------------------------------------- conditioners
class ClassConditioner(nn.Module):
    """Class labels -> the class embedding token and the labels themselves."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"class conditioning needs num_classes >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.dim = dim
        self.embedding = nn.Embedding(num_classes + 1, dim)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> Conditioning:
        labels = labels.long()
        # rows past the null class are identifiers added by personalisation (zoo.diffusion.dreambooth)
        if (labels < 0).any() or (labels >= self.embedding.num_embeddings).any():
            raise ValueError(
                f"class labels must be in [0, {self.embedding.num_embeddings - 1}] ({self.num_classes} is null), "
                f"got {labels.tolist()}"
            )
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.null_label), labels)
        return Conditioning(context=self.embedding(labels)[:, None], class_labels=labels)

    def from_batch(self, batch: dict, drop: torch.Tensor | None = None) -> Conditioning:
        return self(batch["label"].to(self.embedding.weight.device), drop)

    def null(self, batch_size: int, device) -> Conditioning:
        return self(torch.full((batch_size,), self.null_label, device=device))

    def guidance_pair(self, labels=None, captions=None, negative_captions=None, n: int = 0, device=None):
        """``(condition, unconditional)`` for sampling ``labels``."""
        if labels is None:
            raise ValueError("a class-conditional model needs labels to sample")
        return self(torch.as_tensor(labels, device=device)), self.null(n, device)

    def prompts(self, batch: dict) -> dict:
        """``generate`` arguments asking for the classes of a batch."""
        labels = torch.as_tensor(batch["label"]).tolist()
        if min(labels) < 0:
            names = batch.get("name", batch.get("caption"))
            raise ValueError(f"prompts {names} are not class names of this class-conditional model")
        return {"labels": labels}


class UnconditionalConditioner(nn.Module):
    """The same learned token for every sample."""

    num_classes = 0

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)

    def null(self, batch_size: int, device) -> Conditioning:
        return Conditioning(context=self.token.expand(batch_size, -1, -1))

    def from_batch(self, batch: dict, drop: torch.Tensor | None = None) -> Conditioning:
        return self.null(len(batch["image"]), self.token.device)

    def guidance_pair(self, labels=None, captions=None, negative_captions=None, n: int = 0, device=None):
        null = self.null(n, device)
        return null, null

    def prompts(self, batch: dict) -> dict:
        return {}


class WordTokenizer:
    """Lower-case word tokens over a fixed vocabulary; ids 0-3 are pad, begin, end and unknown."""

    PAD, BOS, EOS, UNK = 0, 1, 2, 3

    def __init__(self, vocabulary: list[str], max_length: int = 16) -> None:
        if len(set(vocabulary)) != len(vocabulary):
            raise ValueError("caption vocabulary has duplicate words")
        self.vocabulary = list(vocabulary)
        self.index = {w: i + 4 for i, w in enumerate(self.vocabulary)}
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.vocabulary) + 4

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, mask)``, both (B, max_length); longer captions are truncated (keeping the end token)."""
        ids = torch.full((len(captions), self.max_length), self.PAD, dtype=torch.long)
        for row, caption in enumerate(captions):
            tokens = [self.index.get(w, self.UNK) for w in tokenize_words(caption)][: self.max_length - 2]
            tokens = [self.BOS, *tokens, self.EOS]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids, ids != self.PAD


class CaptionEncoder(nn.Module):
    """A pre-norm transformer encoder over word tokens with learned positions (BERT-like, as LDM's)."""

    def __init__(
        self, vocab_size: int, dim: int = 128, layers: int = 2, heads: int = 4, max_length: int = 16
    ):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Parameter(torch.randn(1, max_length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.positions[:, : ids.shape[1]]
        return self.norm(self.encoder(x, src_key_padding_mask=~mask))


class _ClipEncoder(nn.Module):
    """A frozen local ``CLIPTextModel`` (and its tokenizer) directory; nothing is downloaded."""

    def __init__(self, path: str) -> None:
        super().__init__()
        from zoo.extras import require

        transformers = require("transformers", "clip", "a CLIP text encoder (text_encoder_path)")
        if not Path(path, "config.json").is_file():
            raise FileNotFoundError(
                f"text_encoder_path {path!r} is not a local CLIPTextModel directory (no config.json)"
            )
        model = transformers.CLIPTextModel.from_pretrained(path, local_files_only=True)
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = transformers.CLIPTokenizer.from_pretrained(path, local_files_only=True)
        self.dim = self.model.config.hidden_size

    def train(self, mode: bool = True) -> _ClipEncoder:
        return super().train(False)

    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device).bool()
        return self.model(input_ids=ids).last_hidden_state, mask


class CaptionConditioner(nn.Module):
    """Captions -> context tokens and their padding mask, from a jointly trained encoder or a frozen CLIP."""

    num_classes = 0

    def __init__(
        self,
        vocabulary: list[str] | None,
        dim: int = 128,
        layers: int = 2,
        heads: int = 4,
        max_length: int = 16,
        clip_path: str | None = None,
    ) -> None:
        super().__init__()
        if clip_path is not None:
            self.clip = _ClipEncoder(clip_path)
            self.dim = self.clip.dim
            self.tokenizer = None
        else:
            if not vocabulary:
                raise ValueError(
                    "caption conditioning needs caption_vocabulary (linked from the data module by `zoo fit`) "
                    "or text_encoder_path (a local CLIPTextModel directory)"
                )
            self.clip = None
            self.dim = dim
            self.tokenizer = WordTokenizer(vocabulary, max_length)
            self.encoder = CaptionEncoder(len(self.tokenizer), dim, layers, heads, max_length)
        #: an added token -> the tokens of its vectors, written out before tokenizing (textual inversion's
        #: multi-vector placeholders, ``zoo.diffusion.textual_inversion``)
        self.expansions: dict[str, str] = {}

    def expand(self, caption: str) -> str:
        """``caption`` with every multi-vector token replaced by its vectors' tokens (whole words only)."""
        for token, tokens in self.expansions.items():
            caption = re.sub(rf"(?<![a-z0-9]){re.escape(token)}(?![a-z0-9])", lambda _, t=tokens: t, caption)
        return caption

    def forward(self, captions: list[str]) -> Conditioning:
        captions = [self.expand(c) for c in captions] if self.expansions else captions
        if self.clip is not None:
            context, mask = self.clip(captions)
        else:
            ids, mask = self.tokenizer(captions)
            ids, mask = ids.to(self.encoder.positions.device), mask.to(self.encoder.positions.device)
            context = self.encoder(ids, mask)
        return Conditioning(context=context, context_mask=mask.to(context.dtype))

    def from_batch(self, batch: dict, drop: torch.Tensor | None = None) -> Conditioning:
        captions = list(batch["caption"])
        if drop is not None:
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        return self(captions)

    def null(self, batch_size: int, device) -> Conditioning:
        return self([""] * batch_size)

    def guidance_pair(self, labels=None, captions=None, negative_captions=None, n: int = 0, device=None):
        """``(captions, negative captions)``; the negatives default to the empty, null caption."""
        if captions is None:
            raise ValueError("a caption-conditional model needs captions to sample")
        negative = list(negative_captions) if negative_captions is not None else [""] * n
        if len(negative) != n:
            raise ValueError(f"got {len(negative)} negative prompts for {n} captions")
        return self(list(captions)), self(negative)

    def prompts(self, batch: dict) -> dict:
        return {"captions": list(batch["caption"])}
