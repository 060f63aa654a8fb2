"""`difflab eval --likelihood vlb|ode`: the test digits re-quantised to 8 bits, scored by the
variational bound and through the probability-flow ODE with the same plumbing."""

from __future__ import annotations

import json

import pytest
import torch

from difflab.cli import main
from difflab.denoiser import ClipDenoiser
from difflab.eval.likelihood import bits_per_dim, eight_bit_test_digits, model_bits_per_dim, requantize_8bit
from difflab.eval.metrics import nll_bpd
from difflab.methods.likelihood import ode_bits_per_dim, to_levels
from difflab.pipelines import Pipeline
from difflab.train import run
from test_train_support import tiny_config


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    cfg = tiny_config(data={"name": "digits", "size": 16}, diffusion={"schedule": "cosine", "T": 20},
                      train={"steps": 2})  # fmt: skip
    return run(cfg, tmp_path_factory.mktemp("lik") / "run") / "model"


def test_requantising_moves_every_pixel_to_its_nearest_8_bit_level():
    x = torch.tensor([-1.0, -0.9999, 0.0, 0.0041, 0.9999, 1.0, 1.7])
    q = requantize_8bit(x)
    k = ((q.double() + 1) * 127.5).round()
    assert torch.allclose(q.double(), k / 127.5 - 1, atol=1e-7)  # on the grid
    assert k.tolist() == [0, 0, 128, 128, 255, 255, 255]  # nearest level (0.0 -> 127.5 rounds to even 128)
    assert (q - x.clamp(-1, 1)).abs().max() <= 1 / 255 + 1e-6  # at most half a level away
    assert torch.equal(requantize_8bit(q), q)  # idempotent
    digits = eight_bit_test_digits(8, 5)
    assert digits.shape == (5, 1, 8, 8) and to_levels(digits).max() <= 255  # ode_bits_per_dim accepts them


def test_raw_digits_are_not_8_bit_so_the_ode_refuses_them_until_requantised():
    from difflab.data.digits import DigitsDataset

    raw = DigitsDataset("test", size=8).images[:3]
    with pytest.raises(ValueError, match="8-bit"):
        to_levels(raw)  # negative control: the requantisation is needed


def test_both_methods_are_the_library_estimators_on_the_same_images(tiny_model):
    pipe = Pipeline.from_pretrained(tiny_model, device="cpu")
    images = eight_bit_test_digits(16, 3)
    vlb = bits_per_dim(pipe.denoiser, images, "vlb", seed=4, repeats=2)
    assert vlb["per_repeat"] == pytest.approx([nll_bpd(pipe.denoiser, images, 64, None, s) for s in (4, 5)], abs=1e-9)
    ode = bits_per_dim(pipe.denoiser, images, "ode", seed=4, repeats=2, rtol=1e-3, atol=1e-3)
    direct = ode_bits_per_dim(pipe.denoiser, images, repeats=2, rtol=1e-3, atol=1e-3,
                              generator=torch.Generator().manual_seed(4))  # fmt: skip
    assert ode["bits_per_dim"] == pytest.approx(direct["mean"], abs=1e-9) and ode["nfe"] == direct["nfe"]
    for m in (vlb, ode):
        assert m["num_images"] == 3 and m["sem"] >= 0 and m["bits_per_dim"] > 0  # an untrained model: large, finite
    with pytest.raises(ValueError, match="allowed: vlb, ode"):
        bits_per_dim(pipe.denoiser, images, "elbo")


def test_the_bound_scores_the_thresholded_model_and_the_ode_the_bare_network(tiny_model):
    pipe = Pipeline.from_pretrained(tiny_model, device="cpu")
    assert pipe.manifest["thresholding"] == "static"
    images = eight_bit_test_digits(16, 3)
    bound = model_bits_per_dim(pipe, images, "vlb", seed=4, repeats=1)["bits_per_dim"]
    clipped = bits_per_dim(ClipDenoiser(pipe.denoiser), images, "vlb", seed=4, repeats=1)["bits_per_dim"]
    bare = bits_per_dim(pipe.denoiser, images, "vlb", seed=4, repeats=1)["bits_per_dim"]
    assert bound == pytest.approx(clipped, abs=1e-12)
    assert abs(bound - bare) > 1e-2  # negative control: the untrained x0 leaves [-1, 1], so the clip matters
    ode = model_bits_per_dim(pipe, images, "ode", seed=4, repeats=1, rtol=1e-2, atol=1e-2)["bits_per_dim"]
    assert ode == bits_per_dim(pipe.denoiser, images, "ode", seed=4, repeats=1, rtol=1e-2, atol=1e-2)["bits_per_dim"]


def test_a_wrapped_network_is_scored_in_eval_mode_and_handed_back_as_it_was(tiny_model):
    pipe = Pipeline.from_pretrained(tiny_model, device="cpu")
    net = pipe.denoiser.net
    seen = []
    hook = net.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    net.train()
    try:
        bits_per_dim(ClipDenoiser(pipe.denoiser), eight_bit_test_digits(16, 1), "vlb", repeats=1)
    finally:
        hook.remove()
    assert seen and not any(seen)  # dropout off for every forward, though the network sits under a wrapper
    assert net.training  # and its mode restored


def test_eval_cli_reports_ode_bits_per_dim(tiny_model, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["eval", str(tiny_model), "--n", "4", "--steps", "2", "--likelihood", "ode", "--likelihood-n", "2",
                 "--ode-tol", "1e-2", "--out", str(out)]) == 0  # fmt: skip
    m = json.loads(out.read_text())["likelihood"]
    assert m["method"] == "ode" and m["num_images"] == 2 and len(m["per_repeat"]) == 3
    assert "ODE bits/dim of 2 test digits" in capsys.readouterr().out
    assert main(["eval", str(tiny_model), "--n", "4", "--steps", "2", "--nll", "--likelihood-n", "2",
                 "--out", str(out)]) == 0  # fmt: skip
    assert json.loads(out.read_text())["likelihood"]["method"] == "vlb"


def test_eval_refuses_the_likelihood_of_a_conditional_model(capsys):
    assert main(["eval", "digits-cfg", "--n", "4", "--steps", "2", "--likelihood", "ode"]) == 2
    assert "conditional" in capsys.readouterr().err
