"""Bad command-line input: every `vaebm` command refuses it with exit code 2 and one line
naming the flag (or file), before any work, and never with a traceback; Ctrl-C is 130.

Runs the CLI entry point in-process on tiny data and a tiny checkpoint (seconds).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

import training.train_ebm as train_ebm_module
import training.train_vae as train_vae_module
from model.calibration_file import CALIBRATION_NAME
from model.vaebm import VAEBM
from tests.test_training import VAE_FLAGS
from training.cli import main
from training.flags import FlagError
from training.runtime import (
    DistContext,
    DivergenceError,
    check_batches,
    check_finite_weights,
    check_gradients,
)

torch.set_num_threads(1)  # two background jobs share the 2 cores: threads only add contention
EBM_FLAGS = ["--energy-hidden", "8", "--batch-size", "8", "--langevin-steps", "1"]
EBM_FLAGS += ["--eval-images", "16", "--device", "cpu"]


def run_cli(argv: list, capsys, caplog) -> tuple[int, str]:
    """(exit code, everything printed or logged) of one `vaebm` command line."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse refuses a flag by exiting
        code = exc.code
    captured = capsys.readouterr()
    text = captured.out + captured.err + caplog.text
    assert "Traceback" not in text
    return code, text


def assert_refused(argv: list, expected: str, capsys, caplog) -> str:
    code, text = run_cli(argv, capsys, caplog)
    assert code == 2, text
    assert expected in text, text
    return text


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, data) -> Path:
    """A 2-step tiny VAE run (checkpoint and training state); copy it before changing it."""
    out = tmp_path_factory.mktemp("vae") / "run"
    assert (
        main(["train", "vae", "--out", str(out), "--data", data, *VAE_FLAGS, "--steps", "2"]) == 0
    )
    return out


def copy_of(directory: Path, tmp_path: Path) -> Path:
    copy = tmp_path / directory.name
    shutil.copytree(directory, copy)
    return copy


# ------------------------------------------------------- flags refused by argparse
CKPT = "{ckpt}"  # replaced by the tiny checkpoint's directory
FLAG_CASES = [
    (["calibrate", "--checkpoint", CKPT, "--data", "noise:8", "--iwae-k", "-3"], "--iwae-k"),
    (["calibrate", "--checkpoint", CKPT, "--data", "noise:8", "--n-boot", "0"], "--n-boot"),
    (["calibrate", "--data", "noise:8", "--device", "cuda:x"], "--device"),
    (["calibrate", "--data", "noise:8", "--device", "cuda:-1"], "--device"),
    (["calibrate", "--data", "noise:8", "--target-fpr", "nan"], "--target-fpr"),
    (["evaluate", "--checkpoint", CKPT, "--in", "noise:4", "--ood", "n=noise:4", "--iwae-k", "-3"],
     "--iwae-k"),
    (["evaluate", "--checkpoint", CKPT, "--in", "noise:4", "--ood", "n=noise:4", "--batch-size",
      "0"], "--batch-size"),
    (["sample", "--checkpoint", CKPT, "-n", "-3"], "-n"),
    (["sample", "--checkpoint", CKPT, "-n", "100000000", "--vae-only"], "-n"),
    (["sample", "--checkpoint", CKPT, "--step-size", "nan"], "--step-size"),
    (["sample", "--checkpoint", CKPT, "--step-size", "inf"], "--step-size"),
    (["sample", "--checkpoint", CKPT, "--step-size", "1e300"], "--step-size"),
    (["sample", "--checkpoint", CKPT, "--step-size", "1.5"], "--step-size"),
    (["sample", "--checkpoint", CKPT, "--seed", "-1"], "--seed"),
    (["train", "vae", "--energy-hidden", "-2"], "--energy-hidden"),
    (["train", "vae", "--energy-hidden", "0"], "--energy-hidden"),
    (["train", "vae", "--batch-size", "0"], "--batch-size"),
    (["train", "vae", "--batch-size", "-5"], "--batch-size"),
    (["train", "vae", "--eval-every", "0"], "--eval-every"),
    (["train", "vae", "--checkpoint-every", "0"], "--checkpoint-every"),
    (["train", "vae", "--hidden", "0"], "--hidden"),
    (["train", "vae", "--latent-channels", "4", "0"], "--latent-channels"),
    (["train", "vae", "--eval-images", "0"], "--eval-images"),
    (["train", "vae", "--steps", "0"], "--steps"),
    (["train", "vae", "--steps", "-1"], "--steps"),
    (["train", "vae", "--iwae-k", "-1"], "--iwae-k"),
    (["train", "vae", "--grad-clip", "nan"], "--grad-clip"),
    (["train", "vae", "--val-fraction", "1"], "--val-fraction"),
    (["train", "vae", "--seed", "-1"], "--seed"),
    (["train", "vae", "--device", "cuda:x"], "--device"),
    (["train", "ebm", "--buffer-size", "-4"], "--buffer-size"),
    (["train", "ebm", "--buffer-reuse", "5"], "--buffer-reuse"),
    (["train", "ebm", "--eval-images", "0"], "--eval-images"),
    (["train", "ebm", "--step-size", "nan"], "--step-size"),
    (["train", "ebm", "--grad-clip", "nan"], "--grad-clip"),
    (["train", "ebm", "--alpha-s", "nan"], "--alpha-s"),
    (["train", "ebm", "--max-abs-energy", "nan"], "--max-abs-energy"),
    (["train", "ebm", "--energy-head", "mean"], "--energy-head"),
    (["train", "all", "--ebm-buffer-reuse", "5"], "--ebm-buffer-reuse"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "flag"), FLAG_CASES)
