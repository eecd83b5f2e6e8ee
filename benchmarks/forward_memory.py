"""Resident memory of a long-running scorer: one forward pass per batch against
passes of a few fixed sizes (``model.scores.chunk_sizes``), in this process.

A service sees every batch size from 1 to its maximum. With one forward pass per
batch, each size allocates tensors of new sizes, and glibc's heap keeps the freed
pieces; with fixed-size passes the same few sizes are reused. Both modes score the
same sequence of random batch sizes, one after the other, each in a fresh process.

    python benchmarks/forward_memory.py --iterations 600

Prints RSS every ``--every`` batches and the images/s of each mode, and writes
docs/forward-memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from command_line import this_command

REPO = Path(__file__).resolve().parent.parent


def rss_mib() -> float:
    """Resident set size of this process in MiB (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096 / 2**20


def run_mode(args: argparse.Namespace) -> dict:
    """Score ``--iterations`` batches in this process; return the RSS trace."""
    import numpy as np
    import torch

    from model.checkpoint import load_checkpoint
    from model.scores import compute_scores, score_in_batches

    torch.set_num_threads(args.threads)
    model, _ = load_checkpoint(args.checkpoint, torch.device(args.device))
    rng = np.random.default_rng(args.seed)
    pool = rng.integers(0, 256, (args.max_batch, *model.vae.image_shape), dtype=np.uint8)
    trace, images, started = [], 0, time.perf_counter()
    for i in range(args.iterations):
        batch = pool[: int(rng.integers(1, args.max_batch + 1))]
        if args.mode == "one-pass":
            compute_scores(model, batch, iwae_k=args.iwae_k)
        else:
            score_in_batches(model, batch, batch_size=args.forward_max, iwae_k=args.iwae_k)
        images += len(batch)
        if i % args.every == 0 or i == args.iterations - 1:
            trace.append([i, round(rss_mib(), 1)])
            print(f"  {args.mode}: batch {i}: {trace[-1][1]:.0f} MiB", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - started
    return {"rss_mib": trace, "images_per_s": images / seconds, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints" / "fashion-mnist")
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--max-batch", type=int, default=64, help="VAEBM_BATCH_MAX_SIZE")
    parser.add_argument("--forward-max", type=int, default=32, help="VAEBM_FORWARD_MAX_IMAGES")
    parser.add_argument("--iwae-k", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--mode", choices=["one-pass", "fixed-sizes"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "forward-memory.json")
    args = parser.parse_args()
    if args.mode:  # child process: one mode, result as JSON on stdout
        print(json.dumps(run_mode(args)))
        return
    results = {}
    for mode in ("one-pass", "fixed-sizes"):
        command = [sys.executable, __file__, "--mode", mode, *sys.argv[1:]]
        out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO)
        results[mode] = json.loads(out.stdout)
        last = results[mode]["rss_mib"][-1][1]
        peak = max(v for _, v in results[mode]["rss_mib"])
        print(
            f"{mode}: RSS at end {last:.0f} MiB, max {peak:.0f} MiB, "
            f"{results[mode]['images_per_s']:.1f} img/s"
        )
    ratio = results["fixed-sizes"]["images_per_s"] / results["one-pass"]["images_per_s"]
    print(f"throughput fixed-sizes / one-pass: {ratio:.2f}x")
    settings = {k: v for k, v in vars(args).items() if k not in ("mode", "out")}
    report = {
        "settings": {k: str(v) for k, v in settings.items()},
        "results": results,
        "throughput_ratio_fixed_over_one_pass": ratio,
        "command": this_command(),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
