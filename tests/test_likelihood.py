"""Tests for model.likelihood: the discretised Gaussian over 256 levels and bits/dim."""

from __future__ import annotations

import math

import pytest
import torch

from model.likelihood import (
    HALF_BIN,
    discretized_gaussian_log_prob,
    nats_to_bits_per_dim,
    to_uint8,
    to_unit_range,
)

torch.set_num_threads(1)  # two background jobs share the 2 cores: threads only add contention

LEVELS = torch.arange(256, dtype=torch.float64) * (2.0 / 255.0) - 1.0  # the 256 pixel values


def phi(z: float) -> float:
    """Standard normal CDF by hand."""
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def log_prob_of(level: int, mean: float, scale: float, dtype=torch.float64) -> float:
    x = LEVELS[level].to(dtype).view(1, 1, 1, 1)
    m = torch.full_like(x, mean)
    log_s = torch.full_like(x, math.log(scale))
    return float(discretized_gaussian_log_prob(x, m, log_s))


def all_level_log_probs(mean: float, scale: float, dtype=torch.float64) -> torch.Tensor:
    x = LEVELS.to(dtype).view(1, 1, 16, 16)
    return discretized_gaussian_log_prob(
        x, torch.full_like(x, mean), torch.full_like(x, math.log(scale))
    ).flatten()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "mean, scale",
    [(0.0, 1.0), (0.3, 0.05), (-0.97, 0.01), (0.999, 0.2), (1.5, 0.3), (-0.2, 3.0), (0.1, 1e-3)],
)
def test_probabilities_over_the_256_levels_sum_to_one(mean, scale, dtype):
    log_p = all_level_log_probs(mean, scale, dtype)
    assert log_p.shape == (256,)
    assert torch.isfinite(log_p).all()
    assert (log_p <= 0).all()
    total = float(log_p.double().exp().sum())
    assert total == pytest.approx(1.0, abs=1e-4 if dtype == torch.float32 else 1e-9)


@pytest.mark.parametrize(
    "level, mean, scale",
    [(100, 0.0, 0.1), (128, 0.0, 0.5), (17, -0.8, 0.03), (200, 0.62, 0.02), (255, 0.2, 0.5)],
)
def test_log_prob_matches_erf_by_hand(level, mean, scale):
    x = -1.0 + 2.0 * level / 255.0
    upper = 1.0 if level == 255 else phi((x + 1 / 255 - mean) / scale)
    lower = 0.0 if level == 0 else phi((x - 1 / 255 - mean) / scale)
    expected = math.log(upper - lower)
    assert log_prob_of(level, mean, scale) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert log_prob_of(level, mean, scale, torch.float32) == pytest.approx(expected, rel=1e-4)


def test_edge_bins_extend_to_infinity():
    # Level 0 owns (-inf, -1 + 1/255]: with the mean far below -1 it takes ~all the mass.
    assert log_prob_of(0, -3.0, 0.1) == pytest.approx(0.0, abs=1e-9)
    assert log_prob_of(255, 3.0, 0.1) == pytest.approx(0.0, abs=1e-9)
    # P(level 0 | mean=-1, scale) = Phi(HALF_BIN / scale) exactly.
    assert log_prob_of(0, -1.0, 0.02) == pytest.approx(math.log(phi(HALF_BIN / 0.02)), rel=1e-9)
    assert log_prob_of(255, 1.0, 0.02) == pytest.approx(math.log(phi(HALF_BIN / 0.02)), rel=1e-9)


def test_far_tail_is_accurate_not_minus_infinity():
    # 10 to 40 standard deviations out: naive Phi(b) - Phi(a) underflows or cancels.
    for level, mean, scale in [(10, 0.0, 0.1), (0, 0.5, 0.04), (250, -0.6, 0.05)]:
        x = -1.0 + 2.0 * level / 255.0
        # Exact by hand in the lower tail with erfc (no cancellation): Phi(z) = erfc(-z/√2)/2.
        a, b = (x - HALF_BIN - mean) / scale, (x + HALF_BIN - mean) / scale
        if level == 0:
            exact = math.log(0.5 * math.erfc(-b / math.sqrt(2)))
        elif (a + b) > 0:  # above the mean: mirror into the lower tail
            exact = math.log(0.5 * math.erfc(a / math.sqrt(2)) - 0.5 * math.erfc(b / math.sqrt(2)))
        else:
            exact = math.log(
                0.5 * math.erfc(-b / math.sqrt(2)) - 0.5 * math.erfc(-a / math.sqrt(2))
            )
        got = log_prob_of(level, mean, scale)
        assert math.isfinite(got) and got < -40
        assert got == pytest.approx(exact, rel=1e-6)