def test_a_bad_flag_is_refused_in_one_line_naming_it(
    argv, flag, tiny_checkpoint, tmp_path, monkeypatch, capsys, caplog
):
    monkeypatch.chdir(tmp_path)  # the defaults' output directories would land here
    argv = [tiny_checkpoint if a == CKPT else a for a in argv]
    text = assert_refused(argv, f"argument {flag}", capsys, caplog)
    assert len(text.strip().splitlines()) == 1
    assert "must be" in text or "required" in text  # says what is allowed
    assert list(tmp_path.iterdir()) == []  # refused before any work


def test_calibrate_needs_data(tiny_checkpoint, capsys, caplog):
    """No default data set: the old one (MNIST digits) overwrote the calibration of the
    Fashion-MNIST checkpoint with thresholds of the wrong images."""
    before = (tiny_checkpoint / CALIBRATION_NAME).read_bytes()
    argv = ["calibrate", "--checkpoint", tiny_checkpoint]
    assert_refused(argv, "the following arguments are required: --data", capsys, caplog)
    assert (tiny_checkpoint / CALIBRATION_NAME).read_bytes() == before


def test_calibrate_needs_a_checkpoint(capsys, caplog):
    """No default checkpoint: the old one, the shipped model, had its calibration
    overwritten by a `vaebm calibrate` that forgot --checkpoint."""
    argv = ["calibrate", "--data", "noise:8"]
    assert_refused(argv, "the following arguments are required: --checkpoint", capsys, caplog)


# ------------------------------------------------- checks across flags and files
def test_train_all_checks_the_ebm_flags_before_its_vae_stage(tmp_path, data, capsys, caplog):
    out = tmp_path / "all"
    argv = ["train", "all", "--out", out, "--data", data, *VAE_FLAGS, "--steps", "2"]
    text = assert_refused(
        [*argv, "--ebm-steps", "5", "--ebm-lr-decay-from", "10"],
        "--ebm-lr-decay-from",
        capsys,
        caplog,
    )
    assert "--ebm-steps 5" in text
    assert not out.exists()


def test_train_vae_with_too_few_images_for_validation_is_refused(tmp_path, data, capsys, caplog):
    argv = ["train", "vae", "--out", tmp_path / "v", "--data", f"{data}@0:1", *VAE_FLAGS]
    assert_refused([*argv, "--val-fraction", "0.05"], "--val-fraction 0", capsys, caplog)
    assert not (tmp_path / "v").exists()


