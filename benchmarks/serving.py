"""``zoo serve`` under load: requests/s and p50/p99 latency at 1, 8 and 32 concurrent clients, dynamic batching
on (``--max_batch_size 8``) vs off (``1``), side by side in one run.

One server per setting serves the vision default config (DeiT-Ti on 32 px shapes, initial weights); clients are
threads posting base64 PNGs with ``urllib`` (each client sends ``--requests`` requests, one after another).
The server and clients share this machine, so absolute numbers depend on it; the ratio batching on / off is the
figure. Prints a table, writes JSON.

    python benchmarks/serving.py [--requests 40] [--clients 1 8 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the test suite's server harness: the real `zoo serve` in a subprocess
from tests.serving.server import post, running_server  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
CONFIG = ["--config", "deit_tiny"]


def image_request(index: int) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), ((37 * index) % 256, (91 * index) % 256, 128)).save(buffer, "PNG")
    return {"image": base64.b64encode(buffer.getvalue()).decode(), "id": str(index)}


def load(url: str, clients: int, requests: int) -> dict:
    """``clients`` threads each posting ``requests`` requests; latencies in ms and requests/s."""
    bodies = [image_request(i) for i in range(64)]

    def client(worker: int) -> list[float]:
        latencies = []
        for i in range(requests):
            started = time.perf_counter()
            status, _ = post(f"{url}/predict", bodies[(worker * requests + i) % len(bodies)])
            if status != 200:
                raise RuntimeError(f"status {status}")
            latencies.append((time.perf_counter() - started) * 1e3)
        return latencies

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [ms for result in pool.map(client, range(clients)) for ms in result]
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(statistics.median(latencies), 1),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=40, help="requests per client")
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the inference worker")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for max_batch in (1, 8):
            serve_args = [*CONFIG, "--max_batch_size", str(max_batch), "--batch_timeout", "0.005"]
            with running_server(serve_args, Path(tmp), threads=args.threads) as url:
                for _ in range(3):  # warm-up
                    post(f"{url}/predict", image_request(0))
                for clients in args.clients:
                    figures = load(url, clients, args.requests)
                    rows.append({"max_batch_size": max_batch, "clients": clients, **figures})
                    print(f"batch {max_batch:2d}  clients {clients:3d}  {figures}", flush=True)
    print("\nrequests/s, batching on / off:")
    for clients in args.clients:
        on, off = (
            next(r for r in rows if r["clients"] == clients and r["max_batch_size"] == b) for b in (8, 1)
        )
        print(f"  {clients:3d} clients: {on['requests_per_s'] / off['requests_per_s']:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serving.json").write_text(json.dumps({"config": CONFIG, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
