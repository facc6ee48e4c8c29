"""The timm format both ways: ``zoo export --format timm`` loads in plain timm with equal logits, and an
``ImageClassifier`` starts from a local timm weights file (``pretrained_file``). Nothing is downloaded: every
file is written here."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import timm
import torch
from timm.layers import resample_abs_pos_embed

from zoo.errors import MissingFileError, ZooError
from zoo.export import ExportError, export_model
from zoo.inference import load_trained_model
from zoo.layers import ConvStemPatchEmbed
from zoo.vision import ImageClassifier, VisualPromptTuning

from ..conftest import CONFIGS

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning"),
]

TINY = {
    "vit_tiny": ["--model.init_args.model_kwargs={depth: 1}"],
    "deit_tiny": ["--model.init_args.model_kwargs={depth: 1}"],  # the zoo's convolutional stem
    "deit_tiny_distilled": ["--model.init_args.model_kwargs={depth: 1}"],
    "swin_tiny": [
        "--model.init_args.model_kwargs={window_size: 4, depths: [2, 2], embed_dim: 24, num_heads: [1, 2]}"
    ],
}
VIT = {"model_name": "vit_tiny_patch16_224", "patch_size": 8, "model_kwargs": {"depth": 1}}


def timm_from_folder(folder) -> torch.nn.Module:
    """What a timm user runs on the folder: config.json's arguments, the weights through timm's file loader."""
    config = json.loads((folder / "config.json").read_text())
    extra = {"embed_layer": ConvStemPatchEmbed} if "zoo" in config else {}  # a layer timm does not have
    overlay = {"file": str(folder / "model.safetensors"), "num_classes": config["num_classes"]}
    return timm.create_model(
        config["architecture"],
        pretrained=True,
        pretrained_cfg_overlay=overlay,
        **config["model_args"],
        **extra,
    ).eval()


@pytest.mark.parametrize("name", list(TINY))
def test_timm_folder_loads_in_timm_with_equal_logits(name, tmp_path):
    torch.manual_seed(0)
    trained = load_trained_model(["--config", str(CONFIGS / "vision" / f"{name}.yaml"), *TINY[name]], None)
    module = trained.module
    (entry,) = export_model(module, tmp_path, "timm")
    assert entry == {"format": "timm", "files": ["model.safetensors", "config.json"]}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == module.hparams.model_name and config["num_classes"] == 12
    assert config["model_args"]["img_size"] == [32, 32] and config["model_args"]["num_classes"] == 12
    assert config["label_names"] == trained.datamodule.class_names
    pretrained_cfg = config["pretrained_cfg"]
    assert pretrained_cfg["input_size"] == [3, 32, 32] and pretrained_cfg["mean"] == [0.5, 0.5, 0.5]
    assert pretrained_cfg["num_classes"] == 12 and pretrained_cfg["tag"] == "zoo"
    assert ("zoo" in config) == (module.hparams.stem == "conv")

    network = timm_from_folder(tmp_path)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(network(images), module(images), atol=1e-6, rtol=0)


def test_formats_without_a_timm_network_are_refused_clearly(tmp_path):
    vpt = VisualPromptTuning(**VIT)
    with pytest.raises(
        ExportError, match=r"--format 'timm': VisualPromptTuning exports as one of: pt2, onnx"
    ):
        export_model(vpt, tmp_path, "timm")


# --------------------------------------------------------------------------- starting from a timm file
def write_source(tmp_path, suffix: str, num_classes: int = 12, **kwargs) -> tuple[str, torch.nn.Module]:
    """A timm network with random weights saved as a plain timm state dict."""
    torch.manual_seed(1)
    source = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=num_classes, **kwargs
    )
    path = tmp_path / f"source{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(source.state_dict(), path)
    else:
        torch.save(source.state_dict(), path)
    return str(path), source.eval()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_pretrained_file_gives_the_source_weights(suffix, tmp_path):
    path, source = write_source(tmp_path, suffix)
    model = ImageClassifier(**VIT, pretrained_file=path).model
    assert model.state_dict().keys() == source.state_dict().keys()
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=0, rtol=0, msg=key)


def test_pretrained_file_with_other_classes_reinitialises_only_the_head(tmp_path):
    path, source = write_source(tmp_path, ".safetensors", num_classes=1000)
    model = ImageClassifier(**VIT, num_classes=5, pretrained_file=path).model
    assert model.head.weight.shape == (5, 192)
    for key, value in source.state_dict().items():
        if not key.startswith("head."):
            torch.testing.assert_close(model.state_dict()[key], value, atol=0, rtol=0, msg=key)
    # timm's initialisation of a fresh head: small truncated-normal weights, zero bias
    assert model.head.weight.std() < 0.03 and not model.head.bias.any()


def test_pretrained_file_resamples_position_embeddings_to_the_image_size(tmp_path):
    path, source = write_source(tmp_path, ".pth")
    model = ImageClassifier(**{**VIT, "img_size": 48}, pretrained_file=path).model  # 4x4 -> 6x6 tokens
    expected = resample_abs_pos_embed(source.pos_embed, new_size=(6, 6), num_prefix_tokens=1)
    assert model.pos_embed.shape == (1, 37, 192)
    torch.testing.assert_close(model.pos_embed, expected, atol=0, rtol=0)
    torch.testing.assert_close(
        model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight, atol=0, rtol=0
    )


def test_round_trip_through_the_timm_folder(tmp_path):
    """An exported folder's model.safetensors starts a new fit with the exported model's logits."""
    torch.manual_seed(0)
    first = ImageClassifier(**VIT, stem="conv").eval()
    export_model(first, tmp_path, "timm")
    second = ImageClassifier(**VIT, stem="conv", pretrained_file=str(tmp_path / "model.safetensors")).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(second(images), first(images), atol=0, rtol=0)


def test_checkpoints_do_not_need_the_pretrained_file_again(tmp_path):
    path, _ = write_source(tmp_path, ".safetensors")
    module = ImageClassifier(**VIT, pretrained_file=path)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["hyper_parameters"]["pretrained_file"] is None
    assert module.hparams.pretrained_file == path  # the module's own record is unchanged
    rebuilt = ImageClassifier(**checkpoint["hyper_parameters"])  # e.g. on a server without the file
    rebuilt.load_state_dict(checkpoint["state_dict"])


def test_missing_or_unfitting_pretrained_files_fail_clearly(tmp_path):
    with pytest.raises(MissingFileError, match=r"pretrained_file '.*nope\.safetensors' does not exist"):
        ImageClassifier(**VIT, pretrained_file=str(tmp_path / "nope.safetensors"))
    path, _ = write_source(tmp_path, ".safetensors")
    with pytest.raises(
        ZooError, match=r"source\.safetensors' does not fit vit_tiny_patch16_224 .*embed_dim=96"
    ):
        ImageClassifier(**{**VIT, "model_kwargs": {"depth": 1, "embed_dim": 96}}, pretrained_file=path)
    with pytest.raises(ZooError, match=r"does not fit vit_tiny_patch16_224 .*embed_layer"):
        ImageClassifier(**VIT, stem="conv", pretrained_file=path)  # a patch-stem file into a conv stem


def test_an_exported_timm_folder_is_a_prompt_tuning_backbone(tmp_path):
    """VPT's backbone_weights reads the file the same way: a 12-class export fits (VPT brings its own head)."""
    torch.manual_seed(0)
    classifier = ImageClassifier(**VIT).eval()
    export_model(classifier, tmp_path, "timm")
    vpt = VisualPromptTuning(**VIT, num_classes=3, backbone_weights=str(tmp_path / "model.safetensors"))
    for key, value in classifier.model.state_dict().items():
        torch.testing.assert_close(vpt.model.backbone.state_dict()[key], value, atol=0, rtol=0, msg=key)
    with pytest.raises(MissingFileError, match=r"backbone_weights '.*nope\.pth' does not exist"):
        VisualPromptTuning(**VIT, backbone_weights=str(tmp_path / "nope.pth"))
