"""Faults: broken checkpoint and calibration files at start-up, a checkpoint write that fails
midway, and SIGTERM while many requests are in flight.

Covered elsewhere, and only referenced here (see docs/reliability.md):

* missing checkpoint, weights cut to 100 bytes, corrupt config.json, calibration of other
  weights (hash edited), missing calibration, exit status 3 of ``serve()``:
  tests/test_service_startup.py;
* a failed ``os.replace``/``fsync`` while saving keeps the previous checkpoint:
  tests/test_checkpoint.py (``test_failed_save_leaves_the_previous_checkpoint_intact``,
  ``test_failure_while_writing_removes_the_temp_file``);
* training killed (in-process and a real CLI with SIGKILL) and resumed equals an
  uninterrupted run: tests/test_training.py (``test_vae_resume_after_sigkill_of_the_cli``,
  ``test_*_resume_after_kill_equals_uninterrupted_run``);
* one request in flight across SIGTERM: tests/test_service_startup.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.main import EXIT_STARTUP_FAILED
from service.runtime import StartupError
from service.settings import Settings
from tests.bad_inputs import MULTIPART, multipart, plain_png
from tests.conftest import tiny_vaebm
from tests.test_security import Exchange, exchange
from tests.test_service_startup import free_port, start_service, wait_ready

REPO = Path(__file__).resolve().parents[1]


def copy_checkpoint(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "checkpoint"
    shutil.copytree(source, target)
    return target


def start_fails(checkpoint: Path, **settings: object) -> str:
    """Start an app on ``checkpoint``: it must refuse, never be ready; returns the message."""
    app = create_app(Settings(checkpoint=checkpoint, device="cpu", **settings))
    with pytest.raises(StartupError) as info, TestClient(app):
        pass
    assert app.state.ready is False and app.state.runtime is None
    return str(info.value)


def weights_of(checkpoint: Path) -> Path:
    (weights,) = checkpoint.glob("weights-*.safetensors")
    return weights


def edit_calibration(checkpoint: Path, edit: Callable[[dict], object]) -> None:
    path = checkpoint / "calibration.json"
    calibration = json.loads(path.read_text())
    edit(calibration)
    path.write_text(json.dumps(calibration))


# ---------------------------------------------------------------------------------------------
# corrupt weights and calibration at start-up
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: b[: len(b) // 2], id="cut-in-half"),
        pytest.param(lambda b: b"", id="zero-bytes"),
        pytest.param(lambda b: b[:-1] + bytes([b[-1] ^ 1]), id="one-bit-flipped"),
        pytest.param(lambda b: b + b"\x00" * 16, id="trailing-bytes"),
    ],
)
def test_damaged_weights_refuse_to_start(
    tiny_checkpoint: Path, tmp_path: Path, damage: Callable[[bytes], bytes]
) -> None:
    checkpoint = copy_checkpoint(tiny_checkpoint, tmp_path)
    weights = weights_of(checkpoint)
    weights.write_bytes(damage(weights.read_bytes()))
    message = start_fails(checkpoint)
    assert message.startswith(f"cannot load the checkpoint ({weights} has sha256 ")
    assert "the file is truncated, corrupt or replaced" in message


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[:150]), "Unterminated", id="cut"),
        pytest.param(lambda p: p.write_bytes(b""), "Expecting value", id="zero-bytes"),
        pytest.param(lambda p: p.write_bytes(b"\xff\xfe\x00\x01"), "utf-8", id="binary"),
        pytest.param(lambda p: p.write_text("[1, 2, 3]"), "'list' object", id="json-list"),
        pytest.param(lambda p: p.write_text("null"), "'NoneType' object", id="json-null"),
        pytest.param(
            lambda p: p.write_text(json.dumps({"format_version": 1})), "'scores'", id="empty"
        ),
    ],
)
def test_garbage_calibration_refuses_to_start(
    tiny_checkpoint: Path, tmp_path: Path, damage: Callable[[Path], object], reason: str
) -> None:
    checkpoint = copy_checkpoint(tiny_checkpoint, tmp_path)
    path = checkpoint / "calibration.json"
    damage(path)
    message = start_fails(checkpoint)
    assert message.startswith(f"cannot load the calibration: {path} is corrupt or malformed: ")
    assert reason in message


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        pytest.param(
            lambda c: c["scores"][c["default_score"]].update(threshold=float("nan")),
            "threshold must be a finite number",
            id="nan-threshold",
        ),
        pytest.param(
            lambda c: c["scores"][c["default_score"]]["sorted_scores"].reverse(),
            "sorted_scores must be in non-decreasing order",
            id="unsorted-scores",
        ),
        pytest.param(
            lambda c: c.update(default_score="no_such_score"),
            "default_score 'no_such_score' has no calibration",
            id="unknown-default-score",
        ),
        pytest.param(
            lambda c: c.update(target_fpr="low"),
            "target_fpr must be in (0, 0.5], got 'low'",
            id="text-fpr",
        ),
        pytest.param(lambda c: c.update(format_version=2), "format_version", id="future-format"),
    ],
)
def test_inconsistent_calibration_refuses_to_start(
    tiny_checkpoint: Path, tmp_path: Path, edit: Callable[[dict], object], reason: str
) -> None:
    checkpoint = copy_checkpoint(tiny_checkpoint, tmp_path)
    edit_calibration(checkpoint, edit)
    message = start_fails(checkpoint)
    assert message.startswith("cannot load the calibration: ")
    assert reason in message


def test_calibration_left_over_from_other_weights_refuses_to_start(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """A new training run saved into the directory; the old calibration.json stayed."""

    from model.checkpoint import CheckpointInfo, save_checkpoint

    checkpoint = copy_checkpoint(tiny_checkpoint, tmp_path)
    old_calibration = (checkpoint / "calibration.json").read_bytes()
    retrained = tiny_vaebm(seed=123)
    digest = save_checkpoint(checkpoint, retrained, CheckpointInfo(name="tiny"))
    assert (checkpoint / "calibration.json").read_bytes() == old_calibration
    message = start_fails(checkpoint)
    assert message.startswith(f"cannot load the calibration: {checkpoint / 'calibration.json'}")
    assert f"the checkpoint's weights are {digest[:16]}...: recalibrate" in message


def test_start_up_failure_exits_3_and_is_never_ready(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A real ``python -m service`` on a cut calibration.json: one clear line, exit 3, and
    /readyz never answers 200 while it runs."""
    checkpoint = copy_checkpoint(tiny_checkpoint, tmp_path)
    path = checkpoint / "calibration.json"
    path.write_bytes(path.read_bytes()[:150])
    port = free_port()
    process = start_service(checkpoint, port, {"VAEBM_LOG_JSON": "1"})
    ready_answers = []
    try:
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            try:
                probe = exchange(port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n", timeout=2)
                ready_answers += probe.statuses
            except ConnectionRefusedError:  # uvicorn listens only after a good start-up
                ready_answers.append("refused")
            time.sleep(0.1)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == EXIT_STARTUP_FAILED, stderr
    assert ready_answers and 200 not in ready_answers
    errors = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    errors = [e for e in errors if e["level"] == "ERROR"]
    assert any(
        e["message"].startswith(f"start-up failed: cannot load the calibration: {path} is corrupt")
        for e in errors
    ), stderr
    assert "Traceback" not in stderr  # an expected failure: one line, not a stack trace


# Bugs in model/ found while writing these (see docs/reliability.md): a calibration or
# config.json that is valid JSON with values of the wrong range or type is accepted, and
# the service then fails on requests instead of at start-up. The tests below say what
# should happen; they are expected to fail until model/ validates these fields.


def test_calibration_with_iwae_k_0_refuses_to_start(tiny_checkpoint: Path, tmp_path: Path) -> None:
    checkpoint = copy_checkpoint(tiny_checkpoint, tmp_path)
    edit_calibration(checkpoint, lambda c: c.update(iwae_k=0))
    # Without the warm-up nothing scores before the first request, which then gets a 500.
    assert start_fails(checkpoint, warmup=False).startswith("cannot load the calibration: ")


def test_config_with_a_numeric_name_refuses_to_start(tiny_checkpoint: Path, tmp_path: Path) -> None:
    checkpoint = copy_checkpoint(tiny_checkpoint, tmp_path)
    config = json.loads((checkpoint / "config.json").read_text())
    config["name"] = 5  # every response then fails while setting the X-Model-Name header
    (checkpoint / "config.json").write_text(json.dumps(config))
    assert start_fails(checkpoint, warmup=False).startswith("cannot load the checkpoint")


# ---------------------------------------------------------------------------------------------
# a checkpoint write that fails midway
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fail_at", [1, 2], ids=["weights-rename", "config-rename"])
def test_service_serves_the_previous_checkpoint_after_a_failed_save(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int
) -> None:
    """The disk fills while a new checkpoint is written over a served one: the service
    still starts, on the old weights, with the old calibration."""

    from model.checkpoint import CheckpointInfo, save_checkpoint

    checkpoint = copy_checkpoint(tiny_checkpoint, tmp_path)
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    old_sha = json.loads(before["config.json"])["weights_sha256"]
    real_replace = os.replace
    calls = []

    def failing_replace(src: str, dst: str) -> None:
        calls.append(dst)
        if len(calls) == fail_at:
            raise OSError(28, "No space left on device (simulated)")
        real_replace(src, dst)

    new = tiny_vaebm(seed=7)
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(checkpoint, new, CheckpointInfo(name="new"))
    monkeypatch.undo()

    after = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    for name, data in before.items():
        assert after[name] == data, name
    assert set(after) <= set(before) | {n for n in after if n.startswith("weights-")}
    settings = Settings(checkpoint=checkpoint, device="cpu", warmup=True)
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["model"] == {
            "name": "tiny",
            "version": "0.1.0",
            "weights_sha256": old_sha,
        }
        score = client.post("/score", files={"file": ("a.png", plain_png(), "image/png")})
        assert score.status_code == 200


# ---------------------------------------------------------------------------------------------
# SIGTERM under load
# ---------------------------------------------------------------------------------------------


# `python -m service` whose first Langevin step waits for a gate file to appear: a model
# step as slow as the test needs, holding the one model thread while requests queue for
# it, with no guess at how fast the machine is.
GATED_SERVICE = textwrap.dedent(
    """
    import os, pathlib, runpy, time
    import model.vaebm

    gate = pathlib.Path(os.environ["GATED_SERVICE_GATE"])
    real_langevin = model.vaebm.VAEBM.langevin

    def gated_langevin(self, *args, **kwargs):
        if not gate.exists():
            gate.with_name(gate.name + ".reached").touch()
            while not gate.exists():
                time.sleep(0.01)
        return real_langevin(self, *args, **kwargs)

    model.vaebm.VAEBM.langevin = gated_langevin
    runpy.run_module("service", run_name="__main__", alter_sys=True)
    """
)


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, what: str) -> None:
    """Poll ``condition`` until it holds; fail if the server exits or 120 s pass first."""
    deadline = time.monotonic() + 120
    while not condition():
        assert process.poll() is None, f"the server exited while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} in 120 s"
        time.sleep(0.01)


