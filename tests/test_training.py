"""Tests for the two training stages: checkpoints, exact resume, divergence, CLI, DDP.

Every run is tiny (hidden=8, 64 images, a handful of steps) and single-threaded, so
that the whole file takes seconds on a busy two-core machine.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch

import training.corruptions as corruptions
import training.scoring as scoring
import training.train_ebm as train_ebm_module
import training.train_vae as train_vae_module
from model.checkpoint import CheckpointError, load_checkpoint, read_config
from model.scores import MODEL_SCORE_NAMES
from training.arguments import field_descriptions
from training.calibrate import CalibrateArgs
from training.cli import main
from training.evaluate import EvaluateArgs
from training.flags import flag_name
from training.runtime import (
    DistContext,
    DivergenceError,
    batch_indices,
    check_finite,
    load_state,
    progress_bar,
    random_horizontal_flip,
    setup_distributed,
)
from training.train_ebm import EBMTrainArgs, learning_rate, train_ebm
from training.train_vae import VAETrainArgs, train_vae

torch.set_num_threads(1)  # two background jobs share the 2 cores: threads only add contention
REPO = Path(__file__).resolve().parents[1]


class Killed(BaseException):
    """Stands in for SIGKILL right after a checkpoint was written."""


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def ctx() -> DistContext:
    context = setup_distributed("cpu")
    assert context == DistContext(0, 1, torch.device("cpu"))
    assert context.is_main and not context.distributed
    return context


def vae_args(out: Path, data: str, **overrides) -> VAETrainArgs:
    args = VAETrainArgs(
        out=str(out),
        data=data,
        name="tiny",
        hidden=8,
        latent_channels=(2, 2),
        energy_hidden=8,
        val_fraction=0.25,
        steps=6,
        batch_size=16,
        kl_warmup_steps=3,
        eval_every=3,
        checkpoint_every=3,
        eval_images=16,
        iwae_k=2,
        seed=0,
        device="cpu",
    )
    return replace(args, **overrides)


VAE_FLAGS = [
    "--name", "tiny", "--hidden", "8", "--latent-channels", "2", "2", "--energy-hidden", "8",
    "--val-fraction", "0.25", "--batch-size", "16", "--kl-warmup-steps", "3",
    "--eval-images", "16", "--iwae-k", "2", "--device", "cpu",
]  # fmt: skip


def ebm_args(checkpoint: Path, out: Path, **overrides) -> EBMTrainArgs:
    args = EBMTrainArgs(
        checkpoint=str(checkpoint),
        out=str(out),
        energy_hidden=8,
        steps=6,
        batch_size=8,
        langevin_steps=2,
        step_size=1e-3,
        buffer_size=16,
        buffer_ramp_steps=2,
        flip=True,
        eval_every=3,
        checkpoint_every=3,
        eval_images=16,
        seed=1,
        device="cpu",
    )
    return replace(args, **overrides)


@pytest.fixture(scope="module")
def vae_checkpoint(tmp_path_factory, data, ctx) -> Path:
    """A tiny stage-1 checkpoint for the EBM tests (not modified by them)."""
    out = tmp_path_factory.mktemp("vae")
    train_vae(vae_args(out, data, steps=2, checkpoint_every=2, eval_every=2), ctx)
    return out


def assert_state_dicts_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def without_wall_time(state: dict) -> dict:
    """A training state less its wall times (the accumulated seconds, and the VAE's final
    ``train_seconds`` metric), the only fields a resume may change."""
    assert state["seconds"] >= 0
    kept = {k: v for k, v in state.items() if k != "seconds"}
    if "metrics" in kept:
        kept["metrics"] = {k: v for k, v in kept["metrics"].items() if k != "train_seconds"}
    return kept


def assert_nested_equal(a, b, where: str = "") -> None:
    """Bit-exact comparison of nested dicts/lists of tensors and numbers."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_nested_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_nested_equal(x, y, f"{where}/{i}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, where


def kill_after_checkpoint(monkeypatch, module, step_position: int, at_step: int) -> None:
    """Make the module's ``_save`` raise Killed right after it wrote step ``at_step``."""
    real_save = module._save

    def save_then_die(*args):
        real_save(*args)
        if args[step_position] == at_step:
            raise Killed

    monkeypatch.setattr(module, "_save", save_then_die)


def record_steps(monkeypatch, module) -> list[int]:
    """Record which global steps a run draws batches for."""
    steps: list[int] = []
    real = module.training_batch

    def recording(images, step, *rest):
        steps.append(step)
        return real(images, step, *rest)

    monkeypatch.setattr(module, "training_batch", recording)
    return steps


# -------------------------------------------------------------------- stage 1
def test_train_vae_writes_a_loadable_checkpoint(tmp_path, data, ctx):
    out = tmp_path / "run"
    metrics = train_vae(vae_args(out, data, steps=3), ctx)
    assert np.isfinite(metrics["val_elbo_bpd"]) and np.isfinite(metrics["val_iwae_bpd"])
    assert 0 < metrics["val_iwae_bpd"] < 9  # bits/dim of 8-bit data, untrained: near 8 at most
    model, info = load_checkpoint(out)
    assert model.vae.config.hidden == 8 and model.vae.config.latent_channels == (2, 2)
    assert info.name == "tiny"
    assert info.training["vae"]["completed_steps"] == 3
    assert info.training["vae"]["latent_channels"] == [2, 2]
    assert info.data == {"source": data, "val_fraction": 0.25, "split_seed": 0}
    assert info.metrics["vae"]["val_iwae_bpd"] == pytest.approx(metrics["val_iwae_bpd"])
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("weights-")) == [
        "config.json",
        "train_state_vae.pt",
    ]
    assert len(list(out.glob("weights-*.safetensors"))) == 1
    # The energy network of a stage-1 checkpoint is the zero placeholder.
    assert torch.equal(model.energy(torch.zeros(2, 1, 28, 28)), torch.zeros(2))


