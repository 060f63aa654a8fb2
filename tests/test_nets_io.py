"""save_pretrained / from_pretrained / load_network / build_network round trips and errors."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from difflab.nets import (
    NETWORKS,
    ConfigModule,
    DiT,
    NoisyClassifier,
    UNet,
    build_network,
    load_network,
)
from difflab.nets import base as nets_base

UNET = dict(
    model_channels=8, channel_mult=(1, 2), num_res_blocks=(1, 2), attention_resolutions=(2,),
    num_heads=2, norm_groups=4, num_classes=3, context_dim=5, concat_channels=1,
    learn_sigma=True,
)
DIT = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=16, depth=2, num_heads=2,
           num_classes=3, learn_sigma=True)
CLASSIFIER = dict(image_size=8, num_classes=4, model_channels=8, channel_mult=(1, 2),
                  num_res_blocks=1, num_heads=2, norm_groups=4)




def randomise_(net: nn.Module, seed: int = 7) -> nn.Module:
    """Every tensor random, so a round trip that drops or mixes up any tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return net


def example_call(net: nn.Module):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    t = torch.tensor([3.0, 500.5])
    if isinstance(net, UNet):
        cond = {"y": torch.tensor([0, 3]), "context": torch.randn(2, 4, 5, generator=gen),
                "concat": torch.randn(2, 1, 8, 8, generator=gen)}
        return net(x, t, cond)
    if isinstance(net, DiT):
        return net(x, t, {"y": torch.tensor([1, 3])})
    return net(x, t)


@pytest.fixture(params=["UNet", "DiT", "NoisyClassifier"])
def network(request):
    torch.manual_seed(0)
    options = {"UNet": UNET, "DiT": DIT, "NoisyClassifier": CLASSIFIER}[request.param]
    return randomise_(NETWORKS[request.param](options)).eval()


def test_round_trip_is_bit_identical(network, tmp_path):
    network.save_pretrained(tmp_path)
    reference = example_call(network)
    for loaded in (
        type(network).from_pretrained(tmp_path),
        ConfigModule.from_pretrained(tmp_path),
        load_network(tmp_path),
    ):
        assert type(loaded) is type(network)
        assert not loaded.training
        assert loaded.config == network.config
        assert torch.equal(example_call(loaded), reference)
        expected = network.state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # no temp files


def test_config_json_describes_the_network(tmp_path):
    net = UNet(UNET)
    net.save_pretrained(tmp_path)
    header = json.loads((tmp_path / "config.json").read_text())
    assert header["class"] == "UNet"
    assert header["format_version"] == nets_base.FORMAT_VERSION
    assert header["dtype"] == "float32"
    assert header["channel_mult"] == [1, 2] and header["num_res_blocks"] == [1, 2]
    assert build_network(header).config == net.config
    assert set(load_file(tmp_path / "model.safetensors")) == set(net.state_dict())


def test_bfloat16_round_trip_keeps_dtype(tmp_path):
    torch.manual_seed(0)
    net = randomise_(DiT(DIT)).to(torch.bfloat16).eval()
    net.save_pretrained(tmp_path)
    loaded = load_network(tmp_path)
    assert loaded.patch_embed.weight.dtype == torch.bfloat16
    x = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)
    y = {"y": torch.tensor([0, 1])}
    assert torch.equal(loaded(x, 4, y), net(x, 4, y))


def test_overwrite_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    first = randomise_(UNet(UNET), seed=1)
    first.save_pretrained(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}

    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(nets_base, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        randomise_(UNet({**UNET, "model_channels": 16}), seed=2).save_pretrained(tmp_path)
    # Neither the old weights nor the old config were touched, and no temp file remains.
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
    assert torch.equal(example_call(load_network(tmp_path)), example_call(first.eval()))


def test_build_network_from_dict():
    net = build_network({"class": "DiT", **DIT})
    assert isinstance(net, DiT) and net.config.hidden_size == 16
    with pytest.raises(ValueError, match=r'"class" key naming one of \[.*UNet'):
        build_network(DIT)
    with pytest.raises(ValueError, match=r"unknown network class 'Dit'; known classes: \["):
        build_network({"class": "Dit"})
    with pytest.raises(ValueError, match=r"unknown DiTConfig keys \['depht'\]"):
        build_network({"class": "DiT", "depht": 3})


# --------------------------------------------------------------------------- load errors


def _saved(tmp_path) -> UNet:
    net = UNet(UNET)
    net.save_pretrained(tmp_path)
    return net


def _edit_config(tmp_path, **changes):
    path = tmp_path / "config.json"
    header = json.loads(path.read_text())
    header.update(changes)
    path.write_text(json.dumps(header))


def _edit_weights(tmp_path, edit):
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_unknown_config_key_lists_allowed_keys(tmp_path):
    _saved(tmp_path)
    _edit_config(tmp_path, modle_channels=4)
    with pytest.raises(ValueError, match=r"unknown UNetConfig keys \['modle_channels'\]; allowed"):
        load_network(tmp_path)


def test_config_for_a_different_class(tmp_path):
    _saved(tmp_path)
    with pytest.raises(ValueError, match="describes a 'UNet', not a 'DiT'"):
        DiT.from_pretrained(tmp_path)
    _edit_config(tmp_path, **{"class": "VAE"})
    with pytest.raises(ValueError, match=r"unknown network class 'VAE'; known classes: \["):
        load_network(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    _saved(tmp_path)
    _edit_weights(tmp_path, lambda t: t.pop("out.2.weight"))
    with pytest.raises(ValueError, match=r"missing tensors \['out.2.weight'\]"):
        load_network(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    _saved(tmp_path)
    _edit_weights(tmp_path, lambda t: t.update(extra_scale=torch.ones(3)))
    with pytest.raises(ValueError, match=r"unexpected tensors \['extra_scale'\]"):
        UNet.from_pretrained(tmp_path)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    _saved(tmp_path)
    _edit_weights(tmp_path, lambda t: t.update({"out.2.bias": torch.zeros(7)}))
    with pytest.raises(ValueError, match=r"'out.2.bias' has shape \(7,\), expected \(6,\)"):
        load_network(tmp_path)


def test_weights_from_a_different_config_are_rejected(tmp_path):
    _saved(tmp_path)
    _edit_config(tmp_path, model_channels=16)
    with pytest.raises(ValueError, match="has shape .* expected"):
        load_network(tmp_path)


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: os.remove(d / "config.json"), "missing .*config.json"),
        (lambda d: os.remove(d / "model.safetensors"), "missing weights file"),
        (lambda d: _edit_config(d, format_version=99), "format_version 99; this difflab reads 1"),
        (lambda d: _edit_config(d, dtype="int8"), 'must name a torch float dtype'),
        (lambda d: (d / "config.json").write_text("[1, 2]"), 'JSON object with a "class" key'),
    ],
)
def test_broken_directories_raise_clear_errors(tmp_path, breakage, message):
    _saved(tmp_path)
    breakage(tmp_path)
    with pytest.raises(ValueError, match=message):
        load_network(tmp_path)


def test_every_network_class_is_registered():
    assert {"UNet", "DiT", "NoisyClassifier"} <= set(NETWORKS)
    assert NETWORKS["NoisyClassifier"] is NoisyClassifier
