"""``zoo serve`` of the deit_tiny config: the real server (a subprocess) on a checkpoint of a two-step fit.

Answers are compared with the offline predict record of the same request (``load_trained_model`` + the
codec's ``parse``/``collate`` + ``predict_step``): base64 JSON and multipart uploads, bad requests answered
with the field's name while the server goes on serving, and 8 concurrent clients whose requests the server
batches (``--max_batch_size 8``).
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from tests.serving.server import post, running_server
from zoo.cli import ZooCLI
from zoo.inference import load_trained_model
from zoo.serving import json_record

from ..conftest import CONFIGS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

CONFIG = [
    "--config",
    str(CONFIGS / "vision" / "deit_tiny.yaml"),
    "--model.init_args.model_kwargs={depth: 1}",
    "--data.init_args.train_size=32",
    "--data.init_args.val_size=16",
    "--data.init_args.test_size=16",
    "--data.init_args.batch_size=16",
]
#: served vs offline, one request (same batch of one, same arithmetic)
EXACT = 1e-5
#: served in batches vs offline alone: float sums in another order
BATCHED = 1e-4


def png(seed: int, size: tuple[int, int] = (40, 36), format: str = "PNG") -> bytes:
    """A random image of another size than the model's 32 px (the evaluation transform resizes it)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body (what ``curl -F`` sends) and its content type."""
    boundary = "zoo-test-boundary"
    parts = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        )
    for name, (filename, data) in files.items():
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def assert_same_record(answer: dict, expected: dict, tolerance: float) -> None:
    """Same id, label and top-k within ``tolerance``; classes may swap places only where their
    probabilities tie within it (a near tie is ordered by the last bits of the sums)."""
    assert set(answer) == {"id", "label", "class_index", "top_k"} and answer["id"] == expected["id"]
    got = [(k["class"], k["probability"]) for k in answer["top_k"]]
    want = [(k["class"], k["probability"]) for k in expected["top_k"]]
    assert len(got) == len(want) == 5
    for (got_class, got_p), (want_class, want_p) in zip(got, want):
        assert abs(got_p - want_p) <= tolerance, (got, want)
        if got_class != want_class:
            assert abs(dict(want).get(got_class, want[-1][1]) - want_p) <= tolerance, (got, want)
    if answer["label"] != expected["label"]:
        assert abs(want[0][1] - want[1][1]) <= tolerance, (got, want)
    assert answer["label"] == got[0][0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint of ``zoo fit --trainer.max_steps=2`` on the tiny config."""
    root = tmp_path_factory.mktemp("fit")
    cli = ZooCLI(
        args=[
            "fit",
            *CONFIG,
            "--trainer.max_steps=2",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={root}",
        ]
    )
    assert cli.trainer.global_step == 2
    path = root / "tiny.ckpt"
    cli.trainer.save_checkpoint(path, weights_only=True)
    return path


@pytest.fixture(scope="module")
def offline(checkpoint):
    """The offline predict record of a request: the model, codec and predict_step ``zoo serve`` uses."""
    torch.set_num_threads(1)
    trained = load_trained_model(CONFIG, str(checkpoint))
    codec = trained.datamodule.request_codec()

    def record(payload: dict) -> dict:
        with torch.no_grad():
            (result,) = trained.module.predict_step(codec.collate([codec.parse(payload)]), 0)
        return json_record(result)

    return record


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    args = [*CONFIG, "--ckpt_path", str(checkpoint), "--accelerator", "cpu", "--max_batch_size", "8"]
    with running_server(args, tmp_path_factory.mktemp("serve")) as url:
        yield f"{url}/predict"


def test_json_and_multipart_requests_equal_offline_predict(server, offline):
    image = png(0)
    status, answer = post(server, {"image": b64(image), "id": "holiday.png"})
    assert status == 200, answer
    assert_same_record(answer, offline({"image": b64(image), "id": "holiday.png"}), EXACT)

    jpeg = png(1, size=(64, 48), format="JPEG")
    body, content_type = multipart({"id": "upload.jpg"}, {"image": ("upload.jpg", jpeg)})
    status, answer = post(server, body, content_type)
    assert status == 200, answer
    assert_same_record(answer, offline({"image": b64(jpeg), "id": "upload.jpg"}), EXACT)

    # a data URL, and no id: the codec's default
    status, answer = post(server, {"image": "data:image/png;base64," + b64(image)})
    assert status == 200 and answer["id"] == "request"


@pytest.mark.parametrize(
    ("body", "status", "field", "message"),
    [
        (b'{"image": "abc', 400, None, "body: not valid JSON"),
        ({"image": "IMAGE", "colour": "red"}, 422, "colour", "unknown field; this model takes 'image'"),
        ({"image": b64(b"GIF89a but not really")}, 422, "image", "does not decode as an image"),
        ({"image": "not base64!"}, 422, "image", "is not valid base64"),
        ({"image": 123}, 422, "image", "expected a base64 string, got int"),
        ({"image": "IMAGE", "id": 5}, 422, "id", "expected a string, got int"),
        ({"id": "no image"}, 422, "image", "missing"),
        (b"[1, 2]", 422, "body", "expected a JSON object"),
    ],
    ids=[
        "malformed-json",
        "unknown-field",
        "not-an-image",
        "not-base64",
        "wrong-type",
        "wrong-id",
        "missing",
        "not-an-object",
    ],
)
def test_bad_requests_name_the_field_and_the_server_goes_on(server, offline, body, status, field, message):
    if isinstance(body, dict) and body.get("image") == "IMAGE":
        body = {**body, "image": b64(png(2))}
    got_status, answer = post(server, body)
    assert got_status == status, answer
    assert message in answer["detail"]
    assert answer.get("field") == field
    status, answer = post(server, {"image": b64(png(3)), "id": "after"})
    assert status == 200
    assert_same_record(answer, offline({"image": b64(png(3)), "id": "after"}), EXACT)


def test_concurrent_clients_each_get_their_own_answer(server, offline):
    """8 clients x 50 requests, 16 different images, ``--max_batch_size 8`` (requests arriving within the batch
    timeout share a batch): every answer is its own request's (id) and its image's offline record."""
    images = [b64(png(100 + i, size=(32 + i, 40))) for i in range(16)]
    expected = [offline({"image": image}) for image in images]

    def client(number: int) -> list[tuple[int, int, dict]]:
        results = []
        for request in range(50):
            index = (number * 7 + request) % len(images)
            status, answer = post(server, {"image": images[index], "id": f"{number}-{request}"})
            results.append((index, status, answer | {"sent_id": f"{number}-{request}"}))
        return results

    with ThreadPoolExecutor(8) as pool:
        results = [r for batch in pool.map(client, range(8)) for r in batch]
    assert len(results) == 400
    for index, status, answer in results:
        assert status == 200, answer
        sent = answer.pop("sent_id")
        assert answer["id"] == sent  # no answer went to another request of its batch
        assert_same_record(answer, {**expected[index], "id": sent}, BATCHED)
