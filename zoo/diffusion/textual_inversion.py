"""Textual inversion (Gal et al. 2023): learn a new word for a concept, the model itself frozen.

A caption-conditioned model learns one new token (or a few vectors for it, ``num_vectors``) from a handful of
images of the concept (``zoo.datamodules.InstanceImageDataModule``, whose captions carry ``{}`` where the
token goes). The caption encoder's vocabulary grows by the placeholder token: the zoo's word tokenizer or a
local CLIP tokenizer learns the word, and the token-embedding table grows by its rows
(``zoo.diffusion.embeddings.ExtendedEmbedding``), started from the embedding of ``initializer_token``, a
single word the model knows. Only those rows train: the denoiser, the rest of the caption encoder, the
position embeddings and every other token stay as they were (diffusers' script trains the whole table and
restores the other rows after each step; here they are not parameters of the optimizer at all).

The result is a small file: diffusers' ``learned_embeds.safetensors`` layout, one key, the token, holding a
``(num_vectors, dim)`` tensor, written to ``<log_dir>/learned_embeds.safetensors`` at the end of fitting.
``load_textual_inversion`` adds it to any copy of the base model (refused if the token is already in the
vocabulary, as diffusers refuses it). A token of several vectors expands, in captions, to its vectors' tokens:
``tok tok1 tok2`` for the word tokenizer (which reads letters and digits), ``tok tok_1 tok_2`` for CLIP
(diffusers' names).
"""

from __future__ import annotations

from pathlib import Path

import torch

from zoo.datamodules.captioned_images import tokenize_words
from zoo.diffusion.conditioning import CaptionConditioner
from zoo.diffusion.embeddings import ExtendedEmbedding, extend_embedding
from zoo.diffusion.module import LatentDiffusion
from zoo.errors import ZooError
from zoo.parts import plain_part

__all__ = [
    "TextualInversion",
    "add_token",
    "initial_rows",
    "load_textual_inversion",
    "read_learned_embeds",
    "save_learned_embeds",
]

#: Where the instance captions put the placeholder token.
SLOT = "{}"


def _table_path(conditioner: CaptionConditioner) -> str:
    """The token-embedding table of the caption encoder, as a path under the conditioner."""
    if conditioner.clip is None:
        return "encoder.tokens"
    table = conditioner.clip.model.get_input_embeddings()
    return next(
        f"clip.model.{name}" for name, module in conditioner.clip.model.named_modules() if module is table
    )


def _vector_tokens(conditioner: CaptionConditioner, token: str, n: int) -> list[str]:
    separator = "_" if conditioner.clip is not None else ""
    return [token] + [f"{token}{separator}{i}" for i in range(1, n)]


def _known(conditioner: CaptionConditioner, token: str) -> bool:
    if conditioner.clip is not None:
        return token in conditioner.clip.tokenizer.get_vocab()
    return token in conditioner.tokenizer.index


def initial_rows(conditioner: CaptionConditioner, initializer: str, n: int = 1) -> torch.Tensor:
    """``(n, dim)``: the embedding of ``initializer``, which must be one token the caption encoder knows."""
    if conditioner.clip is not None:
        ids = conditioner.clip.tokenizer.encode(initializer, add_special_tokens=False)
        if len(ids) != 1:
            raise ZooError(
                f"initializer_token {initializer!r} is {len(ids)} CLIP tokens: give a word that is exactly one"
            )
        index = ids[0]
    else:
        if tokenize_words(initializer) != [initializer] or initializer not in conditioner.tokenizer.index:
            raise ZooError(
                f"initializer_token {initializer!r} is not a word of the caption vocabulary: give one known "
                f"lower-case word, e.g. one of {conditioner.tokenizer.vocabulary[:8]}"
            )
        index = conditioner.tokenizer.index[initializer]
    table = conditioner.get_submodule(_table_path(conditioner))
    return table.weight.detach()[index].repeat(n, 1)


def add_token(conditioner: CaptionConditioner, token: str, rows: torch.Tensor) -> ExtendedEmbedding:
    """Grow the caption encoder's vocabulary by ``token`` with ``rows`` (one per vector); returns the grown
    table, whose ``extra`` rows are the token's. Refused when the token (or a vector's) is already known."""
    if conditioner.clip is None and tokenize_words(token) != [token]:
        raise ZooError(
            f"placeholder_token {token!r} is not one word for the caption tokenizer, which reads lower-case "
            "letters and digits: give e.g. 'sks'"
        )
    names = _vector_tokens(conditioner, token, len(rows))
    taken = [name for name in names if _known(conditioner, name)]
    if taken:
        raise ZooError(
            f"token {taken[0]!r} is already in the caption vocabulary: choose a placeholder the model does not know"
        )
    path = _table_path(conditioner)
    table = conditioner.get_submodule(path)
    if isinstance(table, ExtendedEmbedding):
        raise ZooError(f"the caption encoder already has an added token; {token!r} would be a second one")
    if conditioner.clip is not None:
        tokenizer = conditioner.clip.tokenizer
        tokenizer.add_tokens(names)
        first = tokenizer.convert_tokens_to_ids(names[0])
    else:
        tokenizer = conditioner.tokenizer
        first = len(tokenizer)
        tokenizer.vocabulary += names
        tokenizer.index.update({name: first + i for i, name in enumerate(names)})
    if first != table.num_embeddings:
        raise ZooError(
            f"the tokenizer gives {token!r} id {first}, but the embedding table has {table.num_embeddings} rows"
        )
    if len(names) > 1:
        conditioner.expansions[token] = " ".join(names)
    return extend_embedding(conditioner, path, rows)


