"""Checkpoint conversion: fair-esm files and HF ``EsmForMaskedLM`` weights in, fair-esm files and HF folders out.

Everything is read with ``torch.load(weights_only=True)``. fair-esm's files also hold an
``argparse.Namespace`` (the training config), so exactly that type is allow-listed; nothing
else a file could smuggle in is unpickled. Rotary ``inv_freq`` buffers are copied from the
checkpoint (the published ones are fp16-rounded; recomputing them changes the outputs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import torch

from zoo.extras import require
from zoo.protein.model import ESM2

__all__ = [
    "convert_main",
    "fair_esm_to_hf",
    "hf_to_fair_esm",
    "load_esm2",
    "load_state_dict_file",
    "save_fair_esm",
    "save_hf",
]

_FAIR_PREFIX = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")
_HF_LAYER = re.compile(r"^esm\.encoder\.layer\.(\d+)\.(.+)$")
# transformers 5.x ``save_pretrained`` writes its shared buffer back under a wildcard layer index.
_HF_SHARED_INV_FREQ = (
    "esm.rotary_embeddings.inv_freq",
    "esm.encoder.layer.*.attention.self.rotary_embeddings.inv_freq",
)
# HF name inside a layer -> fair-esm name inside a layer
_HF_TO_FAIR_LAYER = {
    "attention.self.query": "self_attn.q_proj",
    "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.out_proj",
    "attention.LayerNorm": "self_attn_layer_norm",
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
    "LayerNorm": "final_layer_norm",
}
_HF_TOP = {
    "esm.embeddings.word_embeddings.weight": "embed_tokens.weight",
    "esm.encoder.emb_layer_norm_after.weight": "emb_layer_norm_after.weight",
    "esm.encoder.emb_layer_norm_after.bias": "emb_layer_norm_after.bias",
    "esm.contact_head.regression.weight": "contact_head.regression.weight",
    "esm.contact_head.regression.bias": "contact_head.regression.bias",
    "lm_head.decoder.weight": "lm_head.weight",
    "lm_head.bias": "lm_head.bias",
    "lm_head.dense.weight": "lm_head.dense.weight",
    "lm_head.dense.bias": "lm_head.dense.bias",
    "lm_head.layer_norm.weight": "lm_head.layer_norm.weight",
    "lm_head.layer_norm.bias": "lm_head.layer_norm.bias",
}
_HF_IGNORED = ("esm.embeddings.position_ids", "lm_head.decoder.bias", "esm.pooler.")


def load_state_dict_file(path: str | Path) -> dict:
    """``torch.load`` with only tensors, containers and ``argparse.Namespace`` allowed; safetensors too."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (nothing is downloaded)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle.UnpicklingError and friends carry the details
            raise ValueError(f"{str(path)!r} is not a loadable ESM-2 checkpoint: {error}") from error


def _hf_key(key: str) -> str:
    """Canonical HF key: ``esm.`` prefix (absent on ``EsmModel``), and the legacy LayerNorm names
    ``gamma``/``beta`` that transformers 5.x ``save_pretrained`` writes, read as ``weight``/``bias``."""
    if not key.startswith(("esm.", "lm_head.")):
        key = f"esm.{key}"
    if key.endswith(".gamma"):
        key = key.removesuffix(".gamma") + ".weight"
    elif key.endswith(".beta"):
        key = key.removesuffix(".beta") + ".bias"
    return key