def test_sigterm_with_many_requests_in_flight_answers_them_all(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """16 requests in flight when SIGTERM arrives (a /sample whose first step holds the
    model thread until after the signal, /score and /score/batch queued behind it):
    every one gets its 200, answered after the shutdown began, then the server exits 0."""
    script = tmp_path / "gated_service.py"
    script.write_text(GATED_SERVICE)
    gate = tmp_path / "gate"
    reached = tmp_path / "gate.reached"
    log = tmp_path / "stderr.log"
    port = free_port()
    settings = {"VAEBM_WARMUP": "false", "VAEBM_LOG_JSON": "1", "GATED_SERVICE_GATE": str(gate)}
    with log.open("w") as stderr:
        process = start_service(tiny_checkpoint, port, settings, stderr, script)
    image = plain_png(77)
    score_body = multipart([("file", "a.png", image, "image/png")])
    batch_body = multipart(
        [("files", f"{i}.png", plain_png(i * 40), "image/png") for i in range(4)]
    )
    sample_body = json.dumps({"n": 8, "steps": 2, "seed": 3}).encode()

    def raw(path: str, content_type: str, body: bytes) -> bytes:
        return (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    def sent(request: bytes) -> socket.socket:
        """A connection that has sent the whole request; its answer is read later."""
        connection = socket.create_connection(("127.0.0.1", port), timeout=120)
        connection.sendall(request)
        return connection

    def statuses_of(connection: socket.socket) -> list[int]:
        received = b""
        with connection:
            while chunk := connection.recv(65536):
                received += chunk
        return Exchange(received, closed_by_server=True).statuses

    requests = [raw("/sample", "application/json", sample_body)]
    requests += [raw("/score", MULTIPART, score_body)] * 10
    requests += [raw("/score/batch", MULTIPART, batch_body)] * 5
    try:
        wait_ready(f"http://127.0.0.1:{port}", process)
        connections = [sent(requests[0])]
        wait_for(reached.exists, process, "sample holding the model thread")
        connections += [sent(request) for request in requests[1:]]
        # Answered on a later connection: uvicorn has accepted and read every request
        # sent before it, and none of them can be answered while the model thread waits.
        probe = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        assert exchange(port, probe).statuses == [200]
        process.send_signal(signal.SIGTERM)
        wait_for(lambda: "Shutting down" in log.read_text(), process, "shutdown")
        gate.touch()
        statuses = [statuses_of(connection) for connection in connections]
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    assert statuses == [[200]] * len(requests), text[-3000:]
    assert process.returncode == 0, text[-3000:]
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    shutdown_at = next(i for i, line in enumerate(lines) if line["message"] == "Shutting down")
    answered_after = Counter(
        (line["route"], line["status"]) for line in lines[shutdown_at:] if "route" in line
    )
    assert answered_after == {("/sample", 200): 1, ("/score", 200): 10, ("/score/batch", 200): 5}
    assert lines[-1]["message"] == "shut down cleanly"
