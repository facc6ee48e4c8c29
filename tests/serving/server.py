"""The real ``zoo serve`` in a subprocess on a free localhost port, and a small HTTP client for tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

STARTUP_SECONDS = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(args: Sequence[str], workdir: Path, threads: int = 1) -> Iterator[str]:
    """``zoo serve *args`` on a free port; yields its base URL once ``/health`` answers ``ok``. The process
    group is killed afterwards (LitServe's HTTP and inference processes with it)."""
    port = free_port()
    log = (workdir / f"serve-{port}.log").open("w")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen(
        [sys.executable, "-m", "zoo", "serve", *args, "--port", str(port)],
        cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"zoo serve exited with {process.returncode}:\n{_tail(log.name)}")
            with contextlib.suppress(OSError):
                if get(f"{url}/health")[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"zoo serve did not become healthy:\n{_tail(log.name)}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.close()


def _tail(path: str, lines: int = 40) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode()


def post(url: str, body: bytes | dict, content_type: str = "application/json") -> tuple[int, dict]:
    """``(status, JSON answer)`` of a POST; an HTTP error status is returned, not raised."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")