def test_random_horizontal_flip_mirrors_about_half_the_images():
    images = torch.arange(400 * 2 * 3, dtype=torch.float32).reshape(400, 1, 2, 3)
    torch.manual_seed(0)
    out = random_horizontal_flip(images)
    kept = (out == images).flatten(1).all(1)
    mirrored = (out == images.flip(3)).flatten(1).all(1)
    assert bool((kept ^ mirrored).all())  # each image whole, as is or mirrored
    assert 150 < int(mirrored.sum()) < 250
    torch.manual_seed(0)
    assert torch.equal(random_horizontal_flip(images), out)  # the global RNG decides


def test_vae_trains_on_flipped_images_only_when_asked(tmp_path, data, ctx):
    plain_dir, flipped_dir = tmp_path / "plain", tmp_path / "flipped"
    train_vae(vae_args(plain_dir, data), ctx)
    train_vae(vae_args(flipped_dir, data, flip=True), ctx)
    plain, _ = load_checkpoint(plain_dir)
    flipped, info = load_checkpoint(flipped_dir)
    assert info.training["vae"]["flip"] is True
    weight = "vae.enc_in.weight"
    assert not torch.equal(plain.state_dict()[weight], flipped.state_dict()[weight])


def test_vae_resume_after_kill_equals_uninterrupted_run(tmp_path, data, ctx, monkeypatch):
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    train_vae(vae_args(full_dir, data), ctx)

    kill_after_checkpoint(monkeypatch, train_vae_module, step_position=3, at_step=3)
    with pytest.raises(Killed):
        train_vae(vae_args(killed_dir, data), ctx)
    monkeypatch.undo()
    assert load_state(killed_dir / "train_state_vae.pt")["step"] == 3
    _, info = load_checkpoint(killed_dir)  # the checkpoint of step 3 is complete
    assert info.training["vae"]["completed_steps"] == 3
    half_way = load_checkpoint(killed_dir)[0].state_dict()

    steps = record_steps(monkeypatch, train_vae_module)
    train_vae(vae_args(killed_dir, data, resume=True), ctx)
    assert steps == [3, 4, 5]  # continued, not restarted

    full, _ = load_checkpoint(full_dir)
    resumed, info = load_checkpoint(killed_dir)
    assert info.training["vae"]["completed_steps"] == 6
    assert_state_dicts_equal(full.state_dict(), resumed.state_dict())
    assert_nested_equal(
        without_wall_time(load_state(full_dir / "train_state_vae.pt")),
        without_wall_time(load_state(killed_dir / "train_state_vae.pt")),
    )
    # Sanity: the comparison is not trivially true (training moved the weights).
    assert not torch.equal(half_way["vae.enc_in.weight"], full.state_dict()["vae.enc_in.weight"])


def test_vae_resume_after_sigkill_of_the_cli(tmp_path, data, ctx):
    """A real `python -m training.cli train vae` killed with SIGKILL, then --resume."""
    steps = 30
    killed_dir, full_dir = tmp_path / "killed", tmp_path / "full"
    flags = [*VAE_FLAGS, "--data", data, "--steps", str(steps), "--eval-every", "1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "training.cli", "train", "vae", "--out", str(killed_dir),
         *flags, "--checkpoint-every", "1"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    state = killed_dir / "train_state_vae.pt"
    try:
        deadline = time.monotonic() + 60
        while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = load_state(state)["step"]
    assert 1 <= killed_at < steps

    assert main(["train", "vae", "--out", str(killed_dir), *flags, "--resume"]) == 0
    assert main(["train", "vae", "--out", str(full_dir), *flags]) == 0
    full, _ = load_checkpoint(full_dir)
    resumed, info = load_checkpoint(killed_dir)
    assert info.training["vae"]["completed_steps"] == steps
    assert_state_dicts_equal(full.state_dict(), resumed.state_dict())


def test_vae_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, data, ctx):
    out = tmp_path / "run"
    # An absurd learning rate blows the weights up after the first update.
    args = vae_args(out, data, lr=1e30, steps=5, checkpoint_every=1, eval_every=1000)
    with pytest.raises(DivergenceError, match="non-finite"):
        train_vae(args, ctx)
    model, info = load_checkpoint(out)
    assert info.training["vae"]["completed_steps"] == 1
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    assert load_state(out / "train_state_vae.pt")["step"] == 1


# -------------------------------------------------------------------- stage 2
@pytest.mark.parametrize("options", [{"ema_decay": 0.0}, {"ema_decay": 0.9}, {"lr_decay_from": 2}])
def test_ebm_resume_after_kill_equals_uninterrupted_run(
    tmp_path, vae_checkpoint, ctx, monkeypatch, options
):
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    vae_state = load_checkpoint(vae_checkpoint)[0].vae.state_dict()
    train_ebm(ebm_args(vae_checkpoint, full_dir, **options), ctx)

    kill_after_checkpoint(monkeypatch, train_ebm_module, step_position=6, at_step=3)
    with pytest.raises(Killed):
        train_ebm(ebm_args(vae_checkpoint, killed_dir, **options), ctx)
    monkeypatch.undo()
    state_at_3 = load_state(killed_dir / "train_state_ebm.pt")
    assert state_at_3["step"] == 3

    steps = record_steps(monkeypatch, train_ebm_module)
    train_ebm(ebm_args(vae_checkpoint, killed_dir, **options, resume=True), ctx)
    assert steps == [3, 4, 5]

    full, _ = load_checkpoint(full_dir)
    resumed, info = load_checkpoint(killed_dir)
    assert info.training["ebm"]["completed_steps"] == 6
    assert_state_dicts_equal(full.state_dict(), resumed.state_dict())
    full_state = load_state(full_dir / "train_state_ebm.pt")
    resumed_state = load_state(killed_dir / "train_state_ebm.pt")
    assert "buffer" in full_state  # the persistent eps_z chains are saved and restored
    assert_nested_equal(without_wall_time(full_state), without_wall_time(resumed_state))
    # The VAE stays frozen; the energy was trained.
    assert_state_dicts_equal(resumed.vae.state_dict(), vae_state)
    assert float(resumed.energy.head.weight.abs().sum()) > 0
    # The buffer chains moved: Langevin wrote them back between the two saves.
    assert full_state["buffer"]["eps_z0"].shape == (16, 2, 7, 7)
    assert not torch.equal(full_state["buffer"]["eps_z0"], state_at_3["buffer"]["eps_z0"])


