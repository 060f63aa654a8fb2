"""Behaviour of DiT: paper parameter counts, adaLN-Zero init, patching, conditioning."""

import pytest
import torch
from torch import nn

from difflab.nets import DIT_PRESETS, DiT, DiTConfig, count_parameters, dit_config
from difflab.nets.dit import DiTBlock, sincos_2d
from test_nets_support import perturb_zero_params_

TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=16, depth=2, num_heads=2)

# Table 1 of Peebles & Xie (2023), in millions, for 32x32x4 latents, 1000 classes.
PAPER_PARAMS_M = {"S": 33, "B": 130, "L": 458, "XL": 675}




def make_dit(**overrides) -> DiT:
    torch.manual_seed(0)
    return DiT(DiTConfig(**{**TINY, **overrides}))




@pytest.mark.parametrize("name", DIT_PRESETS)
def test_parameter_counts_match_the_paper(name):
    with torch.device("meta"):  # shapes only: XL builds instantly
        net = DiT(dit_config(name))
    size = name.removeprefix("DiT-").split("/")[0]
    millions = count_parameters(net) / 1e6
    assert abs(millions - PAPER_PARAMS_M[size]) / PAPER_PARAMS_M[size] < 0.01


def test_xl2_parameter_count_is_exact():
    # 28 blocks of 23,912,064 + embedders + final layer; the official code reports
    # 675,129,632 including its 256 x 1152 frozen position table, which is a buffer here.
    with torch.device("meta"):
        net = DiT(dit_config("DiT-XL/2"))
    assert count_parameters(net) == 675_129_632 - 256 * 1152


@pytest.mark.parametrize("patch_size", [1, 2, 4])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_fresh_model_outputs_exact_zero_with_expected_shape(patch_size, learn_sigma):
    net = make_dit(patch_size=patch_size, learn_sigma=learn_sigma, num_classes=3)
    x = torch.randn(2, 3, 8, 8)
    out = net(x, torch.tensor([0, 999]), {"y": torch.tensor([0, 3])})
    assert out.shape == (2, 6 if learn_sigma else 3, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))


def test_fresh_block_is_the_identity():
    torch.manual_seed(0)
    block = DiTBlock(16, 2, 4.0)
    x, c = torch.randn(2, 5, 16), torch.randn(2, 16)
    assert torch.equal(block(x, c), x)


def test_gradients_reach_every_parameter():
    net = make_dit(num_classes=3, learn_sigma=True, concat_channels=1, out_channels=2)
    perturb_zero_params_(net)
    x, extra = torch.randn(2, 3, 8, 8), torch.randn(2, 1, 8, 8)
    out = net(x, torch.tensor([3.0, 700.5]), {"y": torch.tensor([1, 3]), "concat": extra})
    assert out.shape == (2, 4, 8, 8)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert dead == []


def test_unpatchify_inverts_patch_order():
    net = make_dit(patch_size=2, learn_sigma=True)  # 6 output channels
    x = torch.randn(2, 6, 8, 8)
    # token (row, col) holds its 2x2 patch as (p, q, channel), row-major over tokens
    tokens = x.reshape(2, 6, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 24)
    assert torch.equal(net.unpatchify(tokens), x)


def test_sincos_position_table_closed_form():
    dim, grid = 16, 4
    table = sincos_2d(dim, grid)
    omega = torch.tensor([10000 ** (-i / 4) for i in range(4)])
    for row, col in [(0, 0), (1, 3), (3, 2)]:
        col_part = torch.cat([torch.sin(col * omega), torch.cos(col * omega)])
        row_part = torch.cat([torch.sin(row * omega), torch.cos(row * omega)])
        torch.testing.assert_close(table[row * grid + col], torch.cat([col_part, row_part]))
    assert not net_has_parameter_named(make_dit(), "pos_embed")


def net_has_parameter_named(net: nn.Module, name: str) -> bool:
    return any(name in n for n, _ in net.named_parameters())


def test_tokens_interact_only_through_attention():
    """LayerNorm and MLP act per token, so without attention a far patch cannot matter."""
    net = make_dit(patch_size=2)
    perturb_zero_params_(net)
    x = torch.randn(1, 3, 8, 8)
    far = x.clone()
    far[:, :, 6:, 6:] += 1.0  # last patch only
    delta = (net(far, 5) - net(x, 5))[:, :, :2, :2].abs().max()
    assert delta > 1e-6
    with torch.no_grad():
        for block in net.blocks:
            nn.init.zeros_(block.attention.proj.weight)
            nn.init.zeros_(block.attention.proj.bias)
    assert torch.equal(net(far, 5)[:, :, :2, :2], net(x, 5)[:, :, :2, :2])


def test_null_label_and_no_label_dropout_inside_the_network():
    net = make_dit(num_classes=4)
    perturb_zero_params_(net)
    x = torch.randn(2, 3, 8, 8)
    out_null = net(x, 5, {"y": torch.full((2,), 4)})
    out_real = net(x, 5, {"y": torch.tensor([0, 2])})
    assert not torch.allclose(out_null, out_real)
    # the training task drops labels at class_dropout_prob; the network never does, even at rate 1
    dropping = make_dit(num_classes=4, class_dropout_prob=1.0)
    dropping.load_state_dict(net.state_dict())
    torch.testing.assert_close(dropping.train()(x, 5, {"y": torch.tensor([0, 2])}), out_real, rtol=0, atol=0)
    torch.testing.assert_close(dropping.train()(x, 5, {"y": torch.full((2,), 4)}), out_null, rtol=0, atol=0)
    torch.testing.assert_close(dropping.eval()(x, 5, {"y": torch.tensor([0, 2])}), out_real, rtol=0, atol=0)


def test_bad_input_raises_value_error():
    net = make_dit(num_classes=4)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"unknown cond keys \['context'\].*\['y'\].*no cross"):
        net(x, 1, {"y": torch.tensor([0, 1]), "context": torch.randn(2, 3, 4)})
    with pytest.raises(ValueError, match=r'needs cond\["y"\]'):
        net(x, 1)
    with pytest.raises(ValueError, match="built for 8x8 inputs, got 16x16"):
        net(torch.randn(2, 3, 16, 16), 1, {"y": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        net(x, 1, {"y": torch.tensor([0, 9])})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(input_size=10, patch_size=4), "not divisible by patch_size"),
        (dict(hidden_size=18, num_heads=3), "multiple of 4"),
        (dict(num_heads=3), "not divisible by num_heads"),
        (dict(mlp_ratio=0), "mlp_ratio must be > 0"),
        (dict(depth=0), "depth must be >= 1"),
    ],
)
def test_bad_config_raises_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        DiT({**TINY, **overrides})


def test_presets_and_overrides():
    cfg = dit_config("DiT-S/4", in_channels=3, num_classes=None, learn_sigma=False)
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (12, 384, 6, 4)
    assert cfg.in_channels == 3 and cfg.num_classes is None
    with pytest.raises(ValueError, match="unknown DiT preset 'DiT-M/2'.*DiT-S/2"):
        dit_config("DiT-M/2")
