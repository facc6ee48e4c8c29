"""The ``zoo`` command: Lightning's ``fit/validate/test/predict`` plus the zoo's tools, one front door.

This module stays light (no torch, no Lightning at import): ``zoo --help`` and ``zoo list`` answer at once,
and ``zoo fit`` imports Lightning and the one family its config names (``zoo.cli``). Errors caused by the
user's input (``zoo.errors.ZooError``) print as one paragraph and exit with status 2; ``ZOO_DEBUG=1`` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

__all__ = ["TOOLS", "main"]

LIGHTNING_COMMANDS = {
    "fit": "train a model from a config (then validates, keeps the best and last checkpoints)",
    "validate": "evaluate a checkpoint on the validation split",
    "test": "evaluate a checkpoint on the test split",
    "predict": "write one record per input (predictions.jsonl, tensors, PNGs) under the run folder",
}


def _consolidate(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="zoo consolidate", description="Merge a sharded FSDP/FSDP2 checkpoint into one file."
    )
    parser.add_argument(
        "folder", help="the sharded checkpoint directory (e.g. runs/.../epoch=0-step=100.ckpt)"
    )
    parser.add_argument("output", help="the single-file checkpoint to write")
    args = parser.parse_args(argv)
    from zoo.checkpointing import consolidate_checkpoint

    checkpoint = consolidate_checkpoint(args.folder, args.output)
    tensors, step = len(checkpoint["state_dict"]), checkpoint.get("global_step")
    print(f"zoo: wrote {args.output} ({tensors} tensors, global step {step})")


def _export_ema(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="zoo export-ema",
        description="Write a checkpoint whose model weights are the EMA weights of a run (zoo.callbacks.EMA), "
        "loadable by the model class and by `zoo validate/test/predict`.",
    )
    parser.add_argument("checkpoint", help="a checkpoint written with the EMA callback")
    parser.add_argument("output", help="the checkpoint to write")
    args = parser.parse_args(argv)
    from zoo.callbacks import EMA

    path = EMA.export(args.checkpoint, args.output)
    print(f"zoo: wrote {path} (EMA weights as the model's state_dict)")


MODEL_OPTION_HELP = "its LightningModule (short or dotted name) when the checkpoint does not say"


def _checkpoint_and_model_class(path: str, model: str | None) -> tuple[dict, type]:
    """A checkpoint (read with errors that name the file) and the model class that wrote it: ``--model``, or
    the class the zoo CLI recorded in its hyper-parameters."""
    from zoo.checkpointing import load_checkpoint_file
    from zoo.errors import ZooError
    from zoo.registry import import_class

    checkpoint = load_checkpoint_file(path, weights_only=True)
    class_path = model or (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    if not class_path:
        raise ZooError(f"{path} does not name its model class: pass --model (e.g. --model ImageClassifier)")
    return checkpoint, import_class(class_path)


def _inspect_compressed(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="zoo inspect-compressed",
        description="Load a checkpoint written with the compression callbacks (pruning, quantization, weight "
        "sharing) into its model, outside Lightning, and report what was compressed.",
    )
    parser.add_argument("checkpoint", help="e.g. runs/.../compressed.ckpt")
    parser.add_argument("--model", help=MODEL_OPTION_HELP)
    args = parser.parse_args(argv)
    from zoo.callbacks.compression.records import CHECKPOINT_KEY, load_compressed, state_dict_bytes

    checkpoint, model_class = _checkpoint_and_model_class(args.checkpoint, args.model)
    hparams = checkpoint.get("hyper_parameters") or {}
    arguments = model_class.upgrade_hyperparameters(
        {k: v for k, v in hparams.items() if not k.startswith("_")}
    )
    model = load_compressed(model_class(**arguments), checkpoint).eval()
    records = checkpoint.get(CHECKPOINT_KEY) or []
    print(f"zoo: {args.checkpoint} loads into {model_class.__name__}: "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, {state_dict_bytes(model) / 1e6:.2f} MB of weights")  # fmt: skip
    for record in records:
        layers = record.get("layers") or []
        print(f"  {record.get('kind')}: {len(layers)} layers" if layers else f"  {record.get('kind')}")


def _upgrade_checkpoint(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="zoo upgrade-checkpoint",
        description="Rewrite a checkpoint of an earlier zoo version with today's argument names and weight keys "
        "(the model classes also read such checkpoints directly).",
    )
    parser.add_argument("checkpoint", help="the checkpoint to read")
    parser.add_argument("output", help="the checkpoint to write")
    parser.add_argument("--model", help=MODEL_OPTION_HELP)
    args = parser.parse_args(argv)
    import torch

    from zoo.checkpointing import atomic_torch_save

    checkpoint, model_class = _checkpoint_and_model_class(args.checkpoint, args.model)
    atomic_torch_save(model_class.upgrade_checkpoint(checkpoint), args.output)
    print(f"zoo: wrote {args.output} ({model_class.__name__}, torch {torch.__version__})")


#: name -> (help, runner: a ``main(argv)`` given as ``"module:function"`` or a local function)
TOOLS: dict[str, tuple[str, str | Callable[[Sequence[str]], None]]] = {
    "list": ("print the model table (name, task, parameters, config)", "zoo.registry:main"),
    "consolidate": ("merge a sharded FSDP/FSDP2 checkpoint into one file", _consolidate),
    "export-ema": ("write a checkpoint holding a run's EMA weights", _export_ema),
    "convert-esm": (
        "convert an ESM-2 checkpoint between fair-esm and Hugging Face",
        "zoo.protein.convert:convert_main",
    ),
    "inspect-compressed": (
        "load a compressed checkpoint into its model and report its compression",
        _inspect_compressed,
    ),
    "upgrade-checkpoint": (
        "rewrite a checkpoint of an earlier version with today's names",
        _upgrade_checkpoint,
    ),
    "evaluate-diffusion": (
        "conditional accuracy of a latent diffusion model, judged by a trained classifier",
        "zoo.diffusion.evaluation:main",
    ),
    "export": (
        "write a trained model as torch.export/ONNX graphs or another library's format",
        "zoo.export:main",
    ),
    "serve": ("serve a trained model over HTTP with dynamic batching (LitServe)", "zoo.serve:main"),
    "data": (
        "convert a data set into LitData's streaming format (zoo data optimize)",
        "zoo.streaming:main",
    ),
}


def _usage() -> str:
    lines = ["usage: zoo <command> [options]   (zoo <command> --help for its options)", ""]
    lines.append(
        "train and evaluate (Lightning's CLI; --config takes a file, a model name or family/variant):"
    )
    lines += [f"  {name:<20} {text}" for name, text in LIGHTNING_COMMANDS.items()]
    lines += ["", "tools:"]
    lines += [f"  {name:<20} {text}" for name, (text, _) in TOOLS.items()]
    lines += ["", "examples:", "  zoo fit --config deit_tiny", "  zoo list"]
    return "\n".join(lines)


def _runner(target: str | Callable[[Sequence[str]], None]) -> Callable[[Sequence[str]], None]:
    if callable(target):
        return target
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (``zoo`` and ``python -m zoo``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    try:
        if argv[0] in TOOLS:
            _runner(TOOLS[argv[0]][1])(argv[1:])
        else:
            from zoo.quiet import silence_third_party_noise

            silence_third_party_noise()
            from zoo.cli import run

            run(argv)
    except Exception as error:
        cause = _user_error(error)
        if cause is None or os.environ.get("ZOO_DEBUG") == "1":
            raise
        print(f"zoo: error: {cause}\n(ZOO_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)


def _user_error(error: BaseException) -> BaseException | None:
    """The ``ZooError`` behind ``error``: jsonargparse and Lightning wrap what a constructor or hook raised."""
    from zoo.errors import ZooError

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, ZooError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


if __name__ == "__main__":
    main()