def test_train_vae_without_validation_images_skips_the_validation_metrics(tmp_path, data):
    """--val-fraction 0 is allowed ([0, 1)), so it must work; stage 2 follows it."""
    out = tmp_path / "v"
    argv = ["train", "vae", "--out", out, "--data", data, *VAE_FLAGS, "--val-fraction", "0"]
    assert main([str(a) for a in [*argv, "--steps", "2"]]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "val_iwae_bpd" not in config["metrics"]["vae"]
    assert main(["train", "ebm", "--checkpoint", str(out), *EBM_FLAGS, "--steps", "1"]) == 0
    assert json.loads((out / "config.json").read_text())["metrics"]["ebm"] == {}


@pytest.mark.parametrize("kind", ["file", "file-parent"])
def test_an_out_that_cannot_be_a_directory_is_refused(tmp_path, data, kind, capsys, caplog):
    blocker = tmp_path / "t.sh"
    blocker.write_text("#!/bin/sh\n")
    out = blocker if kind == "file" else blocker / "run"
    argv = ["train", "vae", "--out", out, "--data", data, *VAE_FLAGS]
    assert_refused(argv, "is a file, not a directory", capsys, caplog)


def test_a_read_only_out_is_refused_before_training(tmp_path, data, monkeypatch, capsys, caplog):
    def read_only(*args, **kwargs):  # what a read-only mount answers (root included)
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    out = tmp_path / "ro"
    argv = ["train", "vae", "--out", out, "--data", data, *VAE_FLAGS]
    assert_refused(argv, f"--out {out}: {tmp_path} is not writable (Read-only", capsys, caplog)


def test_resume_without_a_training_state_is_refused(tmp_path, data, capsys, caplog):
    argv = ["train", "vae", "--out", tmp_path, "--data", data, *VAE_FLAGS, "--resume"]
    assert_refused(argv, "no training state train_state_vae.pt", capsys, caplog)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_resume_from_a_damaged_state_names_the_file(
    damage, vae_run, data, tmp_path, capsys, caplog
):
    out = copy_of(vae_run, tmp_path)
    state = out / "train_state_vae.pt"
    content = state.read_bytes()
    state.write_bytes({"truncated": content[:-200], "empty": b"", "garbage": b"x" * 99}[damage])
    argv = ["train", "vae", "--out", out, "--data", data, *VAE_FLAGS, "--steps", "4", "--resume"]
    text = assert_refused(argv, f"{state} cannot be read as a training state", capsys, caplog)
    assert "truncated or corrupt" in text


def test_resume_with_another_architecture_names_the_flags(vae_run, data, tmp_path, capsys, caplog):
    out = copy_of(vae_run, tmp_path)
    argv = ["train", "vae", "--out", out, "--data", data, *VAE_FLAGS, "--steps", "4", "--resume"]
    text = assert_refused([*argv, "--hidden", "16"], "--hidden 16 (saved run: 8)", capsys, caplog)
    assert "--latent-channels" not in text  # only what differs


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--seed", "1", "--seed 1 (saved run: 0)"),
        ("--val-fraction", "0.5", "--val-fraction 0.5 (saved run: 0.25)"),
        ("--data", "noise:64", "--data noise:64 (saved run:"),
    ],
)
def test_resume_with_another_split_names_the_flag(
    flag, value, expected, vae_run, data, tmp_path, capsys, caplog
):
    """The seed, data and validation share decide the split: changed on resuming,
    validation images would move into training."""
    out = copy_of(vae_run, tmp_path)
    argv = ["train", "vae", "--out", out, "--data", data, *VAE_FLAGS, "--steps", "4", "--resume"]
    assert_refused([*argv, flag, value], expected, capsys, caplog)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "all", "--ebm-data", "{missing}"], "argument --ebm-data: {missing} does not"),
        (["train", "all", "--ebm-data", "noise:x"], "argument --ebm-data: noise:x"),
        (["train", "vae", "--data", "{missing}@0:5"], "argument --data: {missing}"),
        (["calibrate", "--data", "noise:99999999999"], "from 1 to 1,000,000"),
        (["calibrate", "--data", "constant:99999999999@0:5"], "argument --data: constant:"),
        (["evaluate", "--checkpoint", "c", "--in", "noise:0", "--ood", "n=noise:2"], "--in"),
        (["evaluate", "--checkpoint", "c", "--in", "noise:4", "--ood", "n={missing}"],
         "--ood n: {missing} does not exist"),
    ],
)  # fmt: skip
def test_a_data_spec_that_cannot_load_is_refused_before_any_work(
    argv, expected, tmp_path, monkeypatch, capsys, caplog
):
    monkeypatch.chdir(tmp_path)
    names = {"missing": tmp_path / "nonexist.npz"}
    argv = [a.format(**names) for a in argv]
    text = assert_refused(argv, expected.format(**names), capsys, caplog)
    assert len(text.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_resume_of_an_ebm_state_of_another_architecture_names_the_file(
    vae_run, tmp_path, capsys, caplog
):
    """Without the saved settings (config.json lost), the state itself is compared."""
    out = copy_of(vae_run, tmp_path)
    argv = ["train", "ebm", "--checkpoint", out, *EBM_FLAGS, "--steps", "1"]
    assert run_cli(argv, capsys, caplog)[0] == 0
    config = json.loads((out / "config.json").read_text())
    del config["training"]["ebm"]
    (out / "config.json").write_text(json.dumps(config))
    argv = ["train", "ebm", "--checkpoint", out, *EBM_FLAGS, "--energy-hidden", "4"]
    text = assert_refused(
        [*argv, "--steps", "2", "--resume"], "holds another architecture", capsys, caplog
    )
    assert "train_state_ebm.pt" in text


def test_train_all_resume_after_a_finished_vae_stage_starts_the_ebm(vae_run, data, tmp_path):
    out = copy_of(vae_run, tmp_path)
    argv = ["train", "all", "--out", out, "--data", data, *VAE_FLAGS, "--steps", "2"]
    argv += ["--ebm-energy-hidden", "8", "--ebm-steps", "1", "--ebm-batch-size", "8"]
    argv += ["--ebm-langevin-steps", "1", "--ebm-eval-images", "16", "--resume"]
    assert main([str(a) for a in argv]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["ebm"]["completed_steps"] == 1


@pytest.mark.parametrize(
    ("module", "stage", "at_save", "expected"),
    [
        (train_vae_module, "VAE", True, "of step 2; run the same command with --resume"),
        (train_vae_module, "VAE", False, "nothing of it is saved"),
        (train_ebm_module, "EBM", True, "of step 1; run the same command with --resume"),
    ],
)
def test_ctrl_c_during_training_is_one_line_and_exit_130(
    module, stage, at_save, expected, vae_run, data, tmp_path, monkeypatch, capsys, caplog
):
    def interrupt(*args):
        if at_save:
            real_save(*args)
        raise KeyboardInterrupt

    real_save = module._save
    monkeypatch.setattr(module, "_save" if at_save else "training_batch", interrupt)
    if module is train_vae_module:
        argv = ["train", "vae", "--out", tmp_path / "v", "--data", data, *VAE_FLAGS]
        argv += ["--steps", "4", "--checkpoint-every", "2"]
    else:
        argv = ["train", "ebm", "--checkpoint", vae_run, "--out", tmp_path / "e", *EBM_FLAGS]
        argv += ["--steps", "2", "--checkpoint-every", "1"]
    code, text = run_cli(argv, capsys, caplog)
    assert code == 130
    assert f"interrupted in the {stage} stage" in text and expected in text


def test_ctrl_c_in_the_ebm_stage_of_train_all_keeps_the_finished_vae(
    vae_run, data, tmp_path, monkeypatch, capsys, caplog
):
    """Rerunning without --resume would train the VAE again over the finished one."""

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_ebm_module, "training_batch", interrupt)
    out = tmp_path / "all"
    argv = ["train", "all", "--out", out, "--data", data, *VAE_FLAGS, "--steps", "2"]
    argv += ["--ebm-energy-hidden", "8", "--ebm-steps", "1", "--ebm-batch-size", "8"]
    argv += ["--ebm-langevin-steps", "1", "--ebm-eval-images", "16"]
    code, text = run_cli(argv, capsys, caplog)
    assert code == 130
    assert "the finished VAE stage is saved" in text and "with --resume" in text


def test_an_older_run_in_the_folder_is_not_reported_as_saved(
    vae_run, data, tmp_path, monkeypatch, capsys, caplog
):
    def interrupt(*args):
        raise KeyboardInterrupt

    out = copy_of(vae_run, tmp_path)  # holds a finished 2-step VAE run
    monkeypatch.setattr(train_vae_module, "training_batch", interrupt)
    argv = ["train", "vae", "--out", out, "--data", data, *VAE_FLAGS, "--steps", "4", "--overwrite"]
    code, text = run_cli(argv, capsys, caplog)
    assert code == 130 and "nothing of it is saved" in text


def test_ctrl_c_after_overwrite_advises_resume_in_its_place(
    vae_run, data, tmp_path, monkeypatch, capsys, caplog
):
    """ "Run the same command with --resume" kept --overwrite, which --resume refuses."""
    real = train_vae_module.training_batch

    def interrupt_at_step_3(images, step, *rest):
        if step == 3:
            raise KeyboardInterrupt
        return real(images, step, *rest)

    out = copy_of(vae_run, tmp_path)
    monkeypatch.setattr(train_vae_module, "training_batch", interrupt_at_step_3)
    argv = ["train", "vae", "--out", out, "--data", data, *VAE_FLAGS, "--steps", "4"]
    code, text = run_cli([*argv, "--checkpoint-every", "1", "--overwrite"], capsys, caplog)
    assert code == 130
    assert "of step 3; run the same command with --resume in place of --overwrite" in text


def test_resume_may_change_a_non_zero_ema_decay_but_not_turn_it_off(
    vae_run, tmp_path, capsys, caplog
):
    out = copy_of(vae_run, tmp_path)
    argv = ["train", "ebm", "--checkpoint", out, *EBM_FLAGS, "--ema-decay", "0.9"]
    assert run_cli([*argv, "--steps", "1"], capsys, caplog)[0] == 0
    resumed = [*argv[:-1], "0.99", "--steps", "2", "--resume"]
    assert run_cli(resumed, capsys, caplog)[0] == 0
    off = [*argv[:-1], "0", "--steps", "3", "--resume"]
    assert_refused(off, "--ema-decay 0 does not fit the saved run", capsys, caplog)


def test_ood_names_cannot_leave_the_output_directory(tiny_checkpoint, tmp_path, capsys, caplog):
    out = tmp_path / "deep" / "ev14"
    argv = ["evaluate", "--checkpoint", tiny_checkpoint, "--in", "noise:4", "--out", out]
    assert_refused([*argv, "--ood", "x/../../esc=constant:3"], "--ood name", capsys, caplog)
    assert_refused([*argv, "--ood", ".hidden=constant:3"], "--ood name", capsys, caplog)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "expected"),
    [("in-distribution", "reserved for the --in set"), ("\u00fc", "ASCII letters")],
)
def test_ood_names_that_are_reserved_or_not_ascii_are_refused(
    name, expected, tiny_checkpoint, tmp_path, capsys, caplog
):
    out = tmp_path / "ev"
    argv = ["evaluate", "--checkpoint", tiny_checkpoint, "--in", "noise:4", "--out", out]
    assert_refused([*argv, "--ood", f"{name}=noise:7"], expected, capsys, caplog)
    assert not out.exists()


