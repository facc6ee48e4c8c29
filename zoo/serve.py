"""``zoo serve``: a trained model behind HTTP, on LitServe, with dynamic batching.

``POST /predict`` takes the family's request as JSON (images as base64, or as multipart uploads) and answers
with the record ``zoo predict`` writes for that input; ``GET /health`` answers ``ok`` once the model is loaded.
Requests that arrive within ``--batch_timeout`` seconds of each other run as one batch of up to
``--max_batch_size``.

Bad requests are answered in the HTTP process, before they reach the model: a body that is not JSON gets 400,
a missing, unknown or invalid field 422 naming it (``zoo.serving.RequestError``). LitServe would answer the
first with 500 and, with batching, fail every request of a batch holding one bad request; checking each request
on arrival keeps the others served. The model itself is loaded in LitServe's inference worker (a spawned
process), from the same config and checkpoint arguments ``zoo predict`` takes.
"""

from __future__ import annotations

import argparse
import base64
import json
from collections.abc import Sequence
from typing import Any

import torch

from zoo.extras import require
from zoo.serving import RequestCodec, RequestError, json_record

__all__ = ["RequestValidation", "ZooAPI", "build_server", "main"]

PREDICT_PATH = "/predict"


class ZooAPI(require("litserve", "serve", "zoo serve").LitAPI):
    """Calls the family's ``predict_step`` on batches of parsed requests; answers one record per request."""

    def __init__(self, config_args: Sequence[str], ckpt_path: str | None, max_batch_size: int = 8,
                 batch_timeout: float = 0.01) -> None:  # fmt: skip
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=PREDICT_PATH)
        self.config_args = list(config_args)
        self.ckpt_path = ckpt_path
        self.batching = max_batch_size > 1

    def setup(self, device: str) -> None:
        from zoo.inference import load_trained_model

        trained = load_trained_model(self.config_args, self.ckpt_path)
        self.device = torch.device(device)
        self.module = trained.module.to(self.device)
        self.codec = request_codec(trained.datamodule, trained.name)

    def decode_request(self, request: dict) -> dict:
        return self.codec.parse(request)

    def batch(self, items: list[dict]) -> dict:
        return self.codec.collate(items)

    def predict(self, batch: dict) -> list[dict] | dict:
        from lightning.fabric.utilities.apply_func import move_data_to_device

        single = not self.batching
        if single:  # LitServe hands one parsed request when batching is off
            batch = self.codec.collate([batch])
        with torch.inference_mode():
            records = self.module.predict_step(move_data_to_device(batch, self.device), 0)
        return records[0] if single else records

    def unbatch(self, records: list[dict]) -> list[dict]:
        return list(records)

    def encode_response(self, record: dict) -> dict:
        return json_record(record)


def request_codec(datamodule: Any, model_name: str) -> RequestCodec:
    """The data module's request format, or an error saying this model cannot be served."""
    from zoo.errors import ZooError

    if datamodule is None or not hasattr(datamodule, "request_codec"):
        kind = type(datamodule).__name__ if datamodule is not None else "no data module"
        raise ZooError(
            f"{model_name} cannot be served: its config's data ({kind}) defines no request_codec()"
        )
    return datamodule.request_codec()


class RequestValidation:
    """ASGI middleware in front of ``/predict``: reads the body (JSON, or a multipart form whose files go into
    the codec's image fields as base64), checks it with the codec, and passes it on as JSON; a bad request is
    answered here with 400/422 and ``{"detail": ..., "field": ...}``."""

    def __init__(self, app, codec: RequestCodec, path: str = PREDICT_PATH) -> None:
        self.app = app
        self.codec = codec
        self.path = path

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        from starlette.requests import Request
        from starlette.responses import JSONResponse

        request = Request(scope, receive)
        try:
            payload = await self._payload(request)
            self.codec.parse(payload)
        except RequestError as error:
            await JSONResponse({"detail": str(error), "field": error.field}, status_code=422)(
                scope, receive, send
            )
            return
        except ValueError as error:
            await JSONResponse({"detail": f"body: {error}"}, status_code=400)(scope, receive, send)
            return
        body = json.dumps(payload).encode()
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app({**scope, "headers": headers}, replay, send)

    async def _payload(self, request) -> dict[str, Any]:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            return await self._form_payload(request)
        body = await request.body()
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"not valid JSON ({error})") from None
        if not isinstance(payload, dict):
            raise RequestError("body", "expected a JSON object")
        return payload

    async def _form_payload(self, request) -> dict[str, Any]:
        payload: dict[str, Any] = {}
        async with request.form() as form:
            for key, value in form.multi_items():
                if hasattr(value, "read"):  # an uploaded file
                    payload[key] = base64.b64encode(await value.read()).decode("ascii")
                elif key in self.codec.image_fields or key in self.codec.text_fields:
                    payload[key] = value
                else:  # form fields are strings: numbers and lists are given as JSON
                    try:
                        payload[key] = json.loads(value)
                    except json.JSONDecodeError:
                        payload[key] = value
        return payload


def build_server(config_args: Sequence[str], ckpt_path: str | None, *, max_batch_size: int = 8,
                 batch_timeout: float = 0.01, timeout: float = 60.0, workers: int = 1,
                 accelerator: str = "auto"):  # fmt: skip
    """A ``litserve.LitServer`` for the model, with request checking in front (not started)."""
    litserve = require("litserve", "serve", "zoo serve")
    from zoo.inference import load_data_module

    configured = load_data_module(config_args, ckpt_path)
    codec = request_codec(configured.datamodule, configured.model_name).for_model(configured.model_config)
    api = ZooAPI(config_args, ckpt_path, max_batch_size=max_batch_size, batch_timeout=batch_timeout)
    return litserve.LitServer(
        api,
        accelerator=accelerator,
        devices=1,
        workers_per_device=workers,
        timeout=timeout,
        middlewares=[(RequestValidation, {"codec": codec})],
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="zoo serve",
        description="Serve a trained model over HTTP (LitServe): POST /predict with the family's JSON request "
        "returns its predict record; GET /health. Other --model.*/--data.* options go to the config.",
    )
    parser.add_argument("--config", action="append", required=True, help="the model's config (repeatable)")
    parser.add_argument("--ckpt_path", help="the trained checkpoint (a single file); default: untrained")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: localhost)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max_batch_size", type=int, default=8, help="requests per batch (1: no batching)")
    parser.add_argument("--batch_timeout", type=float, default=0.01, help="seconds to wait to fill a batch")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a request may wait (504 after)")
    parser.add_argument("--workers", type=int, default=1, help="model copies (inference processes)")
    parser.add_argument("--accelerator", default="auto", help="cpu, cuda or auto")
    args, overrides = parser.parse_known_args(argv)
    if args.max_batch_size < 1 or args.batch_timeout < 0 or args.batch_timeout >= args.timeout:
        parser.error("need --max_batch_size >= 1 and 0 <= --batch_timeout < --timeout")
    config_args = [item for path in args.config for item in ("--config", path)] + overrides
    server = build_server(
        config_args,
        args.ckpt_path,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
        timeout=args.timeout,
        workers=args.workers,
        accelerator=args.accelerator,
    )
    print(f"zoo: serving on http://{args.host}:{args.port}{PREDICT_PATH} (health: /health)", flush=True)
    server.run(host=args.host, port=args.port, generate_client_file=False, num_api_servers=1)