def test_ebm_resume_with_a_new_learning_rate_uses_it(tmp_path, vae_checkpoint, ctx):
    """Going on with a lower lr (as after a divergence) must not silently keep the old one."""
    out = tmp_path / "run"
    train_ebm(ebm_args(vae_checkpoint, out, steps=3), ctx)
    assert load_state(out / "train_state_ebm.pt")["optimizer"]["param_groups"][0]["lr"] == 5e-5
    train_ebm(ebm_args(vae_checkpoint, out, steps=5, lr=1e-5, resume=True), ctx)
    state = load_state(out / "train_state_ebm.pt")
    assert state["step"] == 5
    assert state["optimizer"]["param_groups"][0]["lr"] == 1e-5


def test_ebm_learning_rate_falls_linearly_to_zero_from_lr_decay_from():
    constant = EBMTrainArgs(lr=1e-4, steps=10)
    assert [learning_rate(t, constant) for t in (0, 5, 9)] == [1e-4] * 3
    decaying = EBMTrainArgs(lr=1e-4, steps=10, lr_decay_from=4)
    rates = [learning_rate(t, decaying) for t in range(10)]
    assert rates[:5] == [1e-4] * 5  # the update at step 4 still uses the full lr
    assert rates[7] == pytest.approx(0.5e-4) and rates[9] == pytest.approx(1e-4 / 6)
    assert all(a > b for a, b in zip(rates[4:], rates[5:], strict=False))


def test_ebm_lr_decay_reaches_the_optimizer(tmp_path, vae_checkpoint, ctx):
    out = tmp_path / "run"
    train_ebm(ebm_args(vae_checkpoint, out, lr=8e-5, lr_decay_from=2), ctx)  # 6 steps
    last = load_state(out / "train_state_ebm.pt")["optimizer"]["param_groups"][0]["lr"]
    assert last == pytest.approx(8e-5 * (6 - 5) / (6 - 2))  # the lr of the last update


def test_ebm_divergence_exits_3_and_keeps_the_last_good_checkpoint(tmp_path, vae_checkpoint):
    out = tmp_path / "ebm"
    argv = [
        "train", "ebm", "--checkpoint", str(vae_checkpoint), "--out", str(out),
        "--energy-hidden", "8", "--steps", "5", "--batch-size", "8", "--langevin-steps", "1",
        "--eval-every", "1000", "--eval-images", "16", "--checkpoint-every", "1",
        "--device", "cpu", "--max-abs-energy", "1e-12",
    ]  # fmt: skip
    # E = 0 exactly at step 0 (zero-initialised head); any update makes |E| > 1e-12.
    assert main(argv) == 3
    model, info = load_checkpoint(out)
    assert info.training["ebm"]["completed_steps"] == 1
    config = read_config(out)
    assert len(list(out.glob("weights-*.safetensors"))) == 1
    assert config["weights_file"] == next(out.glob("weights-*.safetensors")).name
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert load_state(out / "train_state_ebm.pt")["step"] == 1
    assert_state_dicts_equal(
        model.energy.state_dict(), load_state(out / "train_state_ebm.pt")["energy"]
    )
    # With the default limit the same run finishes normally.
    assert main([a for a in argv if a not in ("--max-abs-energy", "1e-12")] + ["--overwrite"]) == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cd_input", "median"),
        ("shuffled_negatives", 1.5),
        ("ema_decay", 1.0),
        ("negative_temperature", 0.0),
        ("corruption_weight", -1.0),
        ("positive_variance_weight", -1e-4),
        ("corruption_blur_min", 0.0),
        ("corruption_blur_max", 1.0),
        ("corruption_pairs", "some"),
        ("energy_head", "mean"),
        ("lr_decay_from", 6),  # not before the last step (steps=6)
        ("lr_decay_from", -1),
    ],
)
def test_ebm_rejects_an_out_of_range_option(tmp_path, vae_checkpoint, ctx, field, value):
    with pytest.raises(ValueError, match=flag_name(field)):  # named as the user writes it
        train_ebm(ebm_args(vae_checkpoint, tmp_path / "x", **{field: value}), ctx)
    assert not (tmp_path / "x").exists()  # refused before anything was written


# Each option of the energy study, with what it needs to take effect: the blur range and
# the pairs shape the corruption term, which is off unless it has a weight.
STUDY_OPTIONS = [
    ({"shuffled_negatives": 0.5}, {}),
    ({"negative_temperature": 2.0}, {}),
    ({"corruption_weight": 1.0}, {}),
    ({"corruption_blur_max": 8.0}, {"corruption_weight": 1.0}),
    ({"corruption_pairs": "all"}, {"corruption_weight": 1.0}),
    ({"spectral_head": True}, {}),
    ({"energy_head": "global"}, {}),
    ({"positive_variance_weight": 1.0}, {}),
]
STUDY_RUN = {"steps": 2, "eval_every": 2, "checkpoint_every": 2}


@pytest.fixture(scope="module")
def study_baseline(tmp_path_factory, vae_checkpoint, ctx):
    """The trained energy of a study run without the option under test (one run each)."""
    trained: dict[tuple, dict] = {}

    def energy_without(base: dict) -> dict:
        key = tuple(sorted(base.items()))
        if key not in trained:
            out = tmp_path_factory.mktemp("study-baseline")
            train_ebm(ebm_args(vae_checkpoint, out, **STUDY_RUN, **base), ctx)
            trained[key] = load_checkpoint(out)[0].energy.state_dict()
        return trained[key]

    return energy_without