def test_evaluate_help_names_the_reserved_name_and_the_required_flags(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "'in-distribution'" in text
    assert text.count("(required)") >= 3  # --checkpoint, --in, --ood


@pytest.mark.parametrize("damage", ["other-weights", "truncated"])
def test_evaluate_refuses_an_unusable_calibration_unless_told_to_ignore_it(
    damage, tiny_checkpoint, tmp_path, capsys, caplog
):
    checkpoint = copy_of(tiny_checkpoint, tmp_path)
    path = checkpoint / CALIBRATION_NAME
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:
        path.write_text(
            path.read_text().replace(json.loads(path.read_text())["weights_sha256"], "0" * 64)
        )
    argv = ["evaluate", "--checkpoint", checkpoint, "--in", "noise:4", "--ood", "c=constant:3"]
    argv += ["--out", tmp_path / "ev", "--iwae-k", "1"]
    assert_refused(argv, "--ignore-calibration", capsys, caplog)
    assert run_cli([*argv, "--ignore-calibration"], capsys, caplog)[0] == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["thresholds"] == {}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["sample", "--checkpoint", "{file}"], "{file} is a file, not a directory"),
        (["sample", "--checkpoint", "{ckpt}", "--out", "{dir}"], "--out {dir} is a directory"),
        (["calibrate", "--checkpoint", "{file}", "--data", "noise:8"], "is a file"),
    ],
)
def test_paths_of_the_wrong_kind_are_named(
    argv, expected, tiny_checkpoint, tmp_path, capsys, caplog
):
    names = {"file": tmp_path / "t.sh", "dir": tmp_path, "ckpt": tiny_checkpoint}
    names["file"].write_text("#!/bin/sh\n")
    argv = [a.format(**names) for a in argv]
    assert_refused(argv, expected.format(**names), capsys, caplog)


