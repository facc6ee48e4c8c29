"""The pipeline config end to end through the ``zoo`` CLI: prune, distil, quantize, save; ``zoo validate`` reloads."""

from __future__ import annotations

import pytest
import torch
from torchao.quantization import Int8Tensor

from tests.conftest import CONFIGS
from zoo.callbacks.compression import Quantization
from zoo.cli import ZooCLI

PIPELINE = CONFIGS / "compression" / "deit_tiny_compress.yaml"
SMALL = [
    "--data.init_args.train_size=64",
    "--data.init_args.val_size=32",
    "--data.init_args.batch_size=16",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_pipeline_fit_writes_a_compressed_checkpoint_that_zoo_validate_reloads(tmp_path):
    fit = ZooCLI(
        args=[
            "fit",
            "--config",
            str(PIPELINE),
            *SMALL,
            "--trainer.max_steps=2",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    model = fit.model.eval()
    blocks = model.model.blocks
    assert blocks[0].attn.num_heads == 2 and blocks[0].mlp.fc1.out_features == 384  # pruned
    assert isinstance(blocks[0].mlp.fc1.weight, Int8Tensor)  # then int8 (torchao)
    saved = next(c for c in fit.trainer.callbacks if isinstance(c, Quantization)).saved_to
    assert saved is not None and saved.is_file()
    assert [r["kind"] for r in torch.load(saved, weights_only=True)["zoo_compression"]] == [
        "transformer_structured",
        "int8_dynamic",
    ]

    enabled = torch.are_deterministic_algorithms_enabled()
    try:
        validate = ZooCLI(
            args=[
                "validate",
                "--config",
                str(PIPELINE),
                *SMALL,
                f"--ckpt_path={saved}",
                "--trainer.deterministic=false",  # int8 CPU kernels have no deterministic variant
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
        assert "val/acc" in validate.trainer.callback_metrics
        x = torch.randn(4, 3, 32, 32)
        with torch.inference_mode():
            torch.testing.assert_close(validate.model.eval()(x), model(x), atol=0, rtol=0)
    finally:
        torch.use_deterministic_algorithms(enabled)
