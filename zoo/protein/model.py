"""ESM-2 as a plain ``nn.Module``, written by hand because no maintained library offers it in a form
we can make faster: fair-esm is frozen since 2022 and HF's port carries BERT's generality.

Parameter names and the state dict equal fair-esm's ``esm.model.esm2.ESM2`` (so its files load
directly, see ``zoo.protein.convert``); the forward is the same computation, faster because
attention goes through ``F.scaled_dot_product_attention`` in ``(B, H, T, d)`` layout, and
attention maps are materialised only when contacts or attentions are asked for.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from zoo.protein.alphabet import Alphabet

__all__ = [
    "ESM2",
    "ESM2_CONFIGS",
    "ContactPredictionHead",
    "ESM2Config",
    "ESM2Layer",
    "esm2_config",
    "preset_name",
]

#: fair-esm's token dropout assumes 15% masking of which 80% are ``<mask>``.
_MASK_RATIO_TRAIN = 0.15 * 0.8


@dataclass(frozen=True)
class ESM2Config:
    """The three numbers that define an ESM-2 architecture (FFN width is always 4x)."""

    num_layers: int
    embed_dim: int
    attention_heads: int
    token_dropout: bool = True


#: The published sizes under their published names (esm README; heads from the released configs).
ESM2_CONFIGS: dict[str, ESM2Config] = {
    "esm2_t6_8M": ESM2Config(6, 320, 20),
    "esm2_t12_35M": ESM2Config(12, 480, 20),
    "esm2_t30_150M": ESM2Config(30, 640, 20),
    "esm2_t33_650M": ESM2Config(33, 1280, 20),
    "esm2_t36_3B": ESM2Config(36, 2560, 40),
    "esm2_t48_15B": ESM2Config(48, 5120, 40),
}


def preset_name(name: str) -> str:
    """The ``ESM2_CONFIGS`` key of ``name``, which may also be spelled as a fair-esm file
    (``esm2_t6_8M_UR50D``) or by its short form (``t6_8M``, what earlier checkpoints and configs hold)."""
    key = name.removesuffix("_UR50D")
    key = key if key.startswith("esm2_") else f"esm2_{key}"
    if key not in ESM2_CONFIGS:
        raise ValueError(f"unknown ESM-2 size {name!r}; known: {', '.join(ESM2_CONFIGS)}")
    return key


def esm2_config(model_name: str, overrides: dict | None = None) -> ESM2Config:
    """The preset ``model_name`` with some of its fields replaced (e.g. a 2-layer, 32-d test model)."""
    config = ESM2_CONFIGS[preset_name(model_name)]
    if not overrides:
        return config
    fields = [f.name for f in dataclasses.fields(ESM2Config)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown ESM-2 model_kwargs {unknown}; known: {', '.join(fields)}")
    return dataclasses.replace(config, **overrides)


class RotaryEmbedding(nn.Module):
    """Rotary embedding in the non-interleaved ("rotate half") layout, position 0 = ``<cls>``.

    ``inv_freq`` is a persistent buffer so that a checkpoint's (fp16-rounded) values are loaded
    rather than recomputed: recomputing them changes the outputs of the published models.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))
        self._cache: tuple[int, torch.device, torch.dtype, torch.Tensor, torch.Tensor] | None = None

    def cos_sin(
        self, length: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self._cache
        # a traced graph (torch.export: the length is a symbol) computes the tables in the graph; tables made
        # under inference_mode cannot take part in autograd later
        stale = (
            torch.compiler.is_exporting()
            or cache is None
            or cache[0] < length
            or cache[1] != device
            or cache[2] != dtype
            or (cache[3].is_inference() and not torch.is_inference_mode_enabled())
        )
        if stale:
            t = torch.arange(length, device=device).type_as(self.inv_freq)
            freqs = torch.outer(t, self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            cache = (length, device, dtype, emb.cos().to(dtype), emb.sin().to(dtype))
            if not torch.compiler.is_compiling():
                self._cache = cache
        return cache[3][:length], cache[4][:length]

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = None  # new inv_freq values invalidate the tables
        super()._load_from_state_dict(*args, **kwargs)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class SelfAttention(nn.Module):
    """Multi-head self-attention with rotary q/k; weights returned only when asked for."""

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by attention_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.rot_emb = RotaryEmbedding(self.head_dim)
        gain = 1 / math.sqrt(2)  # fair-esm's initialisation
        for proj in (self.k_proj, self.v_proj, self.q_proj):
            nn.init.xavier_uniform_(proj.weight, gain=gain)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor | None, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` (B, T, E); ``key_mask`` (B, 1, 1, T) bool, True where a key may be attended."""
        b, t, _ = x.shape
        # fair-esm scales q before rotary; keep that order for bit-level agreement.
        q = self._heads(self.q_proj(x) * self.scaling)
        k = self._heads(self.k_proj(x))
        v = self._heads(self.v_proj(x))
        cos, sin = self.rot_emb.cos_sin(t, x.device, q.dtype)
        q, k = RotaryEmbedding.apply(q, cos, sin), RotaryEmbedding.apply(k, cos, sin)
        weights = None
        if need_weights:
            scores = q @ k.transpose(-1, -2)
            if key_mask is not None:
                scores = scores.masked_fill(~key_mask, float("-inf"))
            weights = F.softmax(scores, dim=-1, dtype=torch.float32).type_as(q)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=1.0)
        out = out.transpose(1, 2).reshape(b, t, -1)  # -1: heads may have been pruned
        return self.out_proj(out), weights


class ESM2Layer(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(LN(x))``, then ``x + fc2(gelu(fc1(LN(x))))``."""

    def __init__(self, embed_dim: int, ffn_dim: int, num_heads: int) -> None:
        super().__init__()
        self.self_attn = SelfAttention(embed_dim, num_heads)
        self.self_attn_layer_norm = nn.LayerNorm(embed_dim)
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        self.final_layer_norm = nn.LayerNorm(embed_dim)

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor | None, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn, weights = self.self_attn(self.self_attn_layer_norm(x), key_mask, need_weights)
        x = x + attn
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        return x, weights


class LMHead(nn.Module):
    """RoBERTa LM head; ``weight`` is the token embedding (tied), kept as an attribute like fair-esm's."""

    def __init__(self, embed_dim: int, output_dim: int, weight: nn.Parameter) -> None:
        super().__init__()
        self.dense = nn.Linear(embed_dim, embed_dim)
        self.layer_norm = nn.LayerNorm(embed_dim)
        self.weight = weight
        self.bias = nn.Parameter(torch.zeros(output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.layer_norm(F.gelu(self.dense(x))), self.weight) + self.bias


def symmetrize(x: torch.Tensor) -> torch.Tensor:
    return x + x.transpose(-1, -2)


def apc(x: torch.Tensor) -> torch.Tensor:
    """Average product correction: removes the per-row/column background from coupling maps."""
    a1 = x.sum(-1, keepdim=True)
    a2 = x.sum(-2, keepdim=True)
    a12 = x.sum((-1, -2), keepdim=True)
    return x - a1 * a2 / a12


class ContactPredictionHead(nn.Module):
    """Logistic regression over symmetrised, APC-corrected attention maps of every layer and head."""

    def __init__(self, in_features: int, eos_idx: int) -> None:
        super().__init__()
        self.eos_idx = eos_idx
        self.regression = nn.Linear(in_features, 1)

    def forward(self, tokens: torch.Tensor, attentions: torch.Tensor) -> torch.Tensor:
        """``attentions`` (B, L, H, T, T), pad-masked -> contact probabilities (B, T-2, T-2)."""
        eos_mask = tokens.ne(self.eos_idx).to(attentions)
        eos_mask = eos_mask.unsqueeze(1) * eos_mask.unsqueeze(2)
        attentions = (attentions * eos_mask[:, None, None])[..., 1:-1, 1:-1]
        b, layers, heads, t, _ = attentions.shape
        attentions = attentions.reshape(b, layers * heads, t, t).to(self.regression.weight)
        features = apc(symmetrize(attentions)).permute(0, 2, 3, 1)
        # float32 probabilities whatever the autocast dtype: records and metrics take them as they are
        return torch.sigmoid(self.regression(features).squeeze(-1).float())


class ESM2(nn.Module):
    """ESM-2 protein language model with fair-esm's constructor, state dict and output dict.

    ``model(tokens, repr_layers=[0, 6], return_contacts=True)`` returns ``{"logits": (B, T, 33),
    "representations": {layer: (B, T, E)}, "contacts": (B, T-2, T-2)}`` (plus ``"attentions"``
    (B, L, H, T, T) when contacts or ``need_head_weights`` are asked for). Layer 0 is the
    embedding after token dropout; the last layer's entry has the final LayerNorm applied.
    """

    def __init__(
        self,
        num_layers: int = 33,
        embed_dim: int = 1280,
        attention_heads: int = 20,
        alphabet: Alphabet | str = "ESM-1b",
        token_dropout: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(alphabet, Alphabet):
            if alphabet not in ("ESM-1b", "ESM-2"):
                raise ValueError(f"alphabet must be an Alphabet or 'ESM-1b', got {alphabet!r}")
            alphabet = Alphabet()
        self.num_layers = num_layers
        self.embed_dim = embed_dim
        self.attention_heads = attention_heads
        self.alphabet = alphabet
        self.alphabet_size = len(alphabet)
        self.padding_idx = alphabet.padding_idx
        self.mask_idx = alphabet.mask_idx
        self.cls_idx = alphabet.cls_idx
        self.eos_idx = alphabet.eos_idx
        self.prepend_bos = alphabet.prepend_bos
        self.append_eos = alphabet.append_eos
        self.token_dropout = token_dropout

        self.embed_scale = 1
        self.embed_tokens = nn.Embedding(self.alphabet_size, embed_dim, padding_idx=self.padding_idx)
        self.layers = nn.ModuleList(
            [ESM2Layer(embed_dim, 4 * embed_dim, attention_heads) for _ in range(num_layers)]
        )
        self.contact_head = ContactPredictionHead(num_layers * attention_heads, self.eos_idx)
        self.emb_layer_norm_after = nn.LayerNorm(embed_dim)
        self.lm_head = LMHead(embed_dim, self.alphabet_size, self.embed_tokens.weight)

    # ------------------------------------------------------------- building
    @classmethod
    def from_config(cls, config: str | ESM2Config, **overrides) -> ESM2:
        """A randomly initialised model of a published size (``"esm2_t6_8M"`` ... ``"esm2_t48_15B"``, see
        ``preset_name`` for other spellings), with ``overrides`` of its ``ESM2Config`` fields."""
        if isinstance(config, str):
            config = esm2_config(config, overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        return cls(
            config.num_layers, config.embed_dim, config.attention_heads, token_dropout=config.token_dropout
        )

    @property
    def config(self) -> ESM2Config:
        return ESM2Config(self.num_layers, self.embed_dim, self.attention_heads, self.token_dropout)

    @classmethod
    def from_pretrained(cls, path: str | Path, strict: bool = True) -> ESM2:
        """Load a local fair-esm ``.pt`` file, a HF ``EsmForMaskedLM`` directory/state dict, or our own save.

        See ``zoo.protein.convert.load_esm2``; nothing is downloaded.
        """
        from zoo.protein.convert import load_esm2

        return load_esm2(path, strict=strict)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write a fair-esm-format ``.pt`` file (and its ``-contact-regression.pt``) that fair-esm loads."""
        from zoo.protein.convert import save_fair_esm

        return save_fair_esm(self, path)

    # --------------------------------------------------------------- forward
    def embed(self, tokens: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """Token embedding with token-dropout rescaling and pads zeroed (fair-esm's layer 0)."""
        x = self.embed_scale * self.embed_tokens(tokens)
        if self.token_dropout:
            is_mask = tokens == self.mask_idx
            x = x.masked_fill(is_mask.unsqueeze(-1), 0.0)
            src_lengths = (~padding_mask).sum(-1)
            mask_ratio_observed = is_mask.sum(-1).to(x.dtype) / src_lengths
            x = x * (1 - _MASK_RATIO_TRAIN) / (1 - mask_ratio_observed)[:, None, None]
        return x * (1 - padding_mask.unsqueeze(-1).type_as(x))

    def forward(
        self,
        tokens: torch.Tensor,
        repr_layers: Iterable[int] = (),
        need_head_weights: bool = False,
        return_contacts: bool = False,
    ) -> dict:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (batch, length) token ids, got shape {tuple(tokens.shape)}")
        need_weights = need_head_weights or return_contacts
        padding_mask = tokens.eq(self.padding_idx)
        x = self.embed(tokens, padding_mask)
        # An exported or compiled graph does not branch on the data (a graph break in every forward): it always
        # masks, and an all-True mask changes nothing.
        traced = torch.compiler.is_compiling() or torch.compiler.is_exporting()
        has_pads = traced or bool(padding_mask.any())
        key_mask = (~padding_mask)[:, None, None, :] if has_pads else None

        repr_layers = set(repr_layers)
        representations = {}
        if 0 in repr_layers:
            representations[0] = x
        attn_weights = []
        for index, layer in enumerate(self.layers):
            x, weights = layer(x, key_mask, need_weights)
            if index + 1 in repr_layers:
                representations[index + 1] = x
            if need_weights:
                attn_weights.append(weights)
        x = self.emb_layer_norm_after(x)
        if self.num_layers in repr_layers:
            representations[self.num_layers] = x
        result = {"logits": self.lm_head(x), "representations": representations}
        if need_weights:
            attentions = torch.stack(attn_weights, 1)  # (B, L, H, T, T)
            if has_pads:
                keep = (~padding_mask).type_as(attentions)
                attentions = attentions * (keep.unsqueeze(1) * keep.unsqueeze(2))[:, None, None]
            result["attentions"] = attentions
            if return_contacts:
                result["contacts"] = self.contact_head(tokens, attentions)
        return result

    def after_head_pruning(self, kept: dict[str, list[int]]) -> None:
        """Shrink the contact regression to the attention maps left after structured head pruning.

        Called by ``zoo.callbacks.StructuredPruning`` with each layer's kept heads
        (``{"layers.3.self_attn": [0, 2, ...]}``); the regression reads the maps layer-major.
        """
        heads = self.attention_heads
        columns = [
            index * heads + head
            for index in range(self.num_layers)
            for head in kept.get(f"layers.{index}.self_attn", range(heads))
        ]
        old = self.contact_head.regression
        new = nn.Linear(len(columns), 1, device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(old.weight[:, columns])
            new.bias.copy_(old.bias)
        new.requires_grad_(old.weight.requires_grad)
        self.contact_head.regression = new
        self.attention_heads = self.layers[0].self_attn.num_heads

    def predict_contacts(self, tokens: torch.Tensor) -> torch.Tensor:
        return self(tokens, return_contacts=True)["contacts"]