@pytest.mark.parametrize(
    ("option", "base"),
    STUDY_OPTIONS,
    ids=[f"{k}-{v}" for option, _ in STUDY_OPTIONS for k, v in option.items()],
)
def test_ebm_trains_with_each_study_option(
    tmp_path, vae_checkpoint, ctx, study_baseline, option, base
):
    """Each option is recorded and reaches the training: the energy trained with it
    differs from the one trained, from the same seed, without it."""
    out = tmp_path / "s"
    metrics = train_ebm(ebm_args(vae_checkpoint, out, **STUDY_RUN, **base, **option), ctx)
    assert np.isfinite(metrics["val_energy_mean"])
    model, info = load_checkpoint(out)
    for field, value in {**base, **option}.items():
        assert info.training["ebm"][field] == value
    assert model.energy.config.head == option.get("energy_head", "sum")
    trained, without = model.energy.state_dict(), study_baseline(base)
    assert trained.keys() != without.keys() or any(
        not torch.equal(trained[key], without[key]) for key in trained
    ), f"{option} left the trained energy as it is without it"


def test_shuffle_pixels_keeps_each_images_intensities_and_breaks_its_structure():
    torch.manual_seed(0)
    images = torch.rand(4, 3, 8, 8)
    shuffled = corruptions.shuffle_pixels(images)
    assert shuffled.shape == images.shape and not torch.equal(shuffled, images)
    for original, moved in zip(images, shuffled, strict=True):
        for channel in range(3):  # the same values, somewhere else
            assert torch.equal(
                original[channel].flatten().sort()[0], moved[channel].flatten().sort()[0]
            )
        # one permutation per image, shared by its channels: a pixel keeps its RGB triple
        triples = {tuple(v.tolist()) for v in original.flatten(1).T}
        assert {tuple(v.tolist()) for v in moved.flatten(1).T} == triples


def test_with_shuffled_negatives_replaces_the_requested_share():
    x_neg, x_pos = torch.zeros(8, 1, 4, 4), torch.rand(8, 1, 4, 4)
    out = corruptions.with_shuffled_negatives(x_neg, x_pos, 0.25)
    assert out.shape == x_neg.shape
    assert (out[:2] != 0).any() and torch.equal(out[2:], x_neg[2:])
    assert torch.equal(corruptions.with_shuffled_negatives(x_neg, x_pos, 0.0), x_neg)


def test_gaussian_blur_keeps_constants_and_the_mean_and_smooths_edges():
    flat = torch.full((2, 1, 28, 28), 0.3)
    torch.testing.assert_close(corruptions.gaussian_blur(flat, 3.0), flat)
    edge = torch.zeros(1, 1, 28, 28)
    edge[..., 14:] = 1.0
    blurred = corruptions.gaussian_blur(edge, 3.0)
    assert blurred.shape == edge.shape
    row = blurred[0, 0, 10]
    assert (row.diff() >= -1e-6).all() and 0.05 < float(row[13]) < 0.5 < float(row[14]) < 0.95


def test_corrupt_images_shuffles_the_first_half_and_blurs_the_rest():
    torch.manual_seed(0)
    images = torch.rand(6, 1, 28, 28) * 2 - 1
    out = corruptions.corrupt_images(images, blur_range=(2.0, 2.0))
    for original, moved in zip(images[:3], out[:3], strict=True):
        assert torch.equal(original.flatten().sort().values, moved.flatten().sort().values)
        assert not torch.equal(original, moved)  # the same values, moved
    torch.testing.assert_close(out[3:], corruptions.gaussian_blur(images[3:], 2.0))


def test_gaussian_blur_with_one_sigma_per_image_blurs_each_by_its_own():
    torch.manual_seed(0)
    images = torch.rand(3, 2, 28, 28)
    blur = corruptions.gaussian_blur
    sigmas = torch.tensor([0.7, 2.0, 5.0])
    together = blur(images, sigmas)
    # The widest blur sets the shared radius, so that image is exactly as blurred alone.
    torch.testing.assert_close(together[2:], blur(images[2:], 5.0))
    # Each image gets its own sigma: reordering the batch reorders the result.
    order = torch.tensor([2, 0, 1])
    torch.testing.assert_close(blur(images[order], sigmas[order]), together[order])
    # One sigma for all, as a tensor or a number, is the same blur.
    torch.testing.assert_close(blur(images, torch.full((3,), 2.0)), blur(images, 2.0))
    # Stronger blur, less detail left: the pixel spread falls with sigma.
    spread = together.flatten(1).std(1)
    assert spread[0] > spread[1] > spread[2]


def test_wide_blur_range_reaches_nearly_flat_images_without_leaving_the_mean():
    torch.manual_seed(1)
    images = torch.rand(64, 1, 28, 28) * 2 - 1
    out = corruptions.corrupt_images(images, blur_range=(1.0, 13.0))[32:]
    spread = out.flatten(1).std(1)
    assert float(spread.min()) < 0.02 < 0.1 < float(spread.max())  # scales span the range
    torch.testing.assert_close(out.mean((1, 2, 3)), images[32:].mean((1, 2, 3)), atol=0.05, rtol=0)


def test_ebm_publishes_the_moving_average_of_the_energy(tmp_path, vae_checkpoint, ctx):
    """With ema_decay d the published energy is the average of the iterates, not the
    last one: replaying the recorded iterates through the EMA formula reproduces it."""
    iterates = []
    real_step = torch.optim.Adam.step

    def recording_step(self, *a, **k):
        out = real_step(self, *a, **k)
        iterates.append([p.detach().clone() for p in self.param_groups[0]["params"]])
        return out

    decay = 0.5
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.Adam, "step", recording_step)
        train_ebm(ebm_args(vae_checkpoint, tmp_path / "e", ema_decay=decay), ctx)
    published, info = load_checkpoint(tmp_path / "e")
    assert info.training["ebm"]["ema_decay"] == decay
    expected = iterates[0]  # AveragedModel copies the first update as is
    for params in iterates[1:]:
        expected = [decay * e + (1 - decay) * p for e, p in zip(expected, params, strict=True)]
    got = list(published.energy.parameters())
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
    last = iterates[-1]
    assert any(not torch.allclose(g, p) for g, p in zip(got, last, strict=True))
    assert "ema" in load_state(tmp_path / "e" / "train_state_ebm.pt")


