"""Visual Prompt Tuning: what trains, frozen backbone, prompt placement, prompt-only and older checkpoints."""

from __future__ import annotations

import lightning as L
import pytest
import timm
import torch

from zoo.base import rename_keys
from zoo.vision import ImageClassifier, PromptedSwin, PromptedViT, VisualPromptTuning
from zoo.vision.prompted import prompted_backbone

VIT = {"model_name": "vit_tiny_patch16_224", "patch_size": 8, "model_kwargs": {"depth": 3}}
SWIN = {
    "model_name": "swin_tiny_patch4_window7_224",
    "patch_size": 2,
    "model_kwargs": {"window_size": 4, "depths": (2, 2, 2, 2)},
}


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
@pytest.mark.parametrize("arch", [VIT, SWIN], ids=["vit", "swin"])
def test_only_prompts_and_head_train(arch, deep):
    module = VisualPromptTuning(**arch, deep=deep, num_prompts=5)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("prompts" in n or n.startswith("model.head.") for n in trainable)
    module.training_step({"image": torch.randn(2, 3, 32, 32), "label": torch.tensor([0, 1])}, 0).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters() if p.requires_grad)
    assert 0 < module.trainable_fraction < 0.2


def test_prompt_counts_follow_shallow_and_deep():
    shallow = VisualPromptTuning(**VIT, num_prompts=4, deep=False).model
    deep = VisualPromptTuning(**VIT, num_prompts=4, deep=True).model
    assert isinstance(shallow, PromptedViT)
    assert shallow.prompts.shape == (1, 4, 192) and deep.prompts.shape == (3, 4, 192)
    swin_shallow = VisualPromptTuning(**SWIN, num_prompts=4).model
    swin_deep = VisualPromptTuning(**SWIN, num_prompts=4, deep=True).model
    assert isinstance(swin_deep, PromptedSwin)
    count = lambda net: sum(1 for n, _ in net.named_parameters() if n.endswith("prompts"))  # noqa: E731
    assert count(swin_shallow) == 1 and count(swin_deep) == 8


def test_backbone_stays_in_eval_mode_when_lightning_calls_train():
    module = VisualPromptTuning(
        **{**VIT, "model_kwargs": {"depth": 2, "drop_path_rate": 0.5, "drop_rate": 0.5}}
    )
    module.train()
    assert not module.model.backbone.training
    assert module.model.prompt_dropout.training
    images = torch.randn(2, 3, 32, 32)
    features = [module.model.forward_features(images) for _ in range(2)]
    assert torch.equal(*features), "frozen backbone must not apply dropout / drop-path"


def test_prompts_sit_after_the_class_token_without_position_embedding():
    """Shallow VPT = the backbone run on [cls+pos, prompts, patches+pos], computed here by hand."""
    torch.manual_seed(0)
    network = VisualPromptTuning(**VIT, num_prompts=3).model.eval()
    vit = network.backbone
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = vit._pos_embed(vit.patch_embed(images))
        tokens = torch.cat([tokens[:, :1], network.prompts[0].expand(2, -1, -1), tokens[:, 1:]], dim=1)
        expected = vit.norm(vit.blocks(tokens))
        torch.testing.assert_close(network.forward_features(images), expected)


def test_swin_window_prompts_change_the_output_only_through_attention():
    torch.manual_seed(0)
    network = VisualPromptTuning(**SWIN, num_prompts=2, deep=True).model.eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = network(images)
        for name, param in network.named_parameters():
            if name.endswith("prompts"):
                param.mul_(3.0)
        assert not torch.allclose(before, network(images))


def test_rejects_a_backbone_it_cannot_prompt():
    with pytest.raises(TypeError, match="VisionTransformer or SwinTransformer backbone, got ResNet"):
        prompted_backbone(
            timm.create_model("resnet18"), num_classes=3, num_prompts=2, deep=False, dropout=0.0
        )


def test_missing_backbone_files_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt"):
        VisualPromptTuning(backbone_checkpoint=str(tmp_path / "nope.ckpt"))
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        VisualPromptTuning(**VIT, backbone_weights=str(tmp_path / "nope.safetensors"))


