"""The energy study's benchmark helpers: the ablation's verdict, the bootstrap, the energy's
weight and tail, the cost of mirroring, the last iterate, and the runs they record."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import energy_ablation  # noqa: E402
import energy_tail  # noqa: E402
import energy_weight  # noqa: E402
import flip_cost  # noqa: E402
import last_iterate  # noqa: E402
import named_runs  # noqa: E402
import numpy as np  # noqa: E402
import same_vae  # noqa: E402
import vaebm_vs_iwae  # noqa: E402
import warm_start  # noqa: E402


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


def test_tilted_mean_of_gaussian_energies_shifts_by_s_sigma_squared():
    # Under E ~ N(mu, sigma^2), reweighting by exp(-s E) gives N(mu - s sigma^2, sigma^2).
    energies = np.random.default_rng(0).normal(10.0, 2.0, 200_000)
    mean, ess = energy_weight.tilted_mean(energies, 0.5)
    assert abs(mean - (10.0 - 0.5 * 4.0)) < 0.05
    assert 0.2 * len(energies) < ess < len(energies)
    untilted, full = energy_weight.tilted_mean(energies, 0.0)
    assert abs(untilted - energies.mean()) < 1e-9 and abs(full - len(energies)) < 1e-6
    # A steep tilt leaves the weight on a few samples: the ESS says so.
    assert energy_weight.tilted_mean(energies, 50.0)[1] < 10


def test_maximum_likelihood_scale_recovers_the_tilt_that_made_the_data():
    rng = np.random.default_rng(1)
    model = rng.normal(10.0, 2.0, 200_000)
    for s in (0.05, 0.3, 1.0):
        data = rng.normal(10.0 - s * 4.0, 2.0, 50_000)  # the base tilted by exp(-s E)
        found = energy_weight.maximum_likelihood_scale(model, data, high=10.0)
        assert abs(found["s"] - s) < 0.05 * s + 0.01 and found["ess"] > 10
        assert abs(energy_weight.gaussian_scale(model, data) - s) < 0.05 * s + 0.01
    # Data costlier than the untilted model: no positive s matches; says so.
    assert energy_weight.maximum_likelihood_scale(model, model + 1.0)["s"] is None
    # Data cheaper than every sample: the tilted mean never gets there; only the
    # Gaussian closed form gives a value.
    far = model.min() - 1.0 - rng.normal(0, 0.1, 100) ** 2
    assert energy_weight.maximum_likelihood_scale(model, far, high=1e3)["s"] is None
    assert energy_weight.gaussian_scale(model, far) > 0


def test_weighted_aurocs_run_from_the_bound_to_the_vaebm_score():
    rng = np.random.default_rng(2)
    inside = {"iwae_bpd": rng.normal(0, 1, 300), "energy": rng.normal(0, 1, 300)}
    outside = {"iwae_bpd": rng.normal(0, 1, 300), "energy": rng.normal(2, 1, 300)}
    aurocs = energy_weight.weighted_aurocs({"in": inside, "ood": outside}, bits=1.0)
    assert set(aurocs) == {str(w) for w in energy_weight.WEIGHTS}
    assert abs(aurocs["0.0"]["ood"] - 0.5) < 0.1  # the bound alone cannot tell them apart
    assert aurocs["1.0"]["ood"] > aurocs["0.25"]["ood"] > aurocs["0.0"]["ood"]


def test_energy_tail_names_the_test_images_above_the_cheapest_noise():
    rng = np.random.default_rng(0)
    inside = rng.normal(0.0, 1.0, size=1000)
    inside[[7, 42]] = [9.0, 8.0]  # two rare images, stranger than any noise
    noise = rng.uniform(5.0, 6.0, size=500)
    tail = energy_tail.energy_tail(inside, noise, top=3)
    assert tail["top_test_images"]["test_index"][:2] == [5007, 5042]
    assert tail["top_test_images"]["sd_above_median"][0] > 8
    assert tail["test_images_above_cheapest_noise"] == 2
    low, high = tail["noise_sd_above_median_min_max"]
    assert 4.5 < low < high < 6.5
    assert 0.99 < tail["auroc_energy"] < 1.0
    inside[[7, 42]] = 0.0  # without them the energy separates noise perfectly
    clean = energy_tail.energy_tail(inside, noise, top=3)
    assert clean["test_images_above_cheapest_noise"] == 0
    assert clean["auroc_energy"] == 1.0
    assert "quantiles_sd_above_median" not in clean  # only with training images


def test_energy_tail_puts_training_images_on_the_test_images_scale():
    rng = np.random.default_rng(1)
    inside = rng.normal(100.0, 10.0, size=2000)
    trained = rng.normal(100.0, 10.0, size=2000)
    trained[:100] = 40.0  # an energy that fits its positives better than new images
    tail = energy_tail.energy_tail(inside, rng.uniform(200, 300, 50), top=1, trained=trained)
    quantiles = tail["quantiles_sd_above_median"]
    assert quantiles["percentiles"] == [50, 90, 99, 99.9, 100]
    test, train = quantiles["test"], quantiles["train"]
    assert abs(test[0]) < 0.01 and test == sorted(test)
    assert abs(test[1] - 1.28) < 0.1  # 90th percentile of a normal, in its own sd
    assert train[0] < test[0] and train[-1] < test[-1] + 1.0
    expected_max = (trained.max() - np.median(inside)) / inside.std()
    assert abs(train[-1] - expected_max) < 0.01


def test_flip_cost_mirrors_images_and_signs_the_difference():
    images = np.arange(2 * 1 * 2 * 3, dtype=np.uint8).reshape(2, 1, 2, 3)
    assert flip_cost.mirrored(images)[0, 0, 0].tolist() == [2, 1, 0]
    assert np.array_equal(flip_cost.mirrored(flip_cost.mirrored(images)), images)
    as_is = np.array([1.0, 2.0, 3.0, 4.0])
    cost = flip_cost.flip_cost(as_is, as_is + np.array([5.0, 5.0, 5.0, -1.0]))
    assert cost["median_difference"] == 5.0
    assert cost["share_costlier_mirrored"] == 0.75
    assert cost["mean_mirrored"] - cost["mean_as_is"] == 3.5


def test_measure_runs_records_each_named_run_and_keeps_other_entries(tiny_checkpoint, tmp_path):
    out = tmp_path / "runs.json"
    out.write_text(json.dumps({"earlier": {"kept": True}}))
    seen = []

    def measure(model, info):
        seen.append(info.name)
        return {"energy_of_zeros": float(model.energy(torch.zeros(1, 1, 28, 28))[0])}

    specs = [f"a={tiny_checkpoint}", f"b={tiny_checkpoint}"]
    entries = named_runs.measure_runs(
        specs, measure, out=out, command="cmd", device=torch.device("cpu")
    )
    assert len(seen) == 2
    assert json.loads(out.read_text()) == entries
    assert entries["earlier"] == {"kept": True}
    assert entries["a"]["run"] == str(tiny_checkpoint) and entries["a"]["command"] == "cmd"
    assert len(entries["b"]["weights_sha256"]) == 64


@pytest.mark.parametrize("spec", ["no-equals", "=dir", "name="])
def test_parse_run_refuses_a_spec_without_name_and_directory(spec):
    with pytest.raises(SystemExit, match="NAME=DIR"):
        named_runs.parse_run(spec)
    assert named_runs.parse_run("a=b=c") == ("a", "b=c")


def test_last_iterate_exports_the_state_energy_with_the_runs_vae(tiny_checkpoint, tmp_path):
    from model.checkpoint import load_checkpoint
    from training.runtime import save_state

    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, run)
    published, _ = load_checkpoint(run)
    last = {k: v + 0.5 for k, v in published.energy.state_dict().items()}  # not the average
    save_state(run / "train_state_ebm.pt", {"energy": last, "step": 7})
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir())

    out = tmp_path / "last"
    digest = last_iterate.export_last_iterate(run, out)
    exported, info = load_checkpoint(out)
    assert info.weights_sha256 == digest
    assert info.training["ebm"]["published"] == "last iterate, step 7"
    for key, value in exported.energy.state_dict().items():
        assert torch.equal(value, last[key]), key
    for key, value in exported.vae.state_dict().items():
        assert torch.equal(value, published.vae.state_dict()[key]), key
    assert not (out / "calibration.json").exists()  # the run's calibration is for other weights
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir()) == before
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        last_iterate.export_last_iterate(run, out)


def test_warm_start_continues_training_from_the_published_energy(tiny_checkpoint, data, tmp_path):
    from model.checkpoint import load_checkpoint
    from training.runtime import setup_distributed
    from training.train_ebm import EBMTrainArgs, train_ebm

    out = tmp_path / "ws"
    settings = {"buffer_size": 16, "ema_decay": 0.999, "beta1": 0.99, "weight_decay": 3e-5}
    assert warm_start.warm_start(tiny_checkpoint, out, step=4, seed=0, **settings) == 4
    source, _ = load_checkpoint(tiny_checkpoint)
    copied, info = load_checkpoint(out)
    assert info.training["ebm_warm_start"]["from"] == str(tiny_checkpoint)
    for key, value in source.state_dict().items():
        assert torch.equal(copied.state_dict()[key], value), key
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        warm_start.warm_start(tiny_checkpoint, out, step=4, seed=0, **settings)

    # The state resumes under the same settings, one step past it, from that energy.
    args = EBMTrainArgs(
        checkpoint=str(out), data=data, steps=5, batch_size=8, langevin_steps=2,
        step_size=1e-3, lr=1e-6, buffer_ramp_steps=2, eval_every=1, checkpoint_every=1,
        eval_images=16, device="cpu", resume=True, energy_hidden=8, **settings,
    )  # fmt: skip
    train_ebm(args, setup_distributed("cpu"))
    trained, info = load_checkpoint(out)
    assert info.training["ebm"]["completed_steps"] == 5
    assert info.training["ebm_warm_start"]["from"] == str(tiny_checkpoint)  # kept by training
    weights = dict(trained.energy.named_parameters())  # not the power-iteration vectors
    moved = [
        float((weights[key] - value).abs().max()) for key, value in source.energy.named_parameters()
    ]
    assert 0 < max(moved) < 1e-5  # one step of lr 1e-6 from the published weights, not afresh


def test_same_vae_finds_the_one_tensor_that_differs(tiny_checkpoint):
    from model.checkpoint import load_checkpoint

    first, _ = load_checkpoint(tiny_checkpoint)
    second, _ = load_checkpoint(tiny_checkpoint)
    torch.nn.init.normal_(second.energy.head.weight)  # the energy is not compared
    assert set(same_vae.vae_differences(first, second).values()) == {0.0}

    name, tensor = next(iter(second.vae.state_dict().items()))
    with torch.no_grad():
        tensor.view(-1)[0] += 0.25
    differences = same_vae.vae_differences(first, second)
    assert differences.pop(name) == pytest.approx(0.25)
    assert set(differences.values()) == {0.0}
