"""LightningDataModules, installed as ``zoo.datamodules``; each has an embedded default dataset."""

from zoo.datamodules.images import ImageClassificationDataModule, ImageFolderDataset
from zoo.datamodules.shapes import ShapesDataset

__all__ = ["ImageClassificationDataModule", "ImageFolderDataset", "ShapesDataset"]
