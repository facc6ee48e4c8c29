"""LightningDataModules, installed as ``zoo.datamodules``; each has an embedded default dataset."""

from zoo.datamodules.images import ImageClassificationDataModule, ImageFolderDataset
from zoo.datamodules.protein import ProteinDataModule, read_fasta, synthetic_proteins
from zoo.datamodules.shapes import ShapesDataset

__all__ = [
    "ImageClassificationDataModule",
    "ImageFolderDataset",
    "ProteinDataModule",
    "ShapesDataset",
    "read_fasta",
    "synthetic_proteins",
]
