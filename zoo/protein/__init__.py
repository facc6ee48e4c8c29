"""ESM-2 protein language model: the network, its alphabet, checkpoint conversion and MLM training.

``from zoo.protein import ESM2, Alphabet`` mirrors fair-esm's API; ``ESM2.from_pretrained`` reads
fair-esm and HF files from local paths.
"""

from zoo.protein.alphabet import Alphabet, BatchConverter
from zoo.protein.convert import fair_esm_to_hf, hf_to_fair_esm, load_esm2, save_fair_esm
from zoo.protein.model import ESM2, ESM2_CONFIGS, ContactPredictionHead, ESM2Config, ESM2Layer
from zoo.protein.module import ESM2MaskedLM, mask_tokens

__all__ = [
    "ESM2",
    "ESM2_CONFIGS",
    "Alphabet",
    "BatchConverter",
    "ContactPredictionHead",
    "ESM2Config",
    "ESM2Layer",
    "ESM2MaskedLM",
    "fair_esm_to_hf",
    "hf_to_fair_esm",
    "load_esm2",
    "mask_tokens",
    "save_fair_esm",
]
