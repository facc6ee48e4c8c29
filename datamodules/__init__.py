"""LightningDataModules, installed as ``zoo.datamodules``; each has an embedded default dataset."""

from zoo.datamodules.bev import BEVDetectionDataModule, NuScenesInfoDataset, SyntheticSceneDataset
from zoo.datamodules.captioned_images import CaptionedImageDataModule
from zoo.datamodules.images import ImageClassificationDataModule, ImageFolderDataset
from zoo.datamodules.instance_images import InstanceImageDataModule
from zoo.datamodules.multitask import MultitaskDataModule
from zoo.datamodules.protein_labels import ProteinLabelDataModule
from zoo.datamodules.proteins import ProteinDataModule, TokenBudgetBatchSampler
from zoo.datamodules.shapes import ShapesDataset
from zoo.protein.fasta import read_fasta

__all__ = [
    "BEVDetectionDataModule",
    "CaptionedImageDataModule",
    "ImageClassificationDataModule",
    "ImageFolderDataset",
    "InstanceImageDataModule",
    "MultitaskDataModule",
    "NuScenesInfoDataset",
    "ProteinDataModule",
    "ProteinLabelDataModule",
    "ShapesDataset",
    "SyntheticSceneDataset",
    "TokenBudgetBatchSampler",
    "read_fasta",
]