def save_learned_embeds(token: str, rows: torch.Tensor, path: str | Path) -> Path:
    """diffusers' ``learned_embeds.safetensors``: ``{token: (num_vectors, dim)}``, written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    save_file({token: rows.detach().cpu().float().contiguous()}, str(temporary))
    temporary.replace(path)
    return path


def read_learned_embeds(path: str | Path) -> tuple[str, torch.Tensor]:
    """``(token, rows (num_vectors, dim))`` of a diffusers-layout file (one key, the token)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ZooError(f"learned embeddings {str(path)!r} do not exist")
    stored = load_file(str(path))
    if len(stored) != 1:
        raise ZooError(
            f"{str(path)!r} holds {len(stored)} tensors ({sorted(stored)[:4]}): diffusers' textual-inversion "
            "layout is one, named by its token"
        )
    ((token, rows),) = stored.items()
    if rows.ndim == 1:
        rows = rows[None]
    return token, rows


def load_textual_inversion(model: LatentDiffusion, path: str | Path) -> str:
    """Add the token of a ``learned_embeds.safetensors`` file to a caption model's vocabulary; returns it."""
    if not isinstance(model.conditioner, CaptionConditioner):
        raise ZooError("textual-inversion embeddings need a caption-conditioned model (CaptionConditioning)")
    token, rows = read_learned_embeds(path)
    dim = model.conditioner.get_submodule(_table_path(model.conditioner)).embedding_dim
    if rows.shape[1] != dim:
        raise ZooError(
            f"{str(path)!r} holds {rows.shape[1]}-wide embeddings; this caption encoder's are {dim}"
        )
    add_token(model.conditioner, token, rows.to(model.device))
    return token


class TextualInversion(LatentDiffusion):
    """A frozen caption-conditioned ``LatentDiffusion`` learning one new token (see the module docstring).

    Args:
        placeholder_token: the new word (not in the vocabulary; one lower-case word for the word tokenizer).
        initializer_token: a known single-token word whose embedding the new one starts from.
        num_vectors: embedding vectors of the token.
        base_checkpoint: the trained caption ``LatentDiffusion`` (its caption vocabulary is taken with it).
        img_size / num_classes / caption_vocabulary: what the data module links.
        All other arguments are ``LatentDiffusion``'s parts (they must match the base checkpoint's).
    """

    def __init__(
        self,
        placeholder_token: str = "sks",
        initializer_token: str = "circle",
        num_vectors: int = 1,
        img_size: int = 32,
        num_classes: int = 0,
        caption_vocabulary: list[str] | None = None,
        **kwargs,
    ) -> None:
        if num_vectors < 1:
            raise ZooError(f"num_vectors must be >= 1, got {num_vectors}")
        if kwargs.get("lora") is not None:
            raise ZooError("textual inversion trains only the new token: leave lora unset")
        base = kwargs.get("base_checkpoint")
        if base is not None and Path(base).is_file():  # the base's vocabulary: its table's rows follow it
            stored = torch.load(base, map_location="cpu", weights_only=True).get("hyper_parameters") or {}
            caption_vocabulary = stored.get("caption_vocabulary") or caption_vocabulary
        kwargs = {k: plain_part(v, self.parts[k]) if k in self.parts else v for k, v in kwargs.items()}
        super().__init__(
            img_size=img_size, num_classes=num_classes, caption_vocabulary=caption_vocabulary, **kwargs
        )

    def configure_models(self) -> None:
        super().configure_models()
        if not isinstance(self.conditioner, CaptionConditioner):
            raise ZooError(
                "textual inversion learns a word: it needs CaptionConditioning (DreamBooth for class models)"
            )
        hp = self.hparams
        rows = initial_rows(self.conditioner, hp.initializer_token, hp.num_vectors)
        self.requires_grad_(False)
        add_token(self.conditioner, hp.placeholder_token, rows).extra.requires_grad_(True)

    @property
    def learned_rows(self) -> torch.Tensor:
        """The new token's embedding, ``(num_vectors, dim)``."""
        return self.conditioner.get_submodule(_table_path(self.conditioner)).extra

    def condition(self, batch: dict, dropout: float = 0.0, generator: torch.Generator | None = None):
        """Captions with ``{}`` get the placeholder token there."""
        token = self.hparams.placeholder_token
        batch = {**batch, "caption": [c.replace(SLOT, token) for c in batch["caption"]]}
        return super().condition(batch, dropout, generator)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        token = self.hparams.placeholder_token
        if not any(SLOT in c or token in c for c in batch["caption"]):
            raise ZooError(
                f"no training caption names the new token: captions like {batch['caption'][0]!r} need {SLOT} "
                f"or {token!r} (InstanceImageDataModule's caption)"
            )
        # no condition dropout: the null caption is frozen, so a dropped sample would teach the token nothing
        loss = self.diffusion_loss(batch, training=True)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["image"]))
        return loss

    def save_embeddings(self, path: str | Path) -> Path:
        return save_learned_embeds(self.hparams.placeholder_token, self.learned_rows, path)

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.trainer.is_global_zero and self.trainer.log_dir:
            path = self.save_embeddings(Path(self.trainer.log_dir) / "learned_embeds.safetensors")
            print(f"zoo: the embedding of {self.hparams.placeholder_token!r} written to {path}", flush=True)
