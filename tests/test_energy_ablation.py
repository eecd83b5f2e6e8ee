"""The energy ablation's verdict: vaebm_bpd against iwae_bpd, pair by pair."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import energy_ablation  # noqa: E402


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
