"""vaebm_bpd against iwae_bpd, pair by pair: the ablation's verdict and the bootstrap."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import energy_ablation  # noqa: E402
import numpy as np  # noqa: E402
import vaebm_vs_iwae  # noqa: E402


def test_compare_to_iwae_sorts_pairs_into_better_equal_worse():
    auroc = {
        "a": {"iwae_bpd": 0.50, "vaebm_bpd": 0.70},
        "b": {"iwae_bpd": 0.90, "vaebm_bpd": 0.9005},
        "c": {"iwae_bpd": 0.99, "vaebm_bpd": 0.95},
    }
    assert energy_ablation.compare_to_iwae(auroc, tolerance=0.001) == {
        "a": "better",
        "b": "equal",
        "c": "worse",
    }
    assert energy_ablation.compare_to_iwae(auroc, tolerance=0.0)["b"] == "better"


def scores(first: np.ndarray, second: np.ndarray) -> dict[str, np.ndarray]:
    return {"vaebm_bpd": first, "iwae_bpd": second}


def test_paired_bootstrap_interval_excludes_zero_only_for_a_real_gap():
    rng = np.random.default_rng(0)
    inside, outside = rng.normal(0, 1, 2000), rng.normal(1.5, 1, 2000)
    noisy = inside + rng.normal(0, 2, 2000)  # the second score blurs in-distribution
    better = vaebm_vs_iwae.paired_bootstrap(
        scores(inside, noisy), scores(outside, outside), n_boot=200, seed=0
    )
    low, high = better["difference_95_interval"]
    assert better["difference"] > 0 and low > 0 and better["share_of_resamples_vaebm_below"] == 0
    same = vaebm_vs_iwae.paired_bootstrap(
        scores(inside, inside), scores(outside, outside), n_boot=200, seed=0
    )
    assert same["difference"] == 0 and same["difference_95_interval"] == [0.0, 0.0]
    swapped = vaebm_vs_iwae.paired_bootstrap(
        scores(noisy, inside), scores(outside, outside), n_boot=200, seed=0
    )
    assert swapped["difference"] == -better["difference"]
    assert swapped["difference_95_interval"][1] < 0
