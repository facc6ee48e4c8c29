"""Requests a served model reads: field checks that name the field, answers as JSON, and the check in front of
the model that answers a bad request itself (so it never joins, and fails, a batch)."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from zoo.serve import RequestValidation
from zoo.serving import (
    RequestCodec,
    RequestError,
    image_field,
    integer_field,
    json_record,
    number_field,
    text_field,
)


def png_base64(size=(12, 10), colour=(200, 30, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def error_field(call) -> str:
    with pytest.raises(RequestError) as caught:
        call()
    return caught.value.field


def test_text_fields_name_the_field_and_the_first_bad_character():
    assert text_field({"s": "ACD"}, "s", alphabet="ACDE") == "ACD"
    with pytest.raises(RequestError, match=r"s: character 'X' at position 2"):
        text_field({"s": "ACXD"}, "s", alphabet="ACDE")
    assert error_field(lambda: text_field({}, "s")) == "s"
    assert error_field(lambda: text_field({"s": 5}, "s")) == "s"
    with pytest.raises(RequestError, match="5 characters, more than this model's 4"):
        text_field({"s": "AAAAA"}, "s", max_length=4)
    assert text_field({}, "id", required=False, default="request") == "request"


def test_number_fields_check_type_and_range():
    assert integer_field({"seed": 3}, "seed", low=0) == 3
    assert integer_field({}, "seed", default=7) == 7
    with pytest.raises(RequestError, match=r"seed: -1 is outside \[0, \]"):
        integer_field({"seed": -1}, "seed", low=0)
    assert error_field(lambda: integer_field({"seed": "3"}, "seed")) == "seed"
    assert error_field(lambda: integer_field({"seed": True}, "seed")) == "seed"
    assert number_field({"scale": 2}, "scale", low=0.0) == 2.0
    assert error_field(lambda: number_field({"scale": 1e9}, "scale", high=100.0)) == "scale"


def test_images_arrive_as_base64_or_data_urls_and_bad_ones_are_named():
    image = image_field({"image": png_base64()})
    assert image.size == (12, 10) and image.mode == "RGB"
    assert image_field({"image": "data:image/png;base64," + png_base64()}).size == (12, 10)
    with pytest.raises(RequestError, match="image: is not valid base64"):
        image_field({"image": "not base64!"})
    with pytest.raises(RequestError, match="image: does not decode as an image"):
        image_field({"image": base64.b64encode(b"hello").decode()})
    assert error_field(lambda: image_field({"image": [1, 2]})) == "image"


def test_records_become_json_values():
    record = {
        "id": "a",
        "embedding": torch.tensor([0.5, 1.5]),
        "tokens": torch.tensor([1, 2]),
        "array": np.arange(3),
        "score": np.float32(0.25),
        "nested": {"top_k": [{"p": torch.tensor(0.5)}]},
        "sample": Image.new("RGB", (2, 2)),
    }
    encoded = json.loads(json.dumps(json_record(record)))
    assert encoded["embedding"] == [0.5, 1.5] and encoded["tokens"] == [1, 2]
    assert encoded["array"] == [0, 1, 2] and encoded["score"] == 0.25
    assert encoded["nested"] == {"top_k": [{"p": 0.5}]}
    png = base64.b64decode(encoded["sample"]["png_base64"])
    assert Image.open(io.BytesIO(png)).size == (2, 2)


class Letters(RequestCodec):
    fields = {"text": "letters a-z", "image": "an optional image"}
    image_fields = ("image",)

    def parse(self, payload):
        payload = self.check_keys(payload)
        item = {"text": text_field(payload, "text", alphabet="abcdefghijklmnopqrstuvwxyz")}
        if "image" in payload:
            item["image"] = image_field(payload, "image")
        return item


def call(middleware, body: bytes, content_type: str) -> tuple[int, dict | None, dict]:
    """One POST /predict through ``middleware``: (status, JSON answer or None, what the app behind received)."""
    seen = {}

    async def app(scope, receive, send):
        message = await receive()
        seen["body"] = json.loads(message["body"])
        seen["headers"] = dict(scope["headers"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": headers, "query_string": b""}
    asyncio.run(middleware(app)(scope, receive, send))
    status = sent[0]["status"]
    answer = json.loads(sent[1]["body"]) if status != 200 else None
    return status, answer, seen


def checked(app):
    return RequestValidation(app, Letters())


def test_bad_requests_are_answered_before_the_model_sees_them():
    status, answer, seen = call(checked, b"{not json", "application/json")
    assert status == 400 and "not valid JSON" in answer["detail"] and not seen
    status, answer, seen = call(checked, b'{"txet": "abc"}', "application/json")
    assert status == 422 and answer["field"] == "txet" and "'text' (letters a-z)" in answer["detail"]
    status, answer, _ = call(checked, b'{"text": "ab1"}', "application/json")
    assert status == 422 and answer["field"] == "text" and "'1' at position 2" in answer["detail"]
    status, answer, _ = call(checked, b'["abc"]', "application/json")
    assert status == 422 and answer["field"] == "body"


def test_good_requests_pass_on_as_json_and_uploads_become_base64_fields():
    status, _, seen = call(checked, b'{"text": "abc"}', "application/json")
    assert status == 200 and seen["body"] == {"text": "abc"}
    png = base64.b64decode(png_base64())
    boundary = "zooboundary"
    form = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="text"\r\n\r\nabc\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + png
        + f"\r\n--{boundary}--\r\n".encode()
    )
    status, _, seen = call(checked, form, f"multipart/form-data; boundary={boundary}")
    assert status == 200 and seen["body"]["text"] == "abc"
    assert base64.b64decode(seen["body"]["image"]) == png
    assert seen["headers"][b"content-type"] == b"application/json"


class Expressions(RequestCodec):
    fields = {"text": "an expression", "seed": "an integer", "id": "a name"}
    text_fields = ("text", "id")

    def parse(self, payload):
        payload = self.check_keys(payload)
        return {
            "text": text_field(payload, "text"),
            "seed": integer_field(payload, "seed", default=0),
            "id": text_field(payload, "id", required=False),
        }


def form_body(fields: dict[str, str], boundary: str = "zooboundary") -> tuple[bytes, str]:
    parts = "".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in fields.items()
    )
    return (parts + f"--{boundary}--\r\n").encode(), f"multipart/form-data; boundary={boundary}"


def test_form_fields_are_json_except_the_codecs_text_fields():
    body, content_type = form_body({"text": "12", "seed": "3", "id": "42"})
    status, _, seen = call(lambda app: RequestValidation(app, Expressions()), body, content_type)
    assert status == 200 and seen["body"] == {"text": "12", "seed": 3, "id": "42"}
    body, content_type = form_body({"text": "12", "seed": "three"})
    status, answer, _ = call(lambda app: RequestValidation(app, Expressions()), body, content_type)
    assert status == 422 and answer["field"] == "seed"
