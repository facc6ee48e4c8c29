"""ESM-2 protein language model: the network, its alphabet, checkpoint conversion, training and fine-tuning.

``from zoo.protein import ESM2, Alphabet`` mirrors fair-esm's API; ``ESM2.from_pretrained`` reads
fair-esm and HF files from local paths.
"""

from zoo.predict import load_predictions
from zoo.protein.alphabet import Alphabet, BatchConverter
from zoo.protein.convert import fair_esm_to_hf, hf_to_fair_esm, load_esm2, save_fair_esm
from zoo.protein.fasta import FastaIndex, ProteinRecord, read_fasta
from zoo.protein.finetune import ESM2Finetuner, ESM2ResiduePredictor, ESM2SequencePredictor
from zoo.protein.metrics import ContactPrecision
from zoo.protein.model import ESM2, ESM2_CONFIGS, ContactPredictionHead, ESM2Config, ESM2Layer, esm2_config
from zoo.protein.module import ESM2MaskedLM, mask_tokens

__all__ = [
    "ESM2",
    "ESM2_CONFIGS",
    "Alphabet",
    "BatchConverter",
    "ContactPrecision",
    "ContactPredictionHead",
    "ESM2Config",
    "ESM2Finetuner",
    "ESM2Layer",
    "ESM2MaskedLM",
    "ESM2ResiduePredictor",
    "ESM2SequencePredictor",
    "FastaIndex",
    "ProteinRecord",
    "esm2_config",
    "fair_esm_to_hf",
    "hf_to_fair_esm",
    "load_esm2",
    "load_predictions",
    "mask_tokens",
    "read_fasta",
    "save_fair_esm",
]
