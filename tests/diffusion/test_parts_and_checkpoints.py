"""Parts swapped from the command line, checkpoints reloaded from the CLI and from the earlier flat layout."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from zoo.callbacks import EMA
from zoo.cli import ZooCLI
from zoo.diffusion import (
    Autoencoder,
    CaptionConditioning,
    ClassConditioning,
    ControlNetDiffusion,
    DiscriminatorConfig,
    LatentDiffusion,
    LoRAConfig,
    upgrade_checkpoint,
)
from zoo.diffusion.evaluation import load_latent_diffusion
from zoo.diffusion.model import load_first_stage

from ..conftest import CONFIGS
from .conftest import tiny_captions

QUIET = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.logger=false",
]


def _cli(config: str, *args: str) -> ZooCLI:
    with torch.device("meta"):  # the network's layout only, nothing allocated
        return ZooCLI(
            args=["--config", str(CONFIGS / "diffusion" / config), *args, *QUIET],
            run=False,
            save_config_callback=None,
        )


def test_each_part_swaps_with_one_argument():
    model = _cli(
        "ldm_unet_class.yaml",
        "--model.init_args.conditioning=CaptionConditioning",
        "--model.init_args.objective.prediction_type=v_prediction",
        "--model.init_args.sampling.steps=10",
        "--model.init_args.lora.rank=4",
    ).model
    assert isinstance(model.conditioning, CaptionConditioning) and model.conditioning.dim == 64
    assert model.conditioner.tokenizer is not None  # the vocabulary was linked from the data
    assert model.objective.prediction_type == "v_prediction" and model.objective.snr_gamma == 5.0
    assert model.sampling.steps == 10 and model.sampling.guidance_scale == 3.0
    assert model.lora == LoRAConfig(rank=4)
    dit = _cli("ldm_dit_class.yaml").model
    assert type(dit.model).__name__ == "DiTTransformer2DModel" and dit.conditioning == ClassConditioning(
        dim=128
    )


def test_parts_are_saved_as_plain_data(tiny_ldm_kwargs):
    models = [
        LatentDiffusion(**{**tiny_ldm_kwargs, "lora": LoRAConfig(rank=2)}),
        ControlNetDiffusion(**tiny_ldm_kwargs),
        Autoencoder(
            model_kwargs={"base_channels": 8, "norm_num_groups": 8}, discriminator=DiscriminatorConfig()
        ),
    ]
    for model in models:  # what the logger's hparams.yaml and the checkpoint receive
        for hparams in (model.hparams_initial, model.hparams):
            assert yaml.safe_load(yaml.safe_dump(dict(hparams))) == dict(hparams)
    assert models[1].hparams.conditioning == {
        "class_path": "zoo.diffusion.conditioning.ClassConditioning",
        "init_args": {"dim": 16, "dropout": 0.1},
    }


def _fit_from_config(config: str, root, *args: str) -> str:
    ZooCLI(
        args=[
            "fit", "--config", str(CONFIGS / "diffusion" / config), *args, *QUIET,
            "--trainer.max_steps=1", "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={root}",
            "--data.init_args.train_size=8", "--data.init_args.val_size=8", "--data.init_args.batch_size=8",
        ]
    )  # fmt: skip
    return str(next(root.rglob("last.ckpt")))


@pytest.mark.parametrize(
    "config,cls", [("ldm_unet_caption.yaml", LatentDiffusion), ("autoencoder_vq_f4.yaml", Autoencoder)]
)
def test_cli_built_checkpoints_reload_with_their_parts(config, cls, tmp_path):
    path = _fit_from_config(config, tmp_path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # plain data, no pickled classes
    hparams = checkpoint["hyper_parameters"]
    assert hparams["_instantiator"] == "lightning.pytorch.cli.instantiate_module"
    model = cls.load_from_checkpoint(path)
    for name, value in checkpoint["state_dict"].items():
        assert torch.equal(model.state_dict()[name], value), name
    if cls is LatentDiffusion:
        assert hparams["conditioning"]["class_path"].endswith("CaptionConditioning")
        assert model.conditioning == CaptionConditioning(dim=64, layers=2, heads=4, max_length=12)
        assert model.objective.snr_gamma == 5.0
    else:
        assert hparams["discriminator"]["regularizer"] == "spectral_norm"
        assert model.disc_config.regularizer == "spectral_norm" and model.hparams.model_name == "vq"


# --------------------------------------------------------------------------------- the earlier layout
_CONDITIONING_KIND = {
    "ClassConditioning": "class",
    "CaptionConditioning": "caption",
    "NoConditioning": "none",
}


def _flat_ldm_hparams(hp: dict) -> dict:
    """The hyper-parameters the earlier ``LatentDiffusion`` saved for the same model (its 40 flat arguments)."""
    flat = {k: v for k, v in hp.items() if k not in ("model_name", "model_kwargs", "objective", "sampling")}
    autoencoder = hp["autoencoder"]
    flat["autoencoder"] = {"kind": autoencoder["model_name"], **autoencoder["model_kwargs"]}
    flat.update(in_channels=3, denoiser=hp["model_name"], denoiser_config=hp["model_kwargs"])
    conditioning = hp["conditioning"]["init_args"]
    flat["conditioning"] = _CONDITIONING_KIND[hp["conditioning"]["class_path"].rsplit(".", 1)[-1]]
    flat.update(context_dim=conditioning["dim"], condition_dropout=conditioning["dropout"])
    flat.update(
        text_layers=conditioning.get("layers", 2),
        text_heads=conditioning.get("heads", 4),
        max_caption_length=conditioning.get("max_length", 16),
        text_encoder_path=conditioning.get("text_encoder_path"),
    )
    flat.update(hp["objective"])
    sampling = dict(hp["sampling"])
    flat.update(sampling_steps=sampling.pop("steps"), **sampling)
    lora = hp.pop("lora") or {"rank": 0, "alpha": None, "targets": None}
    flat.pop("lora")
    flat.update(lora_rank=lora["rank"], lora_alpha=lora["alpha"], lora_targets=lora["targets"])
    return flat


def _earlier_layout(checkpoint: dict, flat_hparams: dict, renames) -> dict:
    """``checkpoint`` as the earlier module wrote it: flat hyper-parameters, keys and EMA names renamed back."""

    def back(name: str) -> str:
        for old, new in renames:
            if name.startswith(new):
                return old + name[len(new) :]
        return name

    old = dict(checkpoint, hyper_parameters=flat_hparams)
    old["state_dict"] = {back(k): v for k, v in checkpoint["state_dict"].items()}
    old["callbacks"] = {
        key: {**state, "names": [back(n) for n in state["names"]]} if "names" in state else state
        for key, state in checkpoint.get("callbacks", {}).items()
    }
    return old


class _Data(L.LightningDataModule):
    def __init__(self, batch: dict) -> None:
        super().__init__()
        self.batch = batch

    def train_dataloader(self) -> DataLoader:
        return DataLoader([self.batch] * 4, batch_size=None)


def _trainer(max_steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )  # fmt: skip


def test_earlier_latent_diffusion_checkpoints_upgrade_load_and_resume(tiny_ldm_kwargs, batch, tmp_path):
    kwargs = {**tiny_ldm_kwargs, "conditioning": tiny_captions(), "lora": LoRAConfig(rank=2, alpha=4)}
    model = LatentDiffusion(**kwargs)
    trainer = _trainer(1, callbacks=[EMA(decay=0.9)])
    trainer.fit(model, datamodule=_Data(batch))
    trainer.save_checkpoint(tmp_path / "current.ckpt")
    current = torch.load(tmp_path / "current.ckpt", weights_only=True)
    flat = _flat_ldm_hparams(dict(current["hyper_parameters"]))
    old = _earlier_layout(current, flat, LatentDiffusion.state_dict_renames)
    assert any(k.startswith("denoiser.model.") for k in old["state_dict"])
    torch.save(old, tmp_path / "old.ckpt")

    upgraded = upgrade_checkpoint(old)
    assert upgraded["hyper_parameters"] == current["hyper_parameters"]
    assert list(upgraded["state_dict"]) == list(current["state_dict"])
    (key,) = current["callbacks"]
    assert upgraded["callbacks"][key]["names"] == current["callbacks"][key]["names"]
    assert upgrade_checkpoint(upgraded) is upgraded  # a current checkpoint passes through
    loaded = LatentDiffusion.load_from_checkpoint(tmp_path / "old.ckpt")
    assert loaded.conditioning == tiny_captions() and loaded.lora == LoRAConfig(rank=2, alpha=4)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in current["state_dict"].items())
    with_ema = load_latent_diffusion(str(tmp_path / "old.ckpt"))  # what the evaluation command loads
    assert all(torch.equal(with_ema.state_dict()[k], v) for k, v in EMA.ema_state_dict(current).items())

    # a trainer (zoo fit/validate/predict --ckpt_path) renames the weights and the EMA's names itself
    resumed = LatentDiffusion(**kwargs)
    ema = EMA(decay=0.9)
    _trainer(2, callbacks=[ema]).fit(resumed, datamodule=_Data(batch), ckpt_path=tmp_path / "old.ckpt")
    assert ema.num_updates == 2 and "model.conv_in.weight" in ema.names


def test_earlier_autoencoder_checkpoints_upgrade_load_and_serve_as_first_stage(batch, tmp_path):
    model = Autoencoder(
        model_name="vq",
        model_kwargs={"latent_channels": 3, "base_channels": 8, "norm_num_groups": 8},
        img_size=16,
        discriminator=DiscriminatorConfig(start=0, channels=8, layers=2, regularizer="spectral_norm"),
    )
    trainer = _trainer(1)
    trainer.fit(model, DataLoader([batch], batch_size=None))
    trainer.save_checkpoint(tmp_path / "current.ckpt")
    current = torch.load(tmp_path / "current.ckpt", weights_only=True)
    hp = current["hyper_parameters"]
    disc = {f"disc_{k}": v for k, v in hp["discriminator"].items() if k not in ("gp_weight",)}
    flat = {
        "kind": hp["model_name"], **hp["model_kwargs"], "img_size": hp["img_size"], **hp["loss"], **disc,
        "gp_weight": hp["discriminator"]["gp_weight"], "num_logged_images": hp["num_logged_images"],
        "channels_last": hp["channels_last"],
    }  # fmt: skip
    old = _earlier_layout(current, flat, Autoencoder.state_dict_renames)
    assert any(k.startswith("first_stage.autoencoder.") for k in old["state_dict"])
    torch.save(old, tmp_path / "old.ckpt")
    newer = ("compile",)  # arguments added after the flat layout: absent, they take their defaults
    assert upgrade_checkpoint(old)["hyper_parameters"] == {k: v for k, v in hp.items() if k not in newer}
    model.eval()
    expected = model(batch["image"])
    loaded = Autoencoder.load_from_checkpoint(tmp_path / "old.ckpt").eval()
    assert loaded.disc_config == model.disc_config and torch.equal(loaded(batch["image"]), expected)
    for path in ("old.ckpt", "current.ckpt"):
        stage = load_first_stage(str(tmp_path / path))
        assert torch.allclose(stage.decode(stage.encode(batch["image"])), expected, atol=1e-5)