# ----------------------------------------------------------------------- CLI
def test_cli_train_vae_writes_a_loadable_checkpoint(tmp_path, data):
    out = tmp_path / "cli"
    argv = ["train", "vae", "--out", str(out), "--data", data, *VAE_FLAGS, "--steps", "2"]
    assert main(argv) == 0
    model, info = load_checkpoint(out)
    assert info.training["vae"]["completed_steps"] == 2
    assert info.training["vae"]["hidden"] == 8
    assert model.vae.config.latent_channels == (2, 2)
    assert model.vae.sample(2).shape == (2, 1, 28, 28)


def test_cli_train_all_runs_both_stages_into_one_checkpoint(tmp_path, data):
    out = tmp_path / "all"
    argv = [
        "train", "all", "--out", str(out), "--data", data, *VAE_FLAGS, "--steps", "2",
        "--ebm-energy-hidden", "8", "--ebm-steps", "2", "--ebm-batch-size", "8",
        "--ebm-langevin-steps", "1", "--ebm-eval-images", "16", "--ebm-buffer-size", "8",
    ]  # fmt: skip
    assert main(argv) == 0
    model, info = load_checkpoint(out)
    assert info.training["vae"]["completed_steps"] == 2
    assert info.training["ebm"]["completed_steps"] == 2
    assert info.training["ebm"]["buffer_size"] == 8
    assert set(info.metrics) == {"vae", "ebm"}
    assert (out / "train_state_vae.pt").exists() and (out / "train_state_ebm.pt").exists()
    assert float(model.energy.head.weight.abs().sum()) > 0  # stage 2 trained the energy
    assert model.sample(2, steps=2, step_size=1e-3, seed=0).shape == (2, 1, 28, 28)


def test_cli_train_all_resume_after_kill_in_the_ebm_stage(tmp_path, data, monkeypatch):
    """`train all --resume` skips the finished VAE stage and continues the EBM exactly."""

    def argv(out: Path) -> list[str]:
        return [
            "train", "all", "--out", str(out), "--data", data, *VAE_FLAGS, "--steps", "2",
            "--ebm-energy-hidden", "8", "--ebm-steps", "4", "--ebm-batch-size", "8",
            "--ebm-langevin-steps", "1", "--ebm-eval-images", "16", "--ebm-buffer-size", "8",
            "--ebm-checkpoint-every", "2",
        ]  # fmt: skip

    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    assert main(argv(full_dir)) == 0
    kill_after_checkpoint(monkeypatch, train_ebm_module, step_position=6, at_step=2)
    with pytest.raises(Killed):
        main(argv(killed_dir))
    monkeypatch.undo()
    before = read_config(killed_dir)
    assert before["training"]["ebm"]["completed_steps"] == 2

    vae_saves = []
    monkeypatch.setattr(train_vae_module, "_save", lambda *a: vae_saves.append(a[3]))
    assert main([*argv(killed_dir), "--resume"]) == 0
    assert vae_saves == []  # the finished VAE stage does not overwrite the EBM's checkpoint
    after = read_config(killed_dir)
    assert after["metrics"]["vae"] == before["metrics"]["vae"]
    assert after["training"]["ebm"]["completed_steps"] == 4
    full, _ = load_checkpoint(full_dir)
    resumed, _ = load_checkpoint(killed_dir)
    assert_state_dicts_equal(full.state_dict(), resumed.state_dict())


def test_cli_help_lists_both_stages_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "all", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--steps", "--latent-channels", "--resume", "--ebm-steps", "--ebm-buffer-size"):
        assert flag in text


@pytest.mark.parametrize("cls", [VAETrainArgs, EBMTrainArgs, CalibrateArgs, EvaluateArgs])
def test_every_settings_field_is_described_in_its_docstring(cls):
    descriptions = field_descriptions(cls)
    assert set(descriptions) == {f.name for f in fields(cls)}
    assert all(len(text.split()) >= 3 for text in descriptions.values()), descriptions


def test_field_descriptions_refuse_an_undocumented_or_unknown_field():
    @dataclass
    class Documented:
        """Settings.

        Parameters
        ----------
        steps : int
            Optimiser steps in all.
        gone : float
            A field that no longer exists.

        Notes
        -----
        not : a parameter
        """

        steps: int = 1
        lr: float = 0.1

    expected = r"undocumented fields \['lr'\].*unknown fields \['gone'\]"
    with pytest.raises(ValueError, match=expected):
        field_descriptions(Documented)


def test_cli_help_explains_each_flag_and_shows_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "ebm", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--alpha-s ALPHA_S Weight of the spectral-norm regulariser" in text
    assert "(default: 0.2)" in text and "(default: 'runs/vae')" in text
    assert "--flip, --no-flip Random horizontal flips of the positives" in text
    assert "(default: False)" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["calibrate", "--checkpoint", "{missing}", "--data", "sklearn-digits"],
        ["evaluate", "--checkpoint", "{missing}", "--in", "sklearn-digits", "--ood", "n=noise:4"],
        ["sample", "--checkpoint", "{missing}", "-n", "2"],
        ["train", "ebm", "--checkpoint", "{missing}", "--steps", "1"],
    ],
)
def test_cli_reports_a_missing_checkpoint_in_one_line_with_exit_code_2(tmp_path, caplog, argv):
    missing = tmp_path / "no-such-checkpoint"
    code = main([a.format(missing=missing) for a in argv])
    assert code == 2
    assert f"checkpoint directory {missing} does not exist" in caplog.text


# ----------------------------------------------------------------- runtime
def test_batches_are_a_function_of_seed_and_step_and_split_between_ranks():
    single = DistContext(0, 1, torch.device("cpu"))
    a = batch_indices(50, 8, 13, 4, single)
    assert torch.equal(a, batch_indices(50, 8, 13, 4, single))
    assert not torch.equal(a, batch_indices(50, 8, 13, 5, single))
    halves = [batch_indices(50, 8, 13, 4, DistContext(r, 2, torch.device("cpu"))) for r in (0, 1)]
    assert sorted(torch.cat(halves).tolist()) == sorted(a.tolist())
    assert len(halves[0]) == len(halves[1]) == 4
    # One epoch (6 batches of 8 from 50) visits distinct items.
    epoch = torch.cat([batch_indices(50, 8, s, 4, single) for s in range(6)])
    assert len(set(epoch.tolist())) == 48


