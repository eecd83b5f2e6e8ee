"""Does training SIGKILLed at random moments and resumed end where an unbroken run ends?

For each training stage, a tiny VAE (stage 1), then a tiny energy network on that VAE
(stage 2, with a persistent buffer, a moving average of its weights and the corruption
term, so that everything a resume restores is used), this trains once uninterrupted into
a reference directory, then runs the same command into a second directory, SIGKILLs it
``--kills`` times and starts it again after each kill, with ``--resume`` once a training
state has been saved (afresh before), until a run finishes. Both stages save every step
(``--checkpoint-every 1``), so much of any moment falls inside a save. Kills alternate
between two kinds, at moments drawn from ``--seed`` and aimed at steps spread uniformly
over the run: "timed" (at that moment) and "mid-save" (at the first moment after it at
which a temp file of a save is in the directory). The last kill is "final-save": the run
is stopped at each save and killed once the training state it has just written is that of
the last step, before the weights and config.json that publish it: the one moment at which
the resumed run has no step left to train and must still publish the last one.

After every kill it records the temp files left, whether the checkpoint loads
(``model.checkpoint.load_checkpoint``), its step and the saved state's
(``training.runtime.load_state``); from the next run, the step its log says it resumed
from (it must be the saved state's) and whether the killed run's temp files are gone once
it has loaded its data. At the end it compares the final weights (the safetensors file),
the final training state and the stage's metrics in config.json, tensor by tensor and bit
for bit, with the reference run's.

    python benchmarks/kill_and_resume.py --kills 8 --seed 0 --out docs/kill-and-resume.json

Training runs on the CPU with OMP_NUM_THREADS=1, which makes it deterministic, so the
resumed runs must give the reference's bits. Exits with status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from command_line import this_command
from safetensors.torch import load_file

from model.checkpoint import CONFIG_NAME, describe_exception, load_checkpoint, read_config
from training.runtime import STATE_NAMES, load_state

VAEBM = str(Path(sys.executable).with_name("vaebm"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
DATA = "../shared/datasets/fashion-mnist/train-images-idx3-ubyte.gz@0:512"
POLL_S = 0.0005  # between looks at the directory while waiting for a save
RESUMED = re.compile(r"resumed (?:VAE|EBM) training from .+ at step (\d+)")
LOADED = re.compile(r"training\.data: Loaded \d+ images")  # logged after the temp-file cleanup
KILLED = -signal.SIGKILL


@dataclass(frozen=True)
class Stage:
    """One training command, as a function of its output directory."""

    name: str  # "vae" or "ebm": the subcommand and the state file's suffix
    steps: int
    argv: Callable[[Path], list[str]]

    @property
    def state_name(self) -> str:
        return STATE_NAMES[self.name]

    def command(self) -> str:
        return " ".join(["vaebm", *self.argv(Path("OUT"))[1:]])


@dataclass
class Snapshot:
    """What a run directory holds at one moment."""

    temp_files: list[str]
    state_step: int | None  # None: no training state (or an unreadable one)
    state_error: str | None
    checkpoint: str  # "loads", "absent" or why it does not load
    checkpoint_step: int | None  # the stage's completed_steps in config.json


@dataclass
class Run:
    """One start of the interrupted command."""

    mode: str  # "timed", "mid-save", "final-save", or "to-end" (not killed)
    resume: bool  # started with --resume
    expected_step: int | None  # the saved state's step when it started
    logged_step: int | None  # the step its log says it resumed from
    planned_delay_s: float | None
    seconds: float
    returncode: int
    after: Snapshot
    stale_temp_left: list[str] = field(default_factory=list)  # earlier kills' temp files


def temp_files(out: Path) -> list[str]:
    try:
        return sorted(name for name in os.listdir(out) if name.endswith(".tmp"))
    except FileNotFoundError:
        return []


def snapshot(out: Path, stage: Stage) -> Snapshot:
    state_step, state_error = None, None
    if (out / stage.state_name).exists():
        try:
            state_step = int(load_state(out / stage.state_name)["step"])
        except Exception as exc:  # any failure to read is what is being measured
            state_error = describe_exception(exc)
    checkpoint, checkpoint_step = "absent", None
    if (out / CONFIG_NAME).exists():
        try:
            _, info = load_checkpoint(out)
        except Exception as exc:
            checkpoint = describe_exception(exc)
        else:
            checkpoint = "loads"
            checkpoint_step = info.training.get(stage.name, {}).get("completed_steps")
    return Snapshot(temp_files(out), state_step, state_error, checkpoint, checkpoint_step)


def saved_step(out: Path, stage: Stage) -> int | None:
    try:
        return int(load_state(out / stage.state_name)["step"])
    except Exception:
        return None


def wait_and_kill(
    process: subprocess.Popen[bytes],
    mode: str,
    out: Path,
    stage: Stage,
    not_before: float,
    stale: set[str],
) -> None:
    """SIGKILL ``process`` as ``mode`` says, from ``not_before`` (perf_counter) on; return
    when it has been killed or has exited by itself. ``stale``: temp files left by an
    earlier kill, which are no sign of a save of this run."""
    checked = set(stale)  # temp files already looked at
    while process.poll() is None:
        now = time.perf_counter()
        if now < not_before:
            time.sleep(min(not_before - now, 0.01))
            continue
        if mode == "timed":
            break
        fresh = [name for name in temp_files(out) if name not in checked]
        if mode == "mid-save" and fresh:
            break
        if mode == "final-save":
            # A save writes the state, then the weights, then config.json: while a weights
            # temp file exists, the state on disk is the one this save has just written.
            fresh = [name for name in fresh if name.startswith(".weights-")]
            if fresh:
                checked.update(fresh)
                process.send_signal(signal.SIGSTOP)
                if saved_step(out, stage) == stage.steps:
                    break
                process.send_signal(signal.SIGCONT)
        time.sleep(POLL_S)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)  # a stopped process dies too


def start(
    argv: list[str], log_path: Path, mode: str, out: Path, stage: Stage, delay: float
) -> tuple[int, float]:
    """Run ``argv`` to its end ("to-end") or until killed; returns its exit status
    (-9 when killed) and its seconds."""
    stale = set(temp_files(out))
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=ENV)
    try:
        if mode != "to-end":
            wait_and_kill(process, mode, out, stage, started + delay, stale)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, time.perf_counter() - started


def run_reference(stage: Stage, out: Path, log_path: Path) -> tuple[float, float]:
    """Run the stage uninterrupted; returns the seconds to its first saved training
    state and in all."""
    started = time.perf_counter()
    first_state = None
    with open(log_path, "wb") as log:
        process = subprocess.Popen(stage.argv(out), stdout=log, stderr=subprocess.STDOUT, env=ENV)
    while process.poll() is None:
        if first_state is None and (out / stage.state_name).exists():
            first_state = time.perf_counter() - started
        time.sleep(0.005)
    seconds = time.perf_counter() - started
    if process.returncode != 0 or first_state is None:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise SystemExit(f"the reference {stage.name} run failed ({process.returncode}):\n{tail}")
    return first_state, seconds


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_bytes = [t.detach().cpu().contiguous().reshape(-1).view(torch.uint8) for t in (a, b)]
    return torch.equal(*as_bytes)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested training state as {"optimizer/state/0/exp_avg": tensor, ...}."""
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list | tuple):
        items = list(enumerate(value))
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat.update(flatten(item, f"{prefix}/{key}" if prefix else str(key)))
    return flat


