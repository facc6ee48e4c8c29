"""The ESM alphabet: fair-esm's 33 tokens in fair-esm's order, and a batch converter.

Token ids must match fair-esm's ``Alphabet.from_architecture("ESM-1b")`` exactly, since every
published ESM-2 checkpoint (and HF's ``EsmTokenizer`` vocab) indexes its embedding by them.
Unlike fair-esm, an unknown character is a ``ValueError`` naming the sequence and position,
not a bare ``KeyError``; lowercase residues are upper-cased and a trailing ``*`` (stop codon,
as in Prodigal output) is dropped, both documented choices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["Alphabet", "BatchConverter"]

_PREPEND = ("<cls>", "<pad>", "<eos>", "<unk>")
_STANDARD = tuple("LAGVSERTIDPKQNFYMHWCXBUZO.-")
_SPECIALS = ("<cls>", "<pad>", "<eos>", "<unk>", "<mask>", "<null_1>")
#: The 20 canonical amino acids (ids 4..23), used for the random replacements of MLM masking.
AMINO_ACIDS = "LAGVSERTIDPKQNFYMHWC"


class Alphabet:
    """fair-esm's ESM-1b/ESM-2 alphabet: ``<cls>`` seq ``<eos>``, padded with ``<pad>``."""

    def __init__(self) -> None:
        toks = list(_PREPEND) + list(_STANDARD)
        while len(toks) % 8:  # fair-esm pads to a multiple of 8 with <null_i> before <mask>
            toks.append(f"<null_{len(toks) - len(_PREPEND) - len(_STANDARD) + 1}>")
        toks.append("<mask>")
        self.all_toks: list[str] = toks
        self.tok_to_idx: dict[str, int] = {tok: i for i, tok in enumerate(toks)}
        self.cls_idx = self.tok_to_idx["<cls>"]
        self.padding_idx = self.tok_to_idx["<pad>"]
        self.eos_idx = self.tok_to_idx["<eos>"]
        self.unk_idx = self.tok_to_idx["<unk>"]
        self.mask_idx = self.tok_to_idx["<mask>"]
        self.prepend_bos = True
        self.append_eos = True
        self.all_special_tokens = ["<eos>", "<unk>", "<pad>", "<cls>", "<mask>"]
        self.amino_acid_ids = [self.tok_to_idx[a] for a in AMINO_ACIDS]

    def __len__(self) -> int:
        return len(self.all_toks)

    def get_idx(self, tok: str) -> int:
        return self.tok_to_idx.get(tok, self.unk_idx)

    def get_tok(self, idx: int) -> str:
        return self.all_toks[idx]

    def tokenize(self, text: str) -> list[str]:
        """Split into residues, keeping special tokens written inline (``"MK<mask>T"``) whole."""
        tokens: list[str] = []
        i = 0
        while i < len(text):
            if text[i] == "<":
                end = text.find(">", i)
                if end != -1 and text[i : end + 1] in self.tok_to_idx:
                    tokens.append(text[i : end + 1])
                    i = end + 1
                    continue
            if not text[i].isspace():
                tokens.append(text[i])
            i += 1
        return tokens

    def encode(self, sequence: str, name: str = "sequence") -> list[int]:
        """Token ids of the residues (no ``<cls>``/``<eos>``); unknown characters raise ``ValueError``."""
        sequence = sequence.rstrip("*")
        ids = []
        for position, tok in enumerate(self.tokenize(sequence)):
            idx = self.tok_to_idx.get(tok if len(tok) > 1 else tok.upper())
            if idx is None:
                raise ValueError(
                    f"{name}: character {tok!r} at residue {position + 1} is not in the ESM alphabet "
                    f"(expected one of {''.join(_STANDARD)} or a special token like <mask>)"
                )
            ids.append(idx)
        return ids

    def get_batch_converter(self, truncation_seq_length: int | None = None) -> BatchConverter:
        return BatchConverter(self, truncation_seq_length)


class BatchConverter:
    """``[(label, sequence), ...]`` -> ``(labels, sequences, tokens)``, as fair-esm's converter.

    ``tokens`` is int64 ``(B, max_len + 2)``: ``<cls>`` residues ``<eos>`` then ``<pad>``.
    ``truncation_seq_length`` cuts residues before ``<cls>``/``<eos>`` are added (1022 -> 1024 tokens).
    """

    def __init__(self, alphabet: Alphabet, truncation_seq_length: int | None = None) -> None:
        self.alphabet = alphabet
        self.truncation_seq_length = truncation_seq_length

    def __call__(self, raw_batch: Sequence[tuple[str, str]]) -> tuple[list[str], list[str], torch.Tensor]:
        if len(raw_batch) == 0:
            raise ValueError("BatchConverter got an empty batch")
        labels = [label for label, _ in raw_batch]
        strs = [seq for _, seq in raw_batch]
        encoded = [self.alphabet.encode(seq, name=str(label)) for label, seq in raw_batch]
        if self.truncation_seq_length is not None:
            encoded = [ids[: self.truncation_seq_length] for ids in encoded]
        return labels, strs, self.alphabet_tokens(encoded)

    def alphabet_tokens(self, encoded: Sequence[Sequence[int]]) -> torch.Tensor:
        """Frame residue ids with ``<cls>``/``<eos>`` and pad them into one tensor."""
        a = self.alphabet
        width = max(len(ids) for ids in encoded) + 2
        tokens = torch.full((len(encoded), width), a.padding_idx, dtype=torch.int64)
        for row, ids in enumerate(encoded):
            tokens[row, 0] = a.cls_idx
            tokens[row, 1 : len(ids) + 1] = torch.tensor(ids, dtype=torch.int64)
            tokens[row, len(ids) + 1] = a.eos_idx
        return tokens
