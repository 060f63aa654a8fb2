"""Inception FID loading: only the error paths run here (no torchvision, no weights offline)."""

import importlib.util

import pytest
import torch
from safetensors.torch import save_file

from difflab.eval.inception import ENV_VAR, inception_weights_path, load_inception, read_state_dict

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def test_no_weights_given(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(ValueError, match=ENV_VAR):
        inception_weights_path(None)


def test_env_var_is_used(monkeypatch, tmp_path):
    path = tmp_path / "inception.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    monkeypatch.setenv(ENV_VAR, str(path))
    assert inception_weights_path() == path
    other = tmp_path / "other.pth"
    other.write_bytes(b"")
    assert inception_weights_path(other) == other  # an explicit path wins over the variable


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        inception_weights_path(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match=r"\.safetensors / \.pth / \.pt"):
        inception_weights_path(tmp_path / "weights.bin")


def test_read_state_dict_safetensors(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(3.0)}, str(path))
    assert torch.equal(read_state_dict(path)["a"], torch.arange(3.0))


@pytest.mark.skipif(HAS_TORCHVISION, reason="torchvision is installed")
def test_missing_torchvision_is_named(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(1)}, str(path))
    with pytest.raises(ImportError, match="torchvision"):
        load_inception(path)


@pytest.mark.skipif(not HAS_TORCHVISION, reason="needs torchvision")
def test_wrong_weights_are_rejected(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="does not hold torchvision inception_v3 weights"):
        load_inception(path)