def compare(reference: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """How many entries are bitwise equal (tensors) or equal (anything else)."""
    names = sorted(set(reference) | set(other))
    different = []
    for name in names:
        a, b = reference.get(name), other.get(name)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            equal = same_bits(a, b)
        else:
            equal = name in reference and name in other and a == b
        if not equal:
            different.append(name)
    return {"identical": len(names) - len(different), "total": len(names), "different": different}


def compare_runs(reference: Path, other: Path, stage: Stage) -> dict[str, Any]:
    """The final weights, training state and the stage's metrics of two run directories,
    less their wall times (every entry named ``*seconds``)."""
    weights = [load_file(d / read_config(d)["weights_file"]) for d in (reference, other)]
    states = [flatten(load_state(d / stage.state_name)) for d in (reference, other)]
    metrics = [
        {
            key: value
            for key, value in read_config(d).get("metrics", {}).get(stage.name, {}).items()
            if "seconds" not in key
        }
        for d in (reference, other)
    ]
    for state in states:
        for key in [key for key in state if "seconds" in key]:
            del state[key]
    return {
        "weights": compare(*weights),
        "state": compare(*states),
        "metrics": compare(*metrics),
    }


def planned_delay(
    target: float, saved: int, startup_s: float, step_s: float, rng: random.Random
) -> float:
    """Seconds after the start at which a run resumed from step ``saved`` reaches step
    ``target``; a moment in its start-up when it is already past it."""
    if target > saved:
        return startup_s + (target - saved) * step_s
    return rng.uniform(0.2, 1.0) * startup_s


def kill_and_resume(stage: Stage, work: Path, kills: int, rng: random.Random) -> dict[str, Any]:
    stage_started = time.perf_counter()
    reference, out = work / f"{stage.name}-reference", work / f"{stage.name}-killed"
    logs = work / "logs"
    first_state_s, reference_s = run_reference(stage, reference, logs / f"{stage.name}-ref.log")
    step_s = max(reference_s - first_state_s, 0.0) / stage.steps
    startup_s = max(first_state_s - step_s, 0.1)
    targets = sorted(rng.uniform(0, stage.steps) for _ in range(kills - 1))
    modes = [("timed", "mid-save")[i % 2] for i in range(kills - 1)]
    modes = [*modes, "final-save", "to-end"]

    runs: list[Run] = []
    pending: set[str] = set()  # temp files left by kills, until a run is past its cleanup
    for i, mode in enumerate(modes):
        before = runs[-1].after if runs else None
        expected = before.state_step if before else None
        resume = (out / stage.state_name).exists()
        delay = None
        if mode in ("timed", "mid-save"):
            delay = planned_delay(targets[i], expected or 0, startup_s, step_s, rng)
        log_path = logs / f"{stage.name}-{i:02d}-{mode}.log"
        argv = stage.argv(out) + (["--resume"] if resume else [])
        returncode, seconds = start(argv, log_path, mode, out, stage, delay or 0.0)
        text = log_path.read_text(errors="replace")
        logged = RESUMED.search(text)
        run = Run(
            mode=mode,
            resume=resume,
            expected_step=expected if resume else None,
            logged_step=int(logged.group(1)) if logged else None,
            planned_delay_s=None if delay is None else round(delay, 3),
            seconds=round(seconds, 3),
            returncode=returncode,
            after=snapshot(out, stage),
        )
        if LOADED.search(text):  # this run got past its removal of stale temp files
            run.stale_temp_left = sorted(name for name in pending if (out / name).exists())
            pending.clear()
        if returncode == KILLED:
            pending.update(run.after.temp_files)
        runs.append(run)
        if returncode != KILLED:
            break  # finished (before its kill, or as the last run), or failed

    final = runs[-1]
    finished = final.returncode == 0 and final.after.state_step == stage.steps
    comparison = compare_runs(reference, out, stage) if finished else None
    killed = [r for r in runs if r.returncode == KILLED]
    resumed = [r for r in runs if r.logged_step is not None]
    result: dict[str, Any] = {
        "command": stage.command(),
        "steps": stage.steps,
        "kills": len(killed),
        "kills_by_mode": {m: sum(r.mode == m for r in killed) for m in dict.fromkeys(modes)},
        "kills_in_a_save": sum(bool(r.after.temp_files) for r in killed),
        "kills_with_state_ahead_of_checkpoint": sum(
            r.after.state_step is not None and r.after.state_step != r.after.checkpoint_step
            for r in killed
        ),
        "stale_temp_files_left_after_next_start": sum(len(r.stale_temp_left) for r in runs),
        "resumes_checked": len(resumed),
        "resume_mismatches": sum(r.logged_step != r.expected_step for r in resumed),
        "checkpoint_load_failures": sum(
            r.after.checkpoint not in ("loads", "absent") for r in runs
        ),
        "state_load_failures": sum(r.after.state_error is not None for r in runs),
        "unexpected_exits": [r.returncode for r in runs if r.returncode not in (0, KILLED)],
        "finished": finished,
        "final_checkpoint_step": final.after.checkpoint_step,
        "temp_files_at_end": final.after.temp_files,
        "comparison": comparison,
        "seconds": {
            "reference": round(reference_s, 2),
            "killed_and_resumed": round(sum(r.seconds for r in runs), 2),
            "stage": round(time.perf_counter() - stage_started, 2),
        },
        "timing_model": {"startup_s": round(startup_s, 3), "step_s": round(step_s, 4)},
        "runs": [asdict(r) for r in runs],
    }
    result["ok"] = bool(
        finished
        and comparison is not None
        and all(c["identical"] == c["total"] for c in comparison.values())
        and not result["resume_mismatches"]
        and not result["checkpoint_load_failures"]
        and not result["state_load_failures"]
        and not result["stale_temp_files_left_after_next_start"]
        and not result["unexpected_exits"]
        and not result["temp_files_at_end"]
        and result["final_checkpoint_step"] == stage.steps
    )
    return result


def summary(name: str, r: dict[str, Any]) -> str:
    modes = ", ".join(f"{n} {m}" for m, n in r["kills_by_mode"].items() if n)
    c = r["comparison"]
    same = (
        "; not finished"
        if c is None
        else "; identical to the reference: "
        + ", ".join(f"{k} {v['identical']}/{v['total']}" for k, v in c.items())
    )
    return (
        f"{name}: {'OK' if r['ok'] else 'FAILED'}: {r['kills']} kills ({modes}) in "
        f"{r['seconds']['killed_and_resumed']:.1f} s "
        f"(reference {r['seconds']['reference']:.1f} s); "
        f"{r['kills_in_a_save']} left temp files, "
        f"{r['stale_temp_files_left_after_next_start']} survived the next start; "
        f"{r['kills_with_state_ahead_of_checkpoint']} left the state ahead of the checkpoint; "
        f"resume step mismatches {r['resume_mismatches']}/{r['resumes_checked']}; "
        f"load failures: checkpoint {r['checkpoint_load_failures']}, "
        f"state {r['state_load_failures']}; unexpected exits {r['unexpected_exits']}; "
        f"final checkpoint at step {r['final_checkpoint_step']} of {r['steps']}{same}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=8, help="kills per stage")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--vae-steps", type=int, default=300)
    parser.add_argument("--ebm-steps", type=int, default=150)
    parser.add_argument("--checkpoint-every", type=int, default=1)
    parser.add_argument("--data", default=DATA, help="training images (a data source spec)")
    parser.add_argument("--workdir", type=Path, help="kept run directories and logs")
    parser.add_argument("--out", type=Path, default=Path("docs/kill-and-resume.json"))
    args = parser.parse_args()
    if args.kills < 1:
        parser.error("--kills must be at least 1")

    every = ["--checkpoint-every", str(args.checkpoint_every), "--device", "cpu"]

    def vae_argv(out: Path) -> list[str]:
        return [
            *(VAEBM, "train", "vae", "--out", str(out), "--name", "kill-and-resume"),
            *("--data", args.data, "--steps", str(args.vae_steps), "--hidden", "8"),
            *("--latent-channels", "2", "2", "--batch-size", "16", "--eval-every", "50"),
            *("--eval-images", "32", "--iwae-k", "2", *every),
        ]

    with tempfile.TemporaryDirectory(prefix="kill-and-resume-") as scratch:
        work = args.workdir or Path(scratch)
        for name in ("vae-reference", "vae-killed", "ebm-reference", "ebm-killed"):
            if (work / name).exists():
                raise SystemExit(f"{work / name} exists: give a new --workdir")
        (work / "logs").mkdir(parents=True, exist_ok=True)
        vae_reference = work / "vae-reference"

        def ebm_argv(out: Path) -> list[str]:
            return [
                *(VAEBM, "train", "ebm", "--checkpoint", str(vae_reference), "--out", str(out)),
                *("--steps", str(args.ebm_steps), "--batch-size", "8", "--langevin-steps", "2"),
                *("--buffer-size", "32", "--buffer-ramp-steps", "20", "--ema-decay", "0.999"),
                *("--corruption-weight", "1", "--eval-every", "50", "--eval-images", "16"),
                *every,
            ]

        rng = random.Random(args.seed)
        started = time.perf_counter()
        stages = {}
        for stage in (
            Stage("vae", args.vae_steps, vae_argv),
            Stage("ebm", args.ebm_steps, ebm_argv),
        ):
            stages[stage.name] = kill_and_resume(stage, work, args.kills, rng)
            print(summary(stage.name, stages[stage.name]), flush=True)

    result = {
        "command": this_command(),
        "torch": torch.__version__,
        "omp_num_threads": 1,
        "seconds": round(time.perf_counter() - started, 1),
        "ok": all(s["ok"] for s in stages.values()),
        "stages": stages,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{'all checks passed' if result['ok'] else 'CHECKS FAILED'} in {result['seconds']} s; "
        f"details in {args.out}"
    )
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