def hf_to_fair_esm(state_dict: dict, num_layers: int | None = None) -> dict:
    """Rename an HF ``EsmForMaskedLM`` (or ``EsmModel``) state dict to fair-esm's keys.

    transformers 5.x keeps one shared ``esm.rotary_embeddings.inv_freq``; 4.x one per layer.
    Either way every layer gets its own copy, as fair-esm stores it.
    """
    state_dict = {_hf_key(k): v for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {}
    shared_inv_freq = next((state_dict[k] for k in _HF_SHARED_INV_FREQ if k in state_dict), None)
    layers = set()
    for key, value in state_dict.items():
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
            continue
        match = _HF_LAYER.match(key)
        if match:
            index, rest = match.groups()
            layers.add(int(index))
            if rest == "attention.self.rotary_embeddings.inv_freq":
                out[f"layers.{index}.self_attn.rot_emb.inv_freq"] = value
                continue
            module, _, leaf = rest.rpartition(".")
            if module in _HF_TO_FAIR_LAYER:
                out[f"layers.{index}.{_HF_TO_FAIR_LAYER[module]}.{leaf}"] = value
                continue
        if key in _HF_SHARED_INV_FREQ or key.startswith(_HF_IGNORED):
            continue
        raise KeyError(f"unexpected key {key!r} in a HF ESM state dict (is this an ESM-2 model?)")
    count = num_layers if num_layers is not None else (max(layers) + 1 if layers else 0)
    if shared_inv_freq is not None:
        for index in range(count):
            out.setdefault(f"layers.{index}.self_attn.rot_emb.inv_freq", shared_inv_freq)
    if "lm_head.weight" not in out and "embed_tokens.weight" in out:
        out["lm_head.weight"] = out["embed_tokens.weight"]  # tied; HF may omit the decoder copy
    return out


def fair_esm_to_hf(state_dict: dict) -> dict:
    """The inverse of ``hf_to_fair_esm`` (transformers 5.x layout: one shared ``inv_freq``)."""
    top = {v: k for k, v in _HF_TOP.items()}
    layer = {v: k for k, v in _HF_TO_FAIR_LAYER.items()}
    out = {}
    for key, value in state_dict.items():
        if key in top:
            out[top[key]] = value
            continue
        index, rest = key.split(".", 2)[1:]
        if rest == "self_attn.rot_emb.inv_freq":
            out.setdefault("esm.rotary_embeddings.inv_freq", value)
            continue
        module, _, leaf = rest.rpartition(".")
        out[f"esm.encoder.layer.{index}.{layer[module]}.{leaf}"] = value
    return out


def _infer_config(state_dict: dict) -> tuple[int, int, int]:
    """``(num_layers, embed_dim, heads)`` from shapes: heads = embed_dim / (2 * len(inv_freq))."""
    try:
        embed_dim = state_dict["embed_tokens.weight"].shape[1]
        inv_freq = state_dict["layers.0.self_attn.rot_emb.inv_freq"]
    except KeyError as error:
        raise ValueError(f"cannot infer the ESM-2 architecture: state dict has no {error}") from error
    num_layers = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("layers."))
    return num_layers, embed_dim, embed_dim // (2 * inv_freq.numel())


def _cfg_value(cfg, name: str):
    return cfg[name] if isinstance(cfg, dict) else getattr(cfg, name)


def _from_fair_esm_dict(data: dict, path: Path, regression: dict | None) -> tuple[dict, tuple, bool]:
    state_dict = dict(data["model"])
    if regression is not None:
        state_dict.update(regression["model"])
    state_dict = {_FAIR_PREFIX.sub("", k): v for k, v in state_dict.items()}
    cfg = data.get("cfg", {}).get("model") if isinstance(data.get("cfg"), dict) else None
    if cfg is None:
        return state_dict, _infer_config(state_dict), True
    try:
        dims = tuple(
            _cfg_value(cfg, n) for n in ("encoder_layers", "encoder_embed_dim", "encoder_attention_heads")
        )
        token_dropout = bool(_cfg_value(cfg, "token_dropout"))
    except (KeyError, AttributeError) as error:
        raise ValueError(f"{str(path)!r}: cfg['model'] lacks {error} (not an ESM-2 file?)") from error
    return state_dict, dims, token_dropout


def _read(path: Path) -> tuple[dict, tuple[int, int, int], bool]:
    """State dict in fair-esm keys, ``(layers, dim, heads)`` and token_dropout, from any supported source."""
    if path.is_dir():
        return _read_hf_dir(path)
    data = load_state_dict_file(path)
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} holds a {type(data).__name__}, expected a state dict")
    if "model" in data and isinstance(data["model"], dict):  # fair-esm hub file
        sibling = Path(str(path.with_suffix("")) + "-contact-regression.pt")
        regression = load_state_dict_file(sibling) if sibling.is_file() else None
        return _from_fair_esm_dict(data, path, regression)
    if "state_dict" in data and isinstance(data["state_dict"], dict):  # a Lightning checkpoint
        inner = {k.removeprefix("model."): v for k, v in data["state_dict"].items() if k.startswith("model.")}
        return inner, _infer_config(inner), True
    if any(k.startswith(("esm.", "lm_head.decoder", "embeddings.word_embeddings")) for k in data):
        state_dict = hf_to_fair_esm(data)
        return state_dict, _infer_config(state_dict), True
    state_dict = {_FAIR_PREFIX.sub("", k): v for k, v in data.items()}
    if "embed_tokens.weight" not in state_dict:
        raise ValueError(
            f"{str(path)!r} is neither a fair-esm file, a HF EsmForMaskedLM state dict nor an ESM2 state dict"
        )
    return state_dict, _infer_config(state_dict), True


