"""``zoo serve`` for latent diffusion: a request is the predict item of its prompt line, bad fields are named,
and the real server answers with the record ``zoo predict`` makes for the same prompt and seed."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from zoo.datamodules.captioned_images import CaptionedImageDataModule, PromptRequestCodec
from zoo.diffusion import LatentDiffusion, SamplingConfig
from zoo.diffusion.images import make_grid, to_pil, to_unit_range
from zoo.serving import RequestError, json_record

from ..conftest import CONFIGS
from ..serving.server import post, running_server
from .conftest import TINY_AE, TINY_UNET


def loader_batch(tmp_path, lines: list[str]) -> dict:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(lines) + "\n")
    data = CaptionedImageDataModule(predict_path=str(prompts), batch_size=len(lines))
    return next(iter(data.predict_dataloader()))


def assert_same_batch(served: dict, loaded: dict) -> None:
    assert served.keys() == loaded.keys()
    for key, value in loaded.items():
        assert torch.equal(served[key], value) if isinstance(value, torch.Tensor) else served[key] == value


def test_a_request_becomes_the_batch_its_predict_line_becomes(tmp_path):
    codec = CaptionedImageDataModule().request_codec()
    requests = [  # (a line of predict_path, the request asking for it)
        ("red circle", {"prompt": "red circle"}),
        ("5", {"class": 5}),
        ("blue square", {"class": "Blue Square"}),
        ("a large blue cross in the centre", {"prompt": " a large blue cross in the centre "}),
    ]
    for line, request in requests:
        assert_same_batch(codec.collate([codec.parse(request)]), loader_batch(tmp_path, [line]))
    batch = codec.collate([codec.parse(request) for _, request in requests])
    assert batch["label"].tolist() == [0, 5, 5, -1] and batch["index"].tolist() == [0, 0, 0, 0]
    assert batch["caption"][1] == "a medium blue square in the centre" and "seed" not in batch


def test_seeds_and_ids_of_requests_reach_the_records(tiny_ldm_kwargs):
    codec = CaptionedImageDataModule().request_codec()
    batch = codec.collate(
        [
            codec.parse({"class": "green circle", "seed": 7, "id": "mine"}),
            codec.parse({"prompt": "red circle"}),
        ]
    )
    assert batch["seed"] == [7, None] and batch["id"] == ["mine", None]
    sampling = SamplingConfig(steps=2, samples_per_prompt=2, seed=3)
    model = LatentDiffusion(**{**tiny_ldm_kwargs, "sampling": sampling}).eval()
    first, second = model.predict_step(batch, 0)
    assert (first["id"], first["prompt"], first["seed"]) == ("mine", "green circle", 7)
    assert (second["id"], second["seed"]) == ("red circle", 3)  # no seed asked: the model's sampling.seed
    redrawn = to_pil(make_grid(to_unit_range(model.generate(labels=[1, 1], seed=7)), nrow=2))
    assert first["grid"].tobytes() == redrawn.tobytes()
    assert json_record(first)["grid"]["png_base64"]


def refused(codec: PromptRequestCodec, payload) -> RequestError:
    with pytest.raises(RequestError) as caught:
        codec.parse(payload)
    return caught.value


def test_bad_requests_name_their_field():
    codec = CaptionedImageDataModule().request_codec()
    unknown = refused(codec, {"class": "purple circle"})
    assert unknown.field == "class" and "'red circle'" in str(unknown) and "(12 in all)" not in str(unknown)
    assert "outside [0, 11]" in str(refused(codec, {"class": 12}))
    assert "outside [0, 11]" in str(refused(codec, {"class": "12"}))
    assert refused(codec, {"class": True}).field == "class"
    assert refused(codec, {"class": [1]}).field == "class"
    assert refused(codec, {"prompt": "red circle", "class": 0}).field == "class"
    assert refused(codec, {}).field == "prompt"
    assert refused(codec, {"prompt": 5}).field == "prompt"
    assert refused(codec, {"prompt": "   "}).field == "prompt"
    assert "more than this model's 1000" in str(refused(codec, {"prompt": "a " * 600}))
    assert "class index 99" in str(refused(codec, {"prompt": "99"}))
    assert refused(codec, {"prompt": "red circle", "seed": "3"}).field == "seed"
    assert refused(codec, {"prompt": "red circle", "seed": -1}).field == "seed"
    assert refused(codec, {"prompt": "red circle", "id": 5}).field == "id"
    assert refused(codec, {"promt": "red circle"}).field == "promt"
    assert refused(codec, ["red circle"]).field == "body"
    no_classes = PromptRequestCodec([])
    assert "no classes" in str(refused(no_classes, {"class": "cat"}))
    many = PromptRequestCodec([f"class {i}" for i in range(30)])
    assert "(30 in all)" in str(refused(many, {"class": "dog"}))


def test_a_class_conditional_model_refuses_free_text_by_name():
    codec = CaptionedImageDataModule().request_codec()
    class_model = codec.for_model(
        {"init_args": {"conditioning": {"class_path": "zoo.diffusion.ClassConditioning"}}}
    )
    refusal = refused(class_model, {"prompt": "a purple elephant"})
    assert (
        refusal.field == "prompt" and "class-conditional" in str(refusal) and "'red circle'" in str(refusal)
    )
    assert class_model.parse({"prompt": "Red Circle"})["label"] == 0
    assert codec.for_model({"init_args": {}}).captions is False  # ClassConditioning is the default
    # a checkpoint's hyper-parameters (dict_kwargs) outrank the config's own arguments
    caption_model = codec.for_model(
        {
            "init_args": {"conditioning": {"class_path": "ClassConditioning"}},
            "dict_kwargs": {"conditioning": {"class_path": "zoo.diffusion.CaptionConditioning"}},
        }
    )
    assert caption_model.parse({"prompt": "a purple elephant"})["label"] == -1


SERVED_CONFIG = [
    "--config", str(CONFIGS / "diffusion" / "ldm_unet_class.yaml"),
    f"--model.init_args.autoencoder={json.dumps(TINY_AE)}",
    f"--model.init_args.model_kwargs={json.dumps(TINY_UNET)}",
    "--model.init_args.conditioning.init_args.dim=16", "--model.init_args.scale_factor=0.5",
    "--model.init_args.sampling.steps=2", "--model.init_args.sampling.samples_per_prompt=2",
    "--data.init_args.img_size=16",
]  # fmt: skip


def png_pixels(encoded: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded["png_base64"]))), dtype=np.int16)


def test_the_server_answers_with_the_offline_record_and_refuses_bad_fields(tmp_path):
    from zoo.inference import load_trained_model

    (tmp_path / "prompts.txt").write_text("red circle\ngreen cross\n")
    config = [*SERVED_CONFIG, f"--data.init_args.predict_path={tmp_path / 'prompts.txt'}"]
    trained = load_trained_model(config, None)
    with torch.no_grad():  # weights that are not the seeded initial ones, saved as a checkpoint
        for parameter in trained.module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    torch.save({"state_dict": trained.module.state_dict()}, tmp_path / "tiny.ckpt")
    offline = load_trained_model(config, str(tmp_path / "tiny.ckpt"))
    batch = next(iter(offline.datamodule.predict_dataloader()))
    with torch.inference_mode():
        records = [json_record(r) for r in offline.module.predict_step(batch, 0)]
    assert [r["seed"] for r in records] == [0, 1]

    args = [*config, "--ckpt_path", str(tmp_path / "tiny.ckpt"), "--batch_timeout", "0.5"]
    with running_server(args, tmp_path) as url:
        requests = [{"prompt": "red circle"}, {"class": "green cross", "seed": 1}]
        with ThreadPoolExecutor(2) as pool:  # sent together: one batch
            answers = list(pool.map(lambda body: post(f"{url}/predict", body), requests))
        for (status, answer), record in zip(answers, records):
            assert status == 200, answer
            assert {k: answer[k] for k in ("id", "prompt", "seed")} == {
                k: record[k] for k in ("id", "prompt", "seed")
            }
            assert np.abs(png_pixels(answer["grid"]) - png_pixels(record["grid"])).max() <= 1
        status, answer = post(f"{url}/predict", {"class": "purple circle"})
        assert status == 422 and answer["field"] == "class" and "'red circle'" in answer["detail"]
        status, answer = post(f"{url}/predict", {"prompt": "red circle", "seed": "zero"})
        assert status == 422 and answer["field"] == "seed"
        status, answer = post(f"{url}/predict", {"prompt": "a purple elephant"})
        assert status == 422 and answer["field"] == "prompt" and "class-conditional" in answer["detail"]
        status, answer = post(f"{url}/predict", {"class": 1, "seed": 1, "id": "again"})
        assert status == 200 and answer["id"] == "again" and answer["prompt"] == "green circle"