def test_check_finite():
    check_finite(0, loss=1.0, bpd=-2.5)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(DivergenceError, match="step 7"):
            check_finite(7, loss=1.0, bpd=bad)


# --------------------------------------------------------------------- DDP
DDP_WRAPPER = textwrap.dedent(
    """
    # Runs `vaebm train` under torchrun, recording which ranks write files and
    # a fingerprint of each rank's final VAE weights.
    import hashlib, os, sys
    import torch
    import model.checkpoint, training.runtime, training.train_vae as tv
    from training.cli import main

    rank = os.environ["RANK"]
    log = sys.argv[1]

    def note(text):
        with open(log, "a") as f:
            f.write(f"{rank} {text}\\n")

    real_bytes = model.checkpoint.atomic_write_bytes
    def recording_write(path, data):
        note("write " + os.path.basename(str(path)))
        return real_bytes(path, data)
    model.checkpoint.atomic_write_bytes = recording_write
    training.runtime.atomic_write_bytes = recording_write

    vaes = []
    class RecordingVAE(tv.VAE):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            vaes.append(self)
    tv.VAE = RecordingVAE

    code = main(sys.argv[2:])
    digest = hashlib.sha256()
    for key, t in sorted(vaes[0].state_dict().items()):
        digest.update(key.encode() + t.detach().contiguous().numpy().tobytes())
    note(f"world {os.environ['WORLD_SIZE']} weights {digest.hexdigest()} code {code}")
    sys.exit(code)
    """
)


def run_two_ranks(wrapper: str, log: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """`wrapper` (a script given the log path, then `vaebm` arguments) as two ranks
    under torchrun on the CPU, one thread each."""
    script = log.with_suffix(".py")
    script.write_text(wrapper)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd = [*torchrun, "--standalone", str(script), str(log), *argv]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


def test_ddp_two_processes_train_and_only_rank_0_writes(tmp_path, data):
    out = tmp_path / "ddp"
    log = tmp_path / "ranks.log"
    argv = [
        "train", "vae", "--out", str(out), "--data", data, *VAE_FLAGS,
        "--steps", "3", "--checkpoint-every", "2", "--eval-every", "2",
    ]  # fmt: skip
    result = run_two_ranks(DDP_WRAPPER, log, argv)
    assert result.returncode == 0, result.stderr[-3000:]

    lines = log.read_text().splitlines()
    writers = {line.split()[0] for line in lines if " write " in line}
    assert writers == {"0"}, lines  # only rank 0 writes
    finals = {line.split()[0]: line.split() for line in lines if " world " in line}
    assert set(finals) == {"0", "1"}
    assert finals["0"][2] == finals["1"][2] == "2"
    assert finals["0"][-1] == finals["1"][-1] == "0"
    assert finals["0"][4] == finals["1"][4], "ranks ended with different weights"

    model, info = load_checkpoint(out)
    assert info.training["vae"]["completed_steps"] == 3
    digest = hashlib.sha256()  # rank 0's final weights are the published ones
    for key, t in sorted(model.vae.state_dict().items()):
        digest.update(key.encode() + t.contiguous().numpy().tobytes())
    assert digest.hexdigest() == finals["0"][4]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("weights-")) == [
        "config.json",
        "train_state_vae.pt",
    ]
    assert len(list(out.glob("weights-*.safetensors"))) == 1


DDP_DIVERGENCE_WRAPPER = textwrap.dedent(
    """
    # `vaebm train ebm` under torchrun where only rank 0's energies blow up.
    import os, sys
    import model.energy
    from training.cli import main

    if os.environ["RANK"] == "0":
        real_forward = model.energy.EnergyNet.forward
        model.energy.EnergyNet.forward = lambda self, x: 1e6 * real_forward(self, x)
    code = main(sys.argv[2:])
    with open(sys.argv[1], "a") as f:
        f.write(f"{os.environ['RANK']} {code}\\n")
    sys.exit(code)
    """
)


def test_ddp_divergence_on_one_rank_stops_every_rank(tmp_path, vae_checkpoint):
    out = tmp_path / "ebm"
    log = tmp_path / "codes.log"
    argv = [
        "train", "ebm", "--checkpoint", str(vae_checkpoint),
        "--out", str(out), "--energy-hidden", "8", "--steps", "4", "--batch-size", "8",
        "--langevin-steps", "1", "--eval-every", "1000", "--eval-images", "16",
        "--checkpoint-every", "1", "--device", "cpu", "--max-abs-energy", "1.0",
    ]  # fmt: skip
    result = run_two_ranks(DDP_DIVERGENCE_WRAPPER, log, argv)
    assert result.returncode != 0
    # Step 0: E = 0 everywhere. Step 1: |E| ~ 1e-4 on rank 1 but ~1e2 on rank 0; both
    # ranks must stop there with the divergence exit code (none left hanging or killed).
    assert sorted(log.read_text().split("\n")[:-1]) == ["0 3", "1 3"], result.stderr[-3000:]
    _, info = load_checkpoint(out)
    assert info.training["ebm"]["completed_steps"] == 1


def test_corruption_ranking_loss_counts_own_pairs_or_every_pair():
    ranking = corruptions.corruption_ranking_loss
    e_clean, e_corrupted = torch.tensor([10.0, 0.0]), torch.tensor([20.0, 5.0])
    softplus = torch.nn.functional.softplus
    # Each corrupted image outranks its own original by 5-10 nats: a small loss.
    torch.testing.assert_close(
        ranking(e_clean, e_corrupted, "own"),
        (softplus(torch.tensor(-10.0)) + softplus(torch.tensor(-5.0))) / 2,
    )
    # Against every clean image, the second corrupted one (5) ranks below the first
    # clean one (10): that pair dominates the mean.
    every = torch.tensor([10 - 20, 10 - 5, 0 - 20, 0 - 5], dtype=torch.float32)
    torch.testing.assert_close(ranking(e_clean, e_corrupted, "all"), softplus(every).mean())
    assert ranking(e_clean, e_corrupted, "all") > 1.0 > ranking(e_clean, e_corrupted, "own")
    # Its gradient pushes the costly clean image down and the cheap corrupted one up.
    clean, corrupted = e_clean.clone().requires_grad_(), e_corrupted.clone().requires_grad_()
    ranking(clean, corrupted, "all").backward()
    assert clean.grad[0] > clean.grad[1] > 0 and corrupted.grad[1] < corrupted.grad[0] < 0