@pytest.mark.parametrize(
    ("command", "blocked"),
    [
        ("calibrate", "calibration_histograms.png"),
        ("calibrate", "calibration_report.md"),
        ("calibrate", "calibration.json"),
        ("evaluate", "roc-n.png"),
        ("evaluate", "metrics.json"),
    ],
)
def test_an_output_file_that_is_a_directory_is_refused_before_scoring(
    command, blocked, tiny_checkpoint, tmp_path, capsys, caplog
):
    checkpoint = copy_of(tiny_checkpoint, tmp_path)
    out = checkpoint if command == "calibrate" else tmp_path / "ev"
    target = out / blocked
    if target.is_file():
        target.unlink()
    target.mkdir(parents=True)
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()}
    argv = [command, "--checkpoint", checkpoint, "--device", "cpu", "--iwae-k", "1"]
    if command == "calibrate":
        argv += ["--data", "noise:40", "--target-fpr", "0.5"]
    else:
        argv += ["--in", "noise:4", "--ood", "n=noise:4", "--out", out]
    assert_refused(argv, f"{target} is a directory", capsys, caplog)
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()} == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no scores: none computed


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (["--steps", "3"], "leave out --steps"),
        (["--step-size", "0.1"], "leave out --step-size"),
        (["--steps", "0", "--step-size", "0"], "leave out --steps and --step-size"),
    ],
)
def test_sample_vae_only_refuses_langevin_settings(
    given, expected, tiny_checkpoint, tmp_path, capsys, caplog
):
    argv = ["sample", "--checkpoint", tiny_checkpoint, "--vae-only", "--out", tmp_path / "s.png"]
    assert_refused([*argv, *given], expected, capsys, caplog)
    assert list(tmp_path.iterdir()) == []


