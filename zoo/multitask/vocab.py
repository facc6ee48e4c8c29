"""The one vocabulary every task shares (inputs and generated targets alike).

Ids 0-3 are always ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>`` so the model can rely on them
without a link from the data. Text is split into characters (the embedded arithmetic tasks) or on
whitespace (word-level JSONL data).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["BOS_ID", "EOS_ID", "PAD_ID", "SPECIAL_TOKENS", "TOKENIZERS", "UNK_ID", "Vocabulary"]

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
TOKENIZERS = ("char", "whitespace")


class Vocabulary:
    """Token <-> id mapping with the four special tokens first."""

    def __init__(self, tokens: Iterable[str], tokenizer: str = "char") -> None:
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer {tokenizer!r}; expected one of {', '.join(TOKENIZERS)}")
        self.tokenizer = tokenizer
        self.itos: list[str] = list(SPECIAL_TOKENS)
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        for token in tokens:
            if token not in self.stoi:
                self.stoi[token] = len(self.itos)
                self.itos.append(token)

    @classmethod
    def from_texts(cls, texts: Iterable[str], tokenizer: str = "char") -> Vocabulary:
        """Every token of ``texts``, sorted so the ids do not depend on file order."""
        split = _splitter(tokenizer)
        found = {token for text in texts for token in split(text)}
        return cls(sorted(found - set(SPECIAL_TOKENS)), tokenizer)

    def __len__(self) -> int:
        return len(self.itos)

    def split(self, text: str) -> list[str]:
        return _splitter(self.tokenizer)(text)

    def encode(self, tokens: str | list[str]) -> list[int]:
        """Ids of a text (split by the tokenizer) or of a list of tokens; unknown tokens -> ``<unk>``."""
        pieces = self.split(tokens) if isinstance(tokens, str) else tokens
        return [self.stoi.get(t, UNK_ID) for t in pieces]

    def decode(self, ids: Iterable[int], stop_at_eos: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == EOS_ID and stop_at_eos:
                break
            if i in (PAD_ID, BOS_ID, EOS_ID):
                continue
            out.append(self.itos[i] if 0 <= i < len(self.itos) else SPECIAL_TOKENS[UNK_ID])
        return ("" if self.tokenizer == "char" else " ").join(out)


def _splitter(tokenizer: str):
    if tokenizer == "char":
        return list
    if tokenizer == "whitespace":
        return str.split
    raise ValueError(f"unknown tokenizer {tokenizer!r}; expected one of {', '.join(TOKENIZERS)}")