# ------------------------------------------------------- kills, corrupt files, Ctrl-C
def test_ebm_resume_after_kill_between_its_first_state_and_checkpoint(
    tmp_path, vae_checkpoint, ctx, monkeypatch
):
    """Killed after the first training state reached a new --out but before config.json
    did: --resume takes the frozen VAE from --checkpoint and goes on exactly."""
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    train_ebm(ebm_args(vae_checkpoint, full_dir), ctx)

    def killed(*args):
        raise Killed

    monkeypatch.setattr(train_ebm_module, "save_checkpoint", killed)
    with pytest.raises(Killed):
        train_ebm(ebm_args(vae_checkpoint, killed_dir), ctx)
    monkeypatch.undo()
    assert [p.name for p in killed_dir.iterdir()] == ["train_state_ebm.pt"]

    steps = record_steps(monkeypatch, train_ebm_module)
    train_ebm(ebm_args(vae_checkpoint, killed_dir, resume=True), ctx)
    assert steps == [3, 4, 5]
    full, _ = load_checkpoint(full_dir)
    resumed, info = load_checkpoint(killed_dir)
    assert info.training["ebm"]["completed_steps"] == 6
    assert_state_dicts_equal(full.state_dict(), resumed.state_dict())


def kill_before_checkpoint_of_step(monkeypatch, module, stage: str, at_step: int) -> None:
    """Make the module's ``save_checkpoint`` raise Killed when it would publish step
    ``at_step``: the training state of that step is written, its checkpoint is not."""
    real = module.save_checkpoint

    def save_or_die(out, model, info):
        if info.training[stage]["completed_steps"] == at_step:
            raise Killed
        real(out, model, info)

    monkeypatch.setattr(module, "save_checkpoint", save_or_die)


def test_ebm_killed_between_its_last_state_and_checkpoint_publishes_on_resume(
    tmp_path, vae_checkpoint, ctx, monkeypatch
):
    """The resumed run found its last step done and returned: the published energy (the
    moving average) and metrics stayed at the step before."""
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    train_ebm(ebm_args(vae_checkpoint, full_dir, ema_decay=0.9), ctx)
    kill_before_checkpoint_of_step(monkeypatch, train_ebm_module, "ebm", at_step=6)
    with pytest.raises(Killed):
        train_ebm(ebm_args(vae_checkpoint, killed_dir, ema_decay=0.9), ctx)
    monkeypatch.undo()
    assert load_state(killed_dir / "train_state_ebm.pt")["step"] == 6
    assert load_checkpoint(killed_dir)[1].training["ebm"]["completed_steps"] == 3

    steps = record_steps(monkeypatch, train_ebm_module)
    train_ebm(ebm_args(vae_checkpoint, killed_dir, ema_decay=0.9, resume=True), ctx)
    assert steps == []
    full, full_info = load_checkpoint(full_dir)
    resumed, info = load_checkpoint(killed_dir)
    assert info.training["ebm"]["completed_steps"] == 6
    assert_state_dicts_equal(full.state_dict(), resumed.state_dict())
    assert info.metrics["ebm"] == full_info.metrics["ebm"]


def test_vae_killed_between_its_last_state_and_checkpoint_keeps_its_metrics(
    tmp_path, data, ctx, monkeypatch
):
    """The last validation ELBO was lost: a resumed run started with no metrics."""
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    full_metrics = train_vae(vae_args(full_dir, data), ctx)
    kill_before_checkpoint_of_step(monkeypatch, train_vae_module, "vae", at_step=6)
    with pytest.raises(Killed):
        train_vae(vae_args(killed_dir, data), ctx)
    monkeypatch.undo()
    resumed_metrics = train_vae(vae_args(killed_dir, data, resume=True), ctx)
    assert resumed_metrics["val_elbo_bpd"] == full_metrics["val_elbo_bpd"]
    assert resumed_metrics["val_iwae_bpd"] == full_metrics["val_iwae_bpd"]
    assert_state_dicts_equal(
        load_checkpoint(full_dir)[0].state_dict(), load_checkpoint(killed_dir)[0].state_dict()
    )


def test_vae_killed_after_its_final_evaluation_publishes_what_it_measured(
    tmp_path, data, ctx, monkeypatch
):
    """The final save (after the IWAE evaluation) writes its state, then its checkpoint;
    killed between the two, the resumed run publishes that state's metrics."""
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    full_metrics = train_vae(vae_args(full_dir, data), ctx)
    real = train_vae_module.save_checkpoint

    def die_at_the_final_save(out, model, info):
        if "train_seconds" in info.metrics["vae"]:
            raise Killed
        real(out, model, info)

    monkeypatch.setattr(train_vae_module, "save_checkpoint", die_at_the_final_save)
    with pytest.raises(Killed):
        train_vae(vae_args(killed_dir, data), ctx)
    monkeypatch.undo()
    resumed = train_vae(vae_args(killed_dir, data, resume=True), ctx)
    assert resumed["val_iwae_bpd"] == full_metrics["val_iwae_bpd"]
    assert resumed["val_elbo_bpd"] == full_metrics["val_elbo_bpd"]
    assert "train_seconds" in load_checkpoint(killed_dir)[1].metrics["vae"]