def test_too_many_latent_groups_name_the_flag(tmp_path, capsys, caplog):
    argv = ["train", "vae", "--out", tmp_path / "r", "--latent-channels", "4", "4", "4"]
    assert_refused(argv, "--latent-channels takes 1 or 2 values", capsys, caplog)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "prog"),
    [
        (["train", "vae", "--ebm-steps", "2"], "vaebm train vae"),
        (["sample", "--checkpoint", "c", "--bogus"], "vaebm sample"),
    ],
)
def test_an_unknown_flag_points_at_the_subcommand_help(argv, prog, tmp_path, capsys, caplog):
    text = assert_refused(
        [*argv, "--out", tmp_path / "r"], f"{prog}: error: unrecog", capsys, caplog
    )
    assert f"(see `{prog} --help`)" in text


def test_a_verbose_flag_after_the_command_says_where_it_goes(tmp_path, capsys, caplog):
    argv = ["sample", "-v", "--checkpoint", "c", "--out", tmp_path / "s.png"]
    text = assert_refused(argv, "unrecognized arguments: -v", capsys, caplog)
    assert "-v goes before the command" in text


@pytest.mark.parametrize(
    ("command", "advice"), [("sample", "to start over"), ("calibrate", "to resume")]
)
def test_ctrl_c_advice_fits_the_command(
    command, advice, tiny_checkpoint, tmp_path, monkeypatch, capsys, caplog
):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(VAEBM, "sample", interrupt)
    monkeypatch.setattr("training.calibrate.score_dataset", interrupt)
    argv = {
        "sample": ["sample", "--out", tmp_path / "s.png"],
        "calibrate": ["calibrate", "--data", "noise:40", "--target-fpr", "0.5"],
    }[command]
    checkpoint = copy_of(tiny_checkpoint, tmp_path)
    code, text = run_cli([*argv, "--checkpoint", checkpoint, "--device", "cpu"], capsys, caplog)
    assert code == 130
    assert advice in text and ("resume" in text) == (command == "calibrate")


