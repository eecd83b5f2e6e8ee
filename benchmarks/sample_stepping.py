"""What sampling one Langevin step per model-thread job costs against one call for the chain.

The service steps ``/sample`` chains one job at a time (``ModelRuntime.sample_uint8``) so
that scoring batches run between steps and an abandoned sample can stop. This measures
that path against ``VAEBM.sample`` on the same model thread, same seed, alternating the
two, and reports the ratio of the best times (1.0 = no cost).

    python benchmarks/sample_stepping.py --checkpoint checkpoints/fashion-mnist \
        --n 64 --steps 16 --repeats 3 --out docs/sample-stepping.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from command_line import this_command

from service.runtime import load_runtime
from service.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/fashion-mnist"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    executor = ThreadPoolExecutor(max_workers=1)
    runtime = load_runtime(Settings(checkpoint=args.checkpoint, device=args.device), executor)
    step_size = runtime.info.langevin_step_size

    def whole_chain() -> None:
        runtime.model.sample(args.n, steps=args.steps, step_size=step_size, seed=1)

    async def stepped() -> None:
        await runtime.sample_uint8(args.n, args.steps, step_size, 1)

    times: dict[str, list[float]] = {"stepped": [], "whole_chain": []}
    for _ in range(args.repeats):
        started = time.perf_counter()
        asyncio.run(stepped())
        times["stepped"].append(time.perf_counter() - started)
        started = time.perf_counter()
        executor.submit(whole_chain).result()
        times["whole_chain"].append(time.perf_counter() - started)
    best = {name: min(values) for name, values in times.items()}
    result = {
        "command": this_command(),
        "device": str(runtime.device),
        "seconds": {name: [round(t, 4) for t in values] for name, values in times.items()},
        "best_seconds": {name: round(t, 4) for name, t in best.items()},
        "stepped_over_whole_chain": round(best["stepped"] / best["whole_chain"], 3),
    }
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    executor.shutdown()


if __name__ == "__main__":
    main()
