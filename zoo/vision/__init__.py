"""Vision transformers: ViT, DeiT (distilled), Swin through timm, and Visual Prompt Tuning."""

from zoo.vision.classifier import ImageClassifier
from zoo.vision.prompted import PromptedSwin, PromptedViT
from zoo.vision.vpt import VisualPromptTuning

__all__ = ["ImageClassifier", "PromptedSwin", "PromptedViT", "VisualPromptTuning"]
