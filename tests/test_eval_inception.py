"""Inception FID loading. The real weights cannot ship and torchvision is not installed here (its
PyPI wheels pin a CUDA build of torch; the CPU build lives on PyTorch's own index), so the
loader runs against a stand-in: a tiny network registered as `torchvision.models.inception_v3`,
and a weights file the test writes in the same format (torchvision state-dict keys, an
AuxLogits head to drop, BatchNorm counters an old checkpoint may lack)."""

import importlib.util
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from difflab.eval.frechet import frechet_distance
from difflab.eval.inception import (
    ENV_VAR,
    INPUT_SIZE,
    inception_features,
    inception_fid,
    inception_weights_path,
    load_inception,
    read_state_dict,
)

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


class TinyInception(nn.Module):
    """Stands in for torchvision's Inception-v3: a conv stem with BatchNorm, global pooling and an
    `fc` head (that the feature extractor replaces), plus the auxiliary head when aux_logits."""

    def __init__(self, aux_logits=False):
        super().__init__()
        self.Conv2d_1a_3x3 = nn.Sequential(nn.Conv2d(3, 4, 3, stride=8), nn.BatchNorm2d(4))
        self.AuxLogits = nn.Linear(4, 10) if aux_logits else None
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        h = torch.relu(self.Conv2d_1a_3x3(x)).mean((2, 3))
        return self.fc(h)


@pytest.fixture
def stub_torchvision(monkeypatch):
    """`torchvision.models.inception_v3` -> TinyInception; records the arguments it was built with."""
    calls = []

    def inception_v3(**kwargs):
        calls.append(kwargs)
        return TinyInception(aux_logits=kwargs.get("aux_logits", True))

    models = types.SimpleNamespace(inception_v3=inception_v3)
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(models=models))
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    return calls


def stand_in_weights(tmp_path, name="inception.safetensors", drop=(), extra=None):
    """A trained-looking TinyInception state dict as torchvision would save it: the aux head included,
    BatchNorm statistics set, and (like older checkpoints) no num_batches_tracked."""
    torch.manual_seed(0)
    net = TinyInception(aux_logits=True)
    with torch.no_grad():
        net.Conv2d_1a_3x3[1].running_mean.normal_()
        net.Conv2d_1a_3x3[1].running_var.uniform_(0.5, 2.0)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked") and k not in drop}
    state.update(extra or {})
    path = tmp_path / name
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path, state


def test_stand_in_weights_load_and_give_pool_features(tmp_path, stub_torchvision):
    path, state = stand_in_weights(tmp_path)
    model = load_inception(path)
    # built as a bare network for inference on [-1, 1] inputs, without the auxiliary head
    assert stub_torchvision == [dict(weights=None, aux_logits=False, transform_input=False, init_weights=False)]
    loaded = model.net.state_dict()
    assert isinstance(model.net.fc, nn.Identity) and not model.net.training  # the head is cut off
    assert set(loaded) == {k for k in state if not k.startswith(("AuxLogits.", "fc."))} | {
        "Conv2d_1a_3x3.1.num_batches_tracked"
    }
    for key in set(loaded) & set(state):
        assert torch.equal(loaded[key], state[key]), key
    # features, written out: grey -> RGB, clamp to [-1, 1], bilinear to 299 x 299, the net without fc
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2.4 - 1.2
    reference = TinyInception()
    reference.load_state_dict({k: v for k, v in state.items() if not k.startswith("AuxLogits.")}, strict=False)
    big = F.interpolate(x.clamp(-1, 1).expand(-1, 3, -1, -1), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear")
    with torch.no_grad():
        expected = torch.relu(reference.eval().Conv2d_1a_3x3(big)).mean((2, 3))
    torch.testing.assert_close(model(x), expected)
    torch.testing.assert_close(model(x.expand(-1, 3, -1, -1)), expected)  # grey is RGB with equal channels
    # batched features are the same features; FID of a set with itself is 0, with another set it is not
    torch.testing.assert_close(inception_features(model, x, batch_size=2), expected)
    other = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    assert inception_fid(x, x, path, batch_size=2) == pytest.approx(0.0, abs=1e-6)
    fid = inception_fid(x, other, path)
    assert fid > 1e-4 and fid == pytest.approx(frechet_distance(expected, model(other)), rel=1e-6)
    with pytest.raises(ValueError, match=r"\(B, 1 or 3, H, W\)"):
        model(torch.zeros(2, 2, 8, 8))


def test_stand_in_weights_load_from_a_pth_state_dict(tmp_path, stub_torchvision):
    """A .pth is read with torch.load(weights_only=True): the same tensors as from safetensors."""
    path, state = stand_in_weights(tmp_path, "inception.pth")
    loaded = load_inception(path).net.state_dict()
    for key in ("Conv2d_1a_3x3.0.weight", "Conv2d_1a_3x3.1.running_var"):
        assert torch.equal(loaded[key], state[key])


def test_wrong_weights_are_rejected(tmp_path, stub_torchvision):
    """Near misses of the right file: a foreign file, a missing tensor, an extra one, a wrong shape."""
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="does not hold torchvision inception_v3 weights"):
        load_inception(path)
    path, _ = stand_in_weights(tmp_path, "missing.safetensors", drop=("fc.bias",))
    with pytest.raises(ValueError, match=r"missing \['fc.bias'\]"):
        load_inception(path)
    path, _ = stand_in_weights(tmp_path, "extra.safetensors", extra={"Mixed_9c.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"unexpected \['Mixed_9c.weight'\]"):
        load_inception(path)
    path, _ = stand_in_weights(tmp_path, "shape.safetensors", extra={"fc.weight": torch.zeros(10, 5)})
    with pytest.raises(ValueError, match=r"'fc.weight' has shape \(10, 5\), needs \(10, 4\)"):
        load_inception(path)
