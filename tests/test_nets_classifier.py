"""Behaviour of the noisy classifier used for classifier guidance."""

import pytest
import torch
import torch.nn.functional as F

from difflab.nets import NoisyClassifier, NoisyClassifierConfig
from test_nets_support import perturb_zero_params_

TINY = dict(
    image_size=8, in_channels=3, num_classes=5, model_channels=8, channel_mult=(1, 2),
    num_res_blocks=1, attention_resolutions=(2,), num_heads=2, norm_groups=4,
)

COMBOS = {
    "default": {},
    "updown_additive_rescale": dict(
        resblock_updown=True, use_scale_shift_norm=False, skip_rescale=True
    ),
    "efficient_head_channels": dict(
        efficient_updown=True, attention_resolutions=(4,), num_head_channels=4
    ),
    "pool_resample_no_mid_attention": dict(
        conv_resample=False, mid_attention=False, num_res_blocks=(1, 2)
    ),
}




def make_classifier(**overrides) -> NoisyClassifier:
    torch.manual_seed(0)
    return NoisyClassifier(NoisyClassifierConfig(**{**TINY, **overrides}))




@pytest.mark.parametrize("name", COMBOS)
def test_logits_shape_and_gradients_reach_every_parameter(name):
    net = make_classifier(**COMBOS[name])
    perturb_zero_params_(net)
    x = torch.randn(3, 3, 8, 8)
    logits = net(x, torch.tensor([0, 400, 999]))
    assert logits.shape == (3, 5)
    F.cross_entropy(logits, torch.tensor([0, 2, 4])).backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert dead == []


def test_guidance_gradient_matches_finite_differences():
    """grad_x log p(y | x, t) is what guidance follows: check it against central differences."""
    net = make_classifier().double()
    perturb_zero_params_(net)
    net.eval()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=gen)
    y, t = torch.tensor([1, 3]), torch.tensor([10.0, 600.0])

    def log_prob(inputs):
        return F.log_softmax(net(inputs, t), dim=-1).gather(1, y[:, None]).sum()

    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(log_prob(x), x)
    assert grad.abs().max() > 0
    eps = 1e-5
    for _ in range(3):
        direction = torch.randn(x.shape, dtype=torch.float64, generator=gen)
        with torch.no_grad():
            numeric = (log_prob(x + eps * direction) - log_prob(x - eps * direction)) / (2 * eps)
        torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-5, atol=1e-8)


def test_logits_depend_on_the_timestep():
    net = make_classifier()
    perturb_zero_params_(net)
    x = torch.randn(2, 3, 8, 8)
    assert not torch.allclose(net(x, 10), net(x, 900))


def test_fresh_classifier_is_not_degenerate():
    """Unlike the denoisers, the classifier must not start at a constant output."""
    net = make_classifier()
    logits = net(torch.randn(2, 3, 8, 8), 5)
    assert logits.std() > 0
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    (grad,) = torch.autograd.grad(net(x, 5)[0, 0], x)
    assert grad.abs().max() > 0


def test_bad_input_raises_value_error():
    net = make_classifier()
    with pytest.raises(ValueError, match=r"unknown cond keys \['y'\]; this network accepts \[\]"):
        net(torch.randn(2, 3, 8, 8), 1, {"y": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match="built for 8x8 inputs, got 16x16"):
        net(torch.randn(2, 3, 16, 16), 1)
    with pytest.raises(ValueError, match="image_size 7 must be a multiple of 2"):
        make_classifier(image_size=7)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        make_classifier(num_classes=0)
