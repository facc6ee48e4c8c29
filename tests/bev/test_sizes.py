"""The published BEVFormer shapes (tiny/small/base), built on the meta device: nothing is allocated."""

from __future__ import annotations

import pytest
import torch

from zoo.bev import BEVFORMER_CONFIGS, BEVFormer, BEVFormerDetector
from zoo.registry import MODELS, measure_parameters

# (bev_h, encoder layers, levels, SCA offsets out, SCA weights out) from the reference configs / checkpoints
PUBLISHED = {
    "bevformer_tiny": (50, 3, 1, 128, 64),
    "bevformer_small": (150, 3, 1, 128, 64),
    "bevformer_base": (200, 6, 4, 512, 256),
}


@pytest.mark.parametrize("model_name", sorted(PUBLISHED))
def test_published_shapes(model_name):
    bev, layers, levels, offsets, weights = PUBLISHED[model_name]
    with torch.device("meta"):
        model = BEVFormer(BEVFORMER_CONFIGS[model_name])
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    assert shapes["bev_embedding.weight"] == (bev * bev, 256)
    assert shapes["query_embedding.weight"] == (900, 512)
    assert shapes["row_embed.weight"] == (bev, 128) and shapes["col_embed.weight"] == (bev, 128)
    assert shapes["level_embeds"] == (4, 256) and shapes["cams_embeds"] == (6, 256)
    assert shapes["reference_points.weight"] == (3, 256)
    assert shapes["can_bus_mlp.0.weight"] == (128, 18) and shapes["can_bus_mlp.2.weight"] == (256, 128)
    assert len(model.encoder.layers) == layers and len(model.decoder.layers) == 6
    sca = model.encoder.layers[0].spatial.attention
    assert tuple(sca.sampling_offsets.weight.shape) == (offsets, 256)
    assert tuple(sca.attention_weights.weight.shape) == (weights, 256)
    tsa = model.encoder.layers[0].temporal.attention  # from [prev; query] (512): 2 x 8 heads x 4 points
    assert tuple(tsa.sampling_offsets.weight.shape) == (128, 512) and tuple(
        tsa.attention_weights.weight.shape
    ) == (64, 512)
    dec = model.decoder.layers[0]
    assert tuple(dec.cross_attn.sampling_offsets.weight.shape) == (64, 256)
    assert tuple(dec.self_attn.in_proj_weight.shape) == (768, 256)
    assert shapes["head.code_weights"] == (10,)
    assert len(model.head.cls_branches) == len(model.head.reg_branches) == 6
    assert tuple(model.head.cls_branches[0][-1].weight.shape) == (10, 256)
    assert len(model.camera_encoder.neck.fpn_convs) + len(model.camera_encoder.neck.extra_convs) == levels
    assert all(p.is_meta for p in model.parameters())


def test_registry_counts_are_the_models():
    entries = {m.name: m for m in MODELS if m.name.startswith("bevformer")}
    assert set(entries) == {"bevformer_cpu", "bevformer_planning", *PUBLISHED}
    with torch.device("meta"):
        tiny = BEVFormerDetector("bevformer_tiny", class_names=None)
    assert measure_parameters(entries["bevformer_tiny"].config) == sum(p.numel() for p in tiny.parameters())


def test_bad_model_name_and_fields():
    with pytest.raises(ValueError, match="model_name 'bevformer_huge'"):
        BEVFormerDetector("bevformer_huge")
    with pytest.raises(ValueError, match=r"model_kwargs has unknown fields \['bev_size'\]"):
        BEVFormerDetector(model_kwargs={"bev_size": 3})