def _read_hf_dir(path: Path) -> tuple[dict, tuple[int, int, int], bool]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(path)!r} is a directory without config.json (expected a HF model dir)")
    config = json.loads(config_file.read_text())
    if config.get("position_embedding_type", "absolute") != "rotary" or config.get("emb_layer_norm_before"):
        raise ValueError(f"{str(config_file)!r} describes an ESM-1 style model; only ESM-2 is supported")
    weights = next(
        (path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None
    )
    if weights is None:
        raise FileNotFoundError(f"{str(path)!r} has no model.safetensors or pytorch_model.bin")
    dims = (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"])
    state_dict = hf_to_fair_esm(load_state_dict_file(weights), num_layers=dims[0])
    return state_dict, dims, bool(config.get("token_dropout", False))


def load_esm2(path: str | Path, strict: bool = True) -> ESM2:
    """Build an ``ESM2`` from a local checkpoint of any supported kind (see ``ESM2.from_pretrained``).

    Contact-regression weights may be absent (fair-esm ships them separately); they then stay at
    their random initialisation, with a warning, as fair-esm does. Everything else must be present.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"ESM-2 checkpoint {str(path)!r} does not exist (from_pretrained is local-only)"
        )
    state_dict, (num_layers, embed_dim, heads), token_dropout = _read(path)
    model = ESM2(num_layers, embed_dim, heads, token_dropout=token_dropout)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not k.startswith("contact_head.")]
    if strict and (missing or unexpected):
        raise ValueError(f"{str(path)!r} does not match ESM2: missing {missing}, unexpected {unexpected}")
    if "contact_head.regression.weight" not in state_dict:
        import warnings

        warnings.warn(
            f"{str(path)!r} has no contact regression weights; contacts are untrained", stacklevel=2
        )
    return model


def save_fair_esm(model: ESM2, path: str | Path) -> Path:
    """Write ``path`` (LM weights, ``encoder.`` prefix, ``cfg``) and ``<stem>-contact-regression.pt``.

    This is the layout ``esm.pretrained.load_model_and_alphabet_local`` reads. Files are written
    to a temporary name first and renamed, so an interrupted save never leaves half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    regression = {k: state.pop(k) for k in list(state) if k.startswith("contact_head.")}
    cfg = argparse.Namespace(
        encoder_layers=model.num_layers,
        encoder_embed_dim=model.embed_dim,
        encoder_ffn_embed_dim=4 * model.embed_dim,
        encoder_attention_heads=model.attention_heads,
        token_dropout=model.token_dropout,
        arch="esm2",
    )
    main = {"model": {f"encoder.{k}": v for k, v in state.items()}, "cfg": {"model": cfg}}
    _atomic_save(main, path)
    _atomic_save({"model": regression}, Path(str(path.with_suffix("")) + "-contact-regression.pt"))
    return path


def save_hf(model: ESM2, folder: str | Path) -> Path:
    """Write a HF model folder (``config.json`` + weights) that ``transformers.EsmForMaskedLM.from_pretrained``
    loads, with the configuration of fair-esm's published ESM-2 (rotary positions, pad 1, mask 32)."""
    transformers = require("transformers", "hf", "writing an ESM-2 model in the Hugging Face format")
    config = transformers.EsmConfig(
        vocab_size=len(model.alphabet.all_toks), mask_token_id=model.alphabet.mask_idx,
        pad_token_id=model.alphabet.padding_idx, hidden_size=model.embed_dim, num_hidden_layers=model.num_layers,
        num_attention_heads=model.attention_heads, intermediate_size=4 * model.embed_dim,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=1026,
        layer_norm_eps=1e-5, position_embedding_type="rotary", emb_layer_norm_before=False,
        token_dropout=model.token_dropout, tie_word_embeddings=True, architectures=["EsmForMaskedLM"],
    )  # fmt: skip
    hf = transformers.EsmForMaskedLM(config)
    hf.load_state_dict(fair_esm_to_hf(model.state_dict()), strict=False)
    folder = Path(folder)
    hf.save_pretrained(folder)
    return folder


def convert_main(argv: list[str] | None = None) -> None:
    """``zoo convert-esm``: any ESM-2 checkpoint the zoo reads, written as fair-esm or HF."""
    parser = argparse.ArgumentParser(
        prog="zoo convert-esm",
        description="Convert an ESM-2 checkpoint (a fair-esm .pt file, a HF EsmForMaskedLM folder or state dict, "
        "or a zoo ESM2 save) to the fair-esm file layout or a HF model folder.",
    )
    parser.add_argument("source", help="the checkpoint to read")
    parser.add_argument("output", help="the .pt file (fair-esm) or folder (hf) to write")
    parser.add_argument("--to", choices=("fair-esm", "hf"), required=True, help="the format to write")
    args = parser.parse_args(argv)
    model = ESM2.from_pretrained(args.source)
    written = save_fair_esm(model, args.output) if args.to == "fair-esm" else save_hf(model, args.output)
    print(f"zoo: wrote {written} ({args.to}; {model.num_layers} layers, {model.embed_dim}-d)")


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