def test_tiny_scale_centred_on_a_level_gives_zero_nats():
    # The bin is +-1/255 = +-39 standard deviations wide: probability 1, log-prob 0.
    for level in (0, 1, 77, 128, 254, 255):
        assert log_prob_of(level, float(LEVELS[level]), 1e-4) == pytest.approx(0.0, abs=1e-9)
        # ... and a neighbouring level gets essentially nothing.
        other = level - 1 if level else 1
        assert log_prob_of(other, float(LEVELS[level]), 1e-4) < -700  # log Phi(-39) ~ -773


def test_mass_is_shared_between_two_levels_when_mean_sits_on_their_boundary():
    boundary = float(LEVELS[100]) + HALF_BIN
    assert log_prob_of(100, boundary, 1e-4) == pytest.approx(math.log(0.5), abs=1e-9)
    assert log_prob_of(101, boundary, 1e-4) == pytest.approx(math.log(0.5), abs=1e-9)


def test_wide_gaussian_gives_about_one_bin_width_times_density():
    # Scale >> bin: P(level) ~ (2/255) * pdf(x); at x = mean, pdf = 1 / (s sqrt(2 pi)).
    s = 0.5
    expected = math.log((2 / 255) / (s * math.sqrt(2 * math.pi)))
    assert log_prob_of(128, float(LEVELS[128]), s) == pytest.approx(expected, abs=1e-4)


def test_gradients_are_finite_everywhere():
    x = LEVELS.float().view(1, 1, 16, 16)
    mean = torch.zeros_like(x).uniform_(-2, 2).requires_grad_(True)
    log_s = torch.full_like(x, math.log(0.01)).requires_grad_(True)
    discretized_gaussian_log_prob(x, mean, log_s).sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(log_s.grad).all()


def test_nats_to_bits_per_dim_by_hand():
    d = 784
    nats = torch.tensor([d * math.log(2.0), 0.0, 3 * d * math.log(2.0), 1000.0])
    bpd = nats_to_bits_per_dim(nats, d)
    assert torch.allclose(bpd, torch.tensor([1.0, 0.0, 3.0, 1000.0 / (784 * math.log(2.0))]))
    # Uniform over the 256 levels: 8 bits per dimension, whatever D.
    assert float(nats_to_bits_per_dim(torch.tensor(3 * 32 * 32 * math.log(256.0)), 3072)) == (
        pytest.approx(8.0)
    )


def test_bits_per_dim_of_an_image_by_hand():
    # Every pixel of a 1x28x28 image with P = 1/2 (mean on the bin edge): exactly 1 bit/dim.
    x = torch.full((1, 1, 28, 28), float(LEVELS[40]), dtype=torch.float64)
    mean = x + HALF_BIN
    nats = -discretized_gaussian_log_prob(x, mean, torch.full_like(x, math.log(1e-5))).sum()
    assert float(nats_to_bits_per_dim(nats, 784)) == pytest.approx(1.0, abs=1e-9)


def test_unit_range_round_trip_over_all_levels():
    levels = torch.arange(256, dtype=torch.uint8)
    x = to_unit_range(levels)
    assert x.dtype == torch.float32
    assert float(x[0]) == -1.0 and float(x[-1]) == pytest.approx(1.0)
    assert torch.equal(to_uint8(x), levels)
    # Out-of-range values clamp to the edge levels; values near a level round to it.
    assert to_uint8(torch.tensor([-3.0, 2.0, float(x[9]) + 0.9 * HALF_BIN])).tolist() == [0, 255, 9]
