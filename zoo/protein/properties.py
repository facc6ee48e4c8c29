"""Labels computed from a sequence alone, so fine-tuning can run on the embedded proteins.

The embedded proteome carries no annotation, so the fine-tuning configs learn properties that are
defined by published formulas on the sequence (Kyte & Doolittle 1982, J. Mol. Biol. 157:105):

- ``gravy``: grand average of hydropathy, the mean Kyte-Doolittle value (sequence regression);
- ``transmembrane_residues``: residues inside a 19-residue window whose mean hydropathy is at least
  1.6, Kyte & Doolittle's criterion for a membrane-spanning helix (residue classification);
- ``is_membrane_protein``: at least one such window (sequence classification).

These are annotation heuristics, not measured biology (a signal peptide can pass the 1.6 bar, a
short or polar helix can miss it), but they are real, non-trivial functions of the sequence: the
window labels need ~19 residues of context, not the residue's own identity.
"""

from __future__ import annotations

import numpy as np

__all__ = ["KYTE_DOOLITTLE", "gravy", "hydropathy", "is_membrane_protein", "transmembrane_residues"]

#: Kyte-Doolittle hydropathy of the 20 amino acids; other letters (X, B, Z, U, O) count as 0.
KYTE_DOOLITTLE = {
    "A": 1.8, "R": -4.5, "N": -3.5, "D": -3.5, "C": 2.5, "Q": -3.5, "E": -3.5, "G": -0.4, "H": -3.2,
    "I": 4.5, "L": 3.8, "K": -3.9, "M": 1.9, "F": 2.8, "P": -1.6, "S": -0.8, "T": -0.7, "W": -0.9,
    "Y": -1.3, "V": 4.2,
}  # fmt: skip
_TABLE = np.zeros(128, dtype=np.float64)
for _residue, _value in KYTE_DOOLITTLE.items():
    _TABLE[ord(_residue)] = _value

TM_WINDOW = 19
TM_THRESHOLD = 1.6


def hydropathy(sequence: str) -> np.ndarray:
    """Per-residue Kyte-Doolittle values."""
    codes = np.frombuffer(sequence.upper().encode("ascii"), dtype=np.uint8)
    return _TABLE[np.minimum(codes, 127)]


def gravy(sequence: str) -> float:
    """Grand average of hydropathy (mean over the residues)."""
    return float(hydropathy(sequence).mean()) if sequence else 0.0


def transmembrane_residues(
    sequence: str, window: int = TM_WINDOW, threshold: float = TM_THRESHOLD
) -> np.ndarray:
    """Boolean per residue: inside some ``window`` whose mean hydropathy is >= ``threshold``."""
    values = hydropathy(sequence)
    covered = np.zeros(len(values), dtype=bool)
    if len(values) < window:
        return covered
    sums = np.convolve(values, np.ones(window), mode="valid")
    for start in np.flatnonzero(sums / window >= threshold):
        covered[start : start + window] = True
    return covered


def is_membrane_protein(sequence: str) -> bool:
    return bool(transmembrane_residues(sequence).any())