def test_prompt_only_checkpoint_from_a_zoo_backbone(tmp_path, tiny_image_data):
    """Train a classifier, prompt-tune on it, save prompts+head only, reload to identical outputs."""
    L.seed_everything(0)
    classifier = ImageClassifier(
        model_name="deit_tiny_patch16_224", patch_size=8, stem="conv", model_kwargs={"depth": 2}
    )
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(classifier, tiny_image_data)
    backbone_ckpt = tmp_path / "backbone.ckpt"
    trainer.save_checkpoint(backbone_ckpt)

    vpt = VisualPromptTuning(backbone_checkpoint=str(backbone_ckpt), num_prompts=4, deep=True)
    torch.testing.assert_close(
        vpt.model.backbone.state_dict()["blocks.0.attn.qkv.weight"],
        classifier.model.state_dict()["blocks.0.attn.qkv.weight"],
    )
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(vpt, tiny_image_data)
    vpt_ckpt = tmp_path / "vpt.ckpt"
    trainer.save_checkpoint(vpt_ckpt)

    saved = torch.load(vpt_ckpt, weights_only=True)["state_dict"]
    assert set(saved) == {"model.prompts", "model.head.weight", "model.head.bias"}
    restored = VisualPromptTuning.load_from_checkpoint(vpt_ckpt).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(restored(images), vpt.eval()(images))


def test_local_timm_weights_file_is_loaded(tmp_path):
    reference = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    path = tmp_path / "vit.pth"
    torch.save(reference.state_dict(), path)
    vpt = VisualPromptTuning(**{**VIT, "model_kwargs": {"depth": 2}}, backbone_weights=str(path))
    torch.testing.assert_close(vpt.model.backbone.pos_embed, reference.pos_embed)
    assert vpt.backbone_from_file


def test_example_inputs_run_through_the_module():
    module = VisualPromptTuning(**VIT).eval()
    (images,) = module.example_inputs(batch_size=3)
    assert images.shape == (3, 3, 32, 32)
    assert module(*module.example_inputs()).shape == (2, 12)


def _save_as_older_version(module: VisualPromptTuning, path) -> None:
    """A checkpoint as earlier versions wrote it: ``network.`` keys, ``backbone`` / ``backbone_kwargs``."""
    checkpoint = {
        "pytorch-lightning_version": L.__version__,
        "state_dict": rename_keys(module.state_dict(), [("model.", "network.")]),
        "hyper_parameters": {
            {"model_name": "backbone", "model_kwargs": "backbone_kwargs"}.get(k, k): v
            for k, v in module.hparams.items()
            if k != "class_names"
        },
    }
    module.on_save_checkpoint(checkpoint)
    checkpoint["state_dict"] = rename_keys(checkpoint["state_dict"], [("model.", "network.")])
    torch.save(checkpoint, path)


def test_a_checkpoint_of_an_older_version_loads(tmp_path):
    torch.manual_seed(0)
    module = VisualPromptTuning(**VIT, num_prompts=3, deep=True).eval()
    path = tmp_path / "old.ckpt"
    _save_as_older_version(module, path)
    assert any(k.startswith("network.") for k in torch.load(path, weights_only=True)["state_dict"])
    restored = VisualPromptTuning.load_from_checkpoint(path).eval()
    assert restored.hparams.model_kwargs == {"depth": 3} and restored.hparams.class_names is None
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(restored(images), module(images))


def test_an_older_prompt_only_checkpoint_keeps_the_prompts_inside_a_swin_backbone(tmp_path, tiny_image_data):
    reference = timm.create_model(SWIN["model_name"], img_size=32, patch_size=2, **SWIN["model_kwargs"])
    weights = tmp_path / "swin.pth"
    torch.save(reference.state_dict(), weights)
    module = VisualPromptTuning(**SWIN, backbone_weights=str(weights), num_prompts=2, deep=True).eval()
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("prompts"):
                param.normal_()
    path = tmp_path / "old.ckpt"
    _save_as_older_version(module, path)
    saved = torch.load(path, weights_only=True)
    assert saved["vpt_backbone_omitted"]
    assert "network.backbone.layers.0.blocks.0.attn.prompts" in saved["state_dict"]
    restored = VisualPromptTuning.load_from_checkpoint(path).eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(restored(images), module(images))
    fresh = VisualPromptTuning(**SWIN, backbone_weights=str(weights), num_prompts=2, deep=True)
    trainer = L.Trainer(
        limit_val_batches=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.validate(fresh, tiny_image_data, ckpt_path=path)
    assert "val/acc" in trainer.callback_metrics