@pytest.mark.parametrize("where", ["config", "new", "link"])
def test_sample_out_inside_the_checkpoint_is_refused(
    where, tiny_checkpoint, tmp_path, capsys, caplog
):
    checkpoint = copy_of(tiny_checkpoint, tmp_path)
    before = (checkpoint / "config.json").read_bytes()
    out = {"config": checkpoint / "config.json", "new": checkpoint / "s.png"}.get(where)
    if where == "link":
        (tmp_path / "alias").symlink_to(checkpoint)
        out = tmp_path / "alias" / "config.json"
    argv = ["sample", "--checkpoint", checkpoint, "-n", "2", "--vae-only", "--out", out]
    assert_refused([*argv, "--device", "cpu"], "is inside --checkpoint", capsys, caplog)
    assert (checkpoint / "config.json").read_bytes() == before
    assert not (checkpoint / "s.png").exists()


@pytest.mark.parametrize(("given", "expected"), [(None, 1e-4), ("0", 0.0), ("0.01", 0.01)])
def test_sample_honours_a_step_size_of_zero(
    given, expected, tiny_checkpoint, tmp_path, monkeypatch
):
    """0 leaves the chains where they start; only no --step-size means the trained one
    (the tiny checkpoint records none, so the default 1e-4)."""
    seen = []
    real_sample = VAEBM.sample

    def spy(self, n, **kwargs):
        seen.append(kwargs["step_size"])
        return real_sample(self, n, **kwargs)

    monkeypatch.setattr(VAEBM, "sample", spy)
    argv = ["sample", "--checkpoint", str(tiny_checkpoint), "-n", "2", "--steps", "1"]
    argv += ["--out", str(tmp_path / "s.png"), "--device", "cpu"]
    assert main(argv + (["--step-size", given] if given else [])) == 0
    assert seen == [expected]


def test_a_wrongly_typed_config_section_is_one_line(tiny_checkpoint, tmp_path, capsys, caplog):
    checkpoint = copy_of(tiny_checkpoint, tmp_path)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "training": "x"}))
    argv = ["sample", "--checkpoint", checkpoint, "--out", tmp_path / "s.png"]
    assert_refused(argv, "training must be a JSON object, got 'x'", capsys, caplog)


def test_verbose_before_serve_reaches_the_service(monkeypatch):
    """`vaebm -v serve ...` hands the service its own flags and a debug log level."""
    import service.main

    seen = []
    monkeypatch.setenv("VAEBM_LOG_LEVEL", "INFO")  # restored afterwards
    monkeypatch.setattr(service.main, "serve", lambda argv: seen.append(argv) or 7)
    assert main(["-v", "serve", "--checkpoint", "x", "--port", "0"]) == 7
    assert seen == [["--checkpoint", "x", "--port", "0"]]
    assert os.environ["VAEBM_LOG_LEVEL"] == "DEBUG"


def test_train_all_help_cross_references_its_own_flags(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "2000")  # no line wrapping inside a flag
    with pytest.raises(SystemExit):
        main(["train", "all", "--help"])
    text = capsys.readouterr().out
    assert "falls linearly to 0 at --ebm-steps" in text
    assert "ramps from 0 to --ebm-buffer-reuse" in text
    assert "between this and --ebm-corruption-blur-max" in text
    assert "to 0 at --steps" not in text and "to --buffer-reuse" not in text


# ------------------------------------------------------------ the guards behind
def test_non_finite_weights_stop_training_before_they_are_saved():
    net = torch.nn.Linear(2, 1)
    check_finite_weights(3, net)
    with torch.no_grad():
        net.weight[0, 0] = float("nan")
    with pytest.raises(DivergenceError, match="step 3: non-finite weights in weight"):
        check_finite_weights(3, net)


def test_a_nan_gradient_stops_training_before_the_update():
    check_gradients(5, torch.tensor(float("inf")))  # clipping scales finite gradients to 0
    with pytest.raises(DivergenceError, match="step 5: the gradient norm is NaN"):
        check_gradients(5, torch.tensor(float("nan")))


def test_batches_smaller_than_the_processes_are_refused():
    four = DistContext(0, 4, torch.device("cpu"))
    check_batches(10, 4, four)
    with pytest.raises(FlagError, match="--ebm-batch-size 2 with 10 training images"):
        check_batches(10, 2, four, prefix="ebm_")