def test_vae_run_on_for_more_steps_measures_its_final_metrics_again(
    tmp_path, data, ctx, monkeypatch
):
    """Resumed for more steps, a finished run carried its old final metrics along, and,
    killed in the new final evaluation, counted as finished with them."""
    out = tmp_path / "run"
    train_vae(vae_args(out, data), ctx)
    real = train_vae_module.evaluate_bpd

    def die_in_the_final_evaluation(vae, images, device, k=0):
        if k:
            raise Killed
        return real(vae, images, device, k)

    monkeypatch.setattr(train_vae_module, "evaluate_bpd", die_in_the_final_evaluation)
    with pytest.raises(Killed):
        train_vae(vae_args(out, data, steps=9, resume=True), ctx)
    monkeypatch.undo()
    assert "val_iwae_bpd" not in load_checkpoint(out)[1].metrics["vae"]  # step 9, in-loop
    resumed = train_vae(vae_args(out, data, steps=9, resume=True), ctx)
    reference = tmp_path / "reference"
    train_vae(vae_args(reference, data), ctx)
    expected = train_vae(vae_args(reference, data, steps=9, resume=True), ctx)
    assert resumed["val_iwae_bpd"] == expected["val_iwae_bpd"]


def test_a_flipped_byte_in_a_training_state_is_refused_and_nothing_is_written(
    tmp_path, data, caplog
):
    """torch.load checks no checksum: without one, a flipped byte in a tensor was resumed
    from silently, and the run overwrote the checkpoint."""
    out = tmp_path / "run"
    argv = ["train", "vae", "--out", str(out), "--data", data, *VAE_FLAGS, "--steps", "2"]
    assert main(argv) == 0
    path = out / "train_state_vae.pt"
    weight = load_state(path)["model"]["enc_in.weight"]
    raw = bytearray(path.read_bytes())
    at = bytes(raw).find(weight.numpy().tobytes())
    assert at > 0
    raw[at + 1] ^= 0x40
    path.write_bytes(raw)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    with pytest.raises(CheckpointError, match="does not match the checksum saved in it"):
        load_state(path)
    assert main([*argv[:-1], "4", "--resume"]) == 2
    assert f"{path} does not match the checksum" in caplog.text
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # A state saved before states carried a checksum still loads.
    torch.save({"step": 2, "model": {"w": weight}}, path)
    assert load_state(path)["step"] == 2


def test_resume_with_a_corrupt_config_is_refused_and_keeps_the_trained_energy(
    tmp_path, data, caplog
):
    """A corrupt config.json skipped the resume checks: `train all --resume` on a
    finished run then saved the VAE stage again, replacing the trained energy by the
    zero placeholder (exit 0), though the weights file still held it."""
    out = tmp_path / "all"
    argv = [
        "train", "all", "--out", str(out), "--data", data, *VAE_FLAGS, "--steps", "2",
        "--ebm-energy-hidden", "8", "--ebm-steps", "2", "--ebm-batch-size", "8",
        "--ebm-langevin-steps", "1", "--ebm-eval-images", "16",
    ]  # fmt: skip
    assert main(argv) == 0
    config = out / "config.json"
    config.write_bytes(config.read_bytes()[:200])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main([*argv, "--resume"]) == 2
    assert f"--resume: {config} is not valid JSON" in caplog.text
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_ctrl_c_after_resuming_names_the_checkpoint_it_resumed_from(
    tmp_path, data, monkeypatch, caplog
):
    out = tmp_path / "run"
    argv = ["train", "vae", "--out", str(out), "--data", data, *VAE_FLAGS, "--steps", "2"]
    assert main(argv) == 0

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_vae_module, "training_batch", interrupt)
    caplog.clear()
    assert main([*argv[:-1], "6", "--resume"]) == 130
    assert "nothing of it is saved" not in caplog.text
    assert "holds its checkpoint and training state of step 2" in caplog.text


def test_an_interrupted_run_closes_its_progress_bar_before_the_error(
    tmp_path, data, ctx, monkeypatch, capsys
):
    """Else the CLI's error line was appended to the unfinished bar."""
    real = train_vae_module.training_batch

    def interrupt_at_step_2(images, step, *rest):
        if step == 2:
            raise KeyboardInterrupt
        return real(images, step, *rest)

    monkeypatch.setattr(train_vae_module, "training_batch", interrupt_at_step_2)
    capsys.readouterr()
    try:
        train_vae(vae_args(tmp_path / "run", data), ctx)
    except KeyboardInterrupt:  # where the CLI logs its line, the run's frame still alive
        err = capsys.readouterr().err
    else:
        pytest.fail("not interrupted")
    assert "2/6" in err and err.endswith("\n")


def test_temp_files_left_by_a_kill_while_saving_are_removed(tmp_path, data, ctx):
    out = tmp_path / "run"
    train_vae(vae_args(out, data, steps=2), ctx)
    stale = [".config.json.a1b2c3.tmp", ".weights-0123.safetensors.x9y8.tmp"]
    stale += [".train_state_vae.pt.q7r6.tmp"]
    kept = [".calibration.json.k5l4.tmp", "notes.tmp"]  # not the training's own
    for name in stale + kept:
        (out / name).write_bytes(b"partial")
    train_vae(vae_args(out, data, steps=4, resume=True), ctx)
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == sorted(kept)


def test_a_damaged_score_cache_is_ignored_not_a_traceback(tmp_path):
    """A cut or corrupted .calibration_scores.npz raised BadZipFile, and every later
    `vaebm calibrate` failed on it until the hidden file was found and removed."""
    path = tmp_path / ".calibration_scores.npz"
    values = np.arange(8.0)
    scoring._save_cache(path, "key", {name: [values] for name in MODEL_SCORE_NAMES})
    assert len(scoring._load_cache(path, "key")["elbo_bpd"]) == 8
    raw = path.read_bytes()
    flipped = bytearray(raw)
    flipped[raw.find(values.tobytes()) + 3] ^= 0xFF
    for damaged in (raw[: len(raw) // 2], bytes(flipped), raw[:30]):
        path.write_bytes(damaged)
        assert scoring._load_cache(path, "key") == {}


def test_progress_bars_written_to_a_log_redraw_rarely(capsys):
    """Logged to a file, the bars' ten redraws a second buried the log's lines."""
    with progress_bar(total=3, desc="x") as bar:  # pytest's stderr is not a terminal
        assert bar.mininterval == 30.0 and bar.maxinterval == 30.0
        bar.update(3)
    with progress_bar(total=3, mininterval=0.5) as bar:  # a caller's choice stands
        assert bar.mininterval == 0.5
