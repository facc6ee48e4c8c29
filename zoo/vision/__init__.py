"""Vision transformers: ViT, DeiT (distilled), Swin through timm, and Visual Prompt Tuning.

``model`` builds the networks (plain ``nn.Module``s), ``prompted`` holds the VPT wrappers and
``module`` the LightningModules.
"""

from zoo.vision.model import load_classifier_backbone
from zoo.vision.module import ImageClassificationModule, ImageClassifier, VisualPromptTuning
from zoo.vision.prompted import PromptedSwin, PromptedViT

__all__ = [
    "ImageClassificationModule",
    "ImageClassifier",
    "PromptedSwin",
    "PromptedViT",
    "VisualPromptTuning",
    "load_classifier_backbone",
]
