"""Alphabet: fair-esm's tokens and order, and clear errors where fair-esm raises a bare KeyError."""

from __future__ import annotations

import pytest
import torch

from zoo.protein import Alphabet

esm = pytest.importorskip("esm")


def test_alphabet_equals_fair_esm():
    ours, theirs = Alphabet(), esm.data.Alphabet.from_architecture("ESM-1b")
    assert ours.all_toks == theirs.all_toks and len(ours) == 33
    for name in ("cls_idx", "padding_idx", "eos_idx", "unk_idx", "mask_idx"):
        assert getattr(ours, name) == getattr(theirs, name), name
    batch = [("a", "MKT<mask>AY"), ("b", "ACDEFGHIKLMNPQRSTVWYXBUZO.-"), ("c", "M")]
    for truncation in (None, 3):
        _, _, expected = theirs.get_batch_converter(truncation)(batch)
        _, _, tokens = ours.get_batch_converter(truncation)(batch)
        assert torch.equal(tokens, expected)


def test_alphabet_unknown_characters_are_clear_errors():
    alphabet = Alphabet()
    assert alphabet.encode("mkt") == alphabet.encode("MKT")  # lowercase is upper-cased
    assert alphabet.encode("MKT*") == alphabet.encode("MKT")  # a trailing stop is dropped
    with pytest.raises(ValueError, match=r"seq7: character 'J' at residue 3"):
        alphabet.get_batch_converter()([("seq7", "MKJT")])
    with pytest.raises(ValueError, match="empty batch"):
        alphabet.get_batch_converter()([])