# ------------------------------------------------ a fresh run over a saved one
def file_digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


def test_a_fresh_run_into_a_folder_holding_a_run_is_refused_until_overwrite(
    vae_run, data, tmp_path, capsys, caplog
):
    """Starting afresh replaced a finished run without a word."""
    caplog.set_level(logging.INFO, logger="vaebm")  # the closing line says what is next
    out = copy_of(vae_run, tmp_path)
    before = file_digests(out)
    argv = ["train", "vae", "--out", out, "--data", data, *VAE_FLAGS, "--steps", "2"]
    text = assert_refused(argv, "already holds a training state", capsys, caplog)
    assert "--resume" in text and "--overwrite" in text
    assert file_digests(out) == before
    code, text = run_cli([*argv, "--overwrite"], capsys, caplog)
    assert code == 0 and f"next: `vaebm train ebm --checkpoint {out}`" in text
    assert_refused([*argv, "--overwrite", "--resume"], "pass one of them", capsys, caplog)


def test_a_fresh_energy_over_a_trained_one_is_refused_until_overwrite(
    vae_run, tmp_path, capsys, caplog
):
    """`train ebm --checkpoint CK` writes into CK: over a trained energy (a shipped
    checkpoint, say) it replaced that energy without a word."""
    caplog.set_level(logging.INFO, logger="vaebm")  # the closing line says what is next
    out = copy_of(vae_run, tmp_path)
    argv = ["train", "ebm", "--checkpoint", out, *EBM_FLAGS, "--steps", "1"]
    code, text = run_cli(argv, capsys, caplog)  # a VAE alone: nothing to replace
    assert code == 0 and f"next: `vaebm calibrate --checkpoint {out} --data" in text
    (out / "train_state_ebm.pt").unlink()  # as a published checkpoint ships: no state
    before = file_digests(out)
    text = assert_refused(argv, "a checkpoint with a trained energy", capsys, caplog)
    assert "--checkpoint" in text
    assert file_digests(out) == before
    assert run_cli([*argv, "--overwrite"], capsys, caplog)[0] == 0


def test_an_energy_is_not_resumed_against_another_vae(vae_run, data, tmp_path, capsys, caplog):
    """Retraining the VAE in a folder left the energy's training state there, and
    --resume went on training that energy against the new VAE."""
    out = copy_of(vae_run, tmp_path)
    ebm = ["train", "ebm", "--checkpoint", out, *EBM_FLAGS]
    assert run_cli([*ebm, "--steps", "1"], capsys, caplog)[0] == 0
    energy_state = (out / "train_state_ebm.pt").read_bytes()
    vae = ["train", "vae", "--data", data, *VAE_FLAGS, "--steps", "2", "--seed", "1"]
    # A VAE retrained in the folder removes the energy's state, which no longer fits it,
    assert run_cli([*vae, "--out", out, "--overwrite"], capsys, caplog)[0] == 0
    assert not (out / "train_state_ebm.pt").exists()
    # and a state put back beside another VAE is refused.
    (out / "train_state_ebm.pt").write_bytes(energy_state)
    assert_refused([*ebm, "--steps", "2", "--resume"], "against another VAE", capsys, caplog)


def test_an_energy_into_another_models_folder_is_refused_until_overwrite(
    vae_run, tmp_path, capsys, caplog
):
    """`train ebm --checkpoint A --out B`, B holding a VAE of its own: B's VAE was
    replaced by A's without a word."""
    other = tmp_path / "other"
    shutil.copytree(vae_run, other)
    before = file_digests(other)
    argv = ["train", "ebm", "--checkpoint", vae_run, "--out", other, *EBM_FLAGS, "--steps", "1"]
    assert_refused(argv, f"--out {other} already holds a checkpoint", capsys, caplog)
    assert file_digests(other) == before
    assert run_cli([*argv, "--overwrite"], capsys, caplog)[0] == 0


def test_ctrl_c_while_the_commands_load_is_one_line(monkeypatch, capsys, caplog):
    """Ctrl-C while the parser imported the commands' modules (a second or so) was
    Python's traceback."""
    import training.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    code, text = run_cli(["train", "vae", "--steps", "1"], capsys, caplog)
    assert code == 130 and text.strip() == (
        "vaebm: interrupted before the command started; nothing was done"
    )
