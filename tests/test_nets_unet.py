"""Behaviour of the ADM U-Net: shapes, zero init, gradient flow, attention, conditioning."""

import math

import pytest
import torch
from torch import nn

from difflab.nets import UNet, UNetConfig, timestep_embedding
from difflab.nets.layers import ResBlock, SpatialSelfAttention
from difflab.nets.unet import coordinate_maps, masked_mean
from test_nets_support import perturb_zero_params_

TINY = dict(
    in_channels=3, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
    attention_resolutions=(2,), num_heads=2, norm_groups=4,
)

# Each option is switched on (and off) in at least one combination.
COMBOS = {
    "default": {},
    "additive_emb_skip_rescale": dict(use_scale_shift_norm=False, skip_rescale=True),
    "resblock_updown_learn_sigma": dict(resblock_updown=True, learn_sigma=True),
    "pool_resample_blocks_per_level": dict(conv_resample=False, num_res_blocks=(1, 2)),
    "efficient": dict(efficient_updown=True, num_res_blocks=(2, 1), attention_resolutions=(4,)),
    "efficient_final_block": dict(efficient_updown=True, final_block=True, attention_resolutions=(4,)),
    "efficient_resblock_updown": dict(
        efficient_updown=True, resblock_updown=True, attention_resolutions=(2, 4)
    ),
    "head_channels_full_res_attention": dict(
        num_head_channels=4, attention_resolutions=(1, 2), mid_attention=False
    ),
    "all_conditions": dict(
        num_classes=5, context_dim=6, concat_channels=2, learn_sigma=True, out_channels=1,
        dropout=0.1,
    ),
    "pooled_context_coordinates": dict(
        context_dim=6, pooled_context=True, coordinate_channels=True, mid_attention=False
    ),
    "three_levels_no_attention": dict(
        channel_mult=(1, 2, 2), attention_resolutions=(), mid_attention=False
    ),
}




def make_unet(**overrides) -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(**{**TINY, **overrides}))


def make_inputs(net: UNet, batch: int = 2, size: int = 8, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    cfg = net.config
    x = torch.randn(batch, cfg.in_channels, size, size, generator=gen)
    t = torch.rand(batch, generator=gen) * 999
    cond = {}
    if cfg.num_classes is not None:
        cond["y"] = torch.arange(batch) % (cfg.num_classes + 1)
    if cfg.context_dim is not None:
        cond["context"] = torch.randn(batch, 4, cfg.context_dim, generator=gen)
        cond["context_mask"] = torch.ones(batch, 4, dtype=torch.bool)
        cond["context_mask"][0, -1] = False
    if cfg.concat_channels:
        cond["concat"] = torch.randn(batch, cfg.concat_channels, size, size, generator=gen)
    return x, t, cond




# --------------------------------------------------------------------------- shapes / init


@pytest.mark.parametrize("name", COMBOS)
def test_fresh_model_outputs_exact_zero_with_expected_shape(name):
    net = make_unet(**COMBOS[name])
    x, t, cond = make_inputs(net)
    out = net(x, t, cond)
    cfg = net.config
    data_channels = cfg.out_channels or cfg.in_channels
    expected_channels = data_channels * (2 if cfg.learn_sigma else 1)
    assert out.shape == (2, expected_channels, 8, 8)
    assert net.output_channels == expected_channels
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("name", COMBOS)
def test_gradients_reach_every_parameter(name):
    net = make_unet(**COMBOS[name])
    assert perturb_zero_params_(net) > 0
    x, t, cond = make_inputs(net)
    out = net(x, t, cond)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * weights).sum().backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert dead == []


@pytest.mark.parametrize("name", COMBOS)
def test_control_shapes_match_the_skips(name):
    net = make_unet(**COMBOS[name])
    perturb_zero_params_(net)
    net.eval()
    x, t, cond = make_inputs(net)
    shapes = net.control_shapes(8, 8)
    reference = net(x, t, cond)
    zeros = [torch.zeros(2, *s) for s in shapes]
    assert torch.equal(net(x, t, {**cond, "control": zeros}), reference)
    for index in (0, len(shapes) - 1):  # first skip and the middle block both matter
        control = [z.clone() for z in zeros]
        control[index] = torch.randn(2, *shapes[index])
        assert not torch.allclose(net(x, t, {**cond, "control": control}), reference)


def test_control_shapes_order_for_standard_unet():
    net = make_unet()  # levels (8 ch, factor 1) -> (16 ch, factor 2), one block each
    assert net.control_shapes(8, 8) == [
        (8, 8, 8),  # input conv
        (8, 8, 8),  # level 0 res block
        (8, 4, 4),  # downsample
        (16, 4, 4),  # level 1 res block
        (16, 4, 4),  # middle block output
    ]


def test_efficient_updown_runs_no_res_block_at_full_resolution():
    seen = {False: [], True: []}
    for efficient, widths in seen.items():
        net = make_unet(efficient_updown=efficient, attention_resolutions=())
        for module in net.modules():
            if isinstance(module, ResBlock):
                module.register_forward_hook(
                    lambda m, args, out, widths=widths: widths.append(args[0].shape[-1])
                )
        x, t, _ = make_inputs(net)
        net(x, t)
    assert {efficient: max(widths) for efficient, widths in seen.items()} == {False: 8, True: 4}


def test_final_block_is_one_full_resolution_res_block_on_the_input_conv_skip():
    net = make_unet(efficient_updown=True, final_block=True, attention_resolutions=())
    inputs = []
    for module in net.modules():
        if isinstance(module, ResBlock):
            module.register_forward_hook(lambda m, args, out: inputs.append(args[0]))
    x, t, _ = make_inputs(net)
    net(x, t)
    widths = [h.shape[-1] for h in inputs]
    assert widths.count(8) == 1 and widths[-1] == 8  # the last block, the only one at full resolution
    start = net.encoder.input_conv(x)
    assert torch.equal(inputs[-1][:, -start.shape[1]:], start)  # its input ends with the input conv's output
    assert net.control_shapes(8, 8)[0] == (8, 8, 8)  # a ControlNet adds to that skip as well
    with pytest.raises(ValueError, match="final_block = true needs efficient_updown = true"):
        make_unet(final_block=True)


def test_num_res_blocks_per_level_sets_block_counts():
    net = make_unet(num_res_blocks=(1, 3), attention_resolutions=())
    res_blocks = sum(isinstance(m, ResBlock) for m in net.modules())
    # down: 1 + 3, up: 2 + 4, middle: 2
    assert res_blocks == 12
    factors = [f for _, f in net.encoder.skip_specs]
    assert factors == [1, 1, 2, 2, 2, 2]


# --------------------------------------------------------------------------- time embedding


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 1.0, 2.5, 999.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.tensor([10000 ** (-i / 4) for i in range(4)])
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb, expected, rtol=0, atol=1e-5)
    assert timestep_embedding(t, 7)[:, -1].eq(0).all()


def test_timestep_forms_are_equivalent():
    net = make_unet()
    perturb_zero_params_(net)
    x = torch.randn(3, 3, 8, 8)
    reference = net(x, torch.full((3,), 7.0))
    for t in (7, 7.0, torch.tensor(7), torch.tensor(7.0), torch.full((3,), 7, dtype=torch.long)):
        assert torch.equal(net(x, t), reference)
    assert not torch.allclose(net(x, 7.5), reference)  # fractional t is used as is
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        net(x, torch.zeros(2))
    with pytest.raises(ValueError, match="bool"):
        net(x, True)


# --------------------------------------------------------------------------- attention


def _without_group_norm(net: nn.Module) -> nn.Module:
    """Replace every GroupNorm by Identity (test-only surgery).

    GroupNorm statistics are taken over all positions, so they connect every pixel to
    every other one; without them a conv-only U-Net has a strict, finite receptive field.
    """
    for module in list(net.modules()):
        for child_name, child in module.named_children():
            if isinstance(child, nn.GroupNorm):
                setattr(module, child_name, nn.Identity())
    return net


@pytest.mark.parametrize(
    "attention",
    [dict(attention_resolutions=(1,)), dict(attention_resolutions=(), mid_attention=True)],
    ids=["level_attention", "middle_attention"],
)
def test_attention_sees_far_pixels_that_convolutions_cannot(attention):
    # One level, one block: the conv receptive field has radius 12 < 16 pixels.
    shape = dict(channel_mult=(1,), num_res_blocks=1, mid_attention=False)
    x = torch.randn(1, 3, 24, 24, dtype=torch.float64)
    far = x.clone()
    far[:, :, 16:, 16:] = far[:, :, 16:, 16:].flip(-1).flip(-2)  # permute far positions
    changes = {}
    for label, options in (("conv_only", dict(attention_resolutions=())), ("attention", attention)):
        net = make_unet(**{**shape, **options})
        perturb_zero_params_(net)
        net = _without_group_norm(net).double()
        delta = net(far, 3) - net(x, 3)
        changes[label] = delta[:, :, :2, :2].abs().max().item()
    assert changes["conv_only"] < 1e-12
    assert changes["attention"] > 1e-6


def test_self_attention_is_permutation_equivariant():
    """Global attention has no notion of position: permuting pixels permutes the output."""
    torch.manual_seed(0)
    block = SpatialSelfAttention(8, num_heads=2, norm_groups=4, skip_rescale=False).double()
    perturb_zero_params_(block)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    perm = torch.randperm(16)

    def permute(img):
        return img.flatten(2)[:, :, perm].reshape(img.shape)

    out = block(x)
    torch.testing.assert_close(block(permute(x)), permute(out), rtol=0, atol=1e-12)
    assert (out - x).abs().max() > 1e-3  # the attention branch is active


def test_skip_rescale_divides_the_residual_sum_by_sqrt2():
    torch.manual_seed(0)
    plain = ResBlock(8, 16, 12, norm_groups=4)
    perturb_zero_params_(plain)
    rescaled = ResBlock(8, 16, 12, norm_groups=4, skip_rescale=True)
    rescaled.load_state_dict(plain.state_dict())
    x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 12)
    torch.testing.assert_close(rescaled(x, emb), plain(x, emb) / math.sqrt(2))


# --------------------------------------------------------------------------- conditioning


@pytest.mark.parametrize("pooled", [False, True])
def test_cross_attention_ignores_padded_context_tokens(pooled):
    net = make_unet(context_dim=6, attention_resolutions=(1, 2), pooled_context=pooled)
    perturb_zero_params_(net)
    x = torch.randn(2, 3, 8, 8)
    context = torch.randn(2, 5, 6)
    mask = torch.tensor([[True, True, True, False, False], [False] * 5])
    reference = net(x, 10, {"context": context, "context_mask": mask})
    garbage = context.clone()
    garbage[~mask] = torch.randn(int((~mask).sum()), 6) * 1e3
    garbage[1, 0] = float("nan")
    out = net(x, 10, {"context": garbage, "context_mask": mask})
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
    # ... while a real token does matter.
    changed = context.clone()
    changed[0, 1] += 1.0
    out = net(x, 10, {"context": changed, "context_mask": mask})
    assert not torch.allclose(out[0], reference[0])


def test_masked_mean_averages_the_real_tokens_only():
    context = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [float("nan"), 1e9]], [[5.0, 5.0]] * 3])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    torch.testing.assert_close(masked_mean(context, mask), torch.tensor([[2.0, 4.0], [0.0, 0.0]]))
    torch.testing.assert_close(masked_mean(context[1:], None), torch.tensor([[5.0, 5.0]]))


def test_pooled_context_is_a_projected_mean_added_to_the_time_embedding():
    net = make_unet(context_dim=6, pooled_context=True)
    perturb_zero_params_(net)
    x, t, cond = make_inputs(net)
    emb = net.time_embed(t) + net.context_embed(masked_mean(cond["context"], cond["context_mask"]))
    seen = {}
    net.encoder.register_forward_hook(lambda module, args, out: seen.update(emb=args[1]))
    out = net(x, t, cond)
    torch.testing.assert_close(seen["emb"], emb)
    # without the projection it is exactly the cross-attention-only U-Net with the same weights
    plain = make_unet(context_dim=6)
    missing, unexpected = plain.load_state_dict(net.state_dict(), strict=False)
    assert missing == [] and unexpected == ["context_embed.weight", "context_embed.bias"]
    assert not torch.allclose(plain(x, t, cond), out)
    nn.init.zeros_(net.context_embed.weight), nn.init.zeros_(net.context_embed.bias)
    torch.testing.assert_close(net(x, t, cond), plain(x, t, cond))


def test_coordinate_channels_give_the_input_conv_each_pixels_position():
    maps = coordinate_maps(torch.zeros(2, 3, 4, 6))
    assert maps.shape == (2, 2, 4, 6)
    torch.testing.assert_close(maps[1, 0, 3], torch.linspace(-1, 1, 6))  # x along the width
    torch.testing.assert_close(maps[1, 1, :, 5], torch.linspace(-1, 1, 4))  # y down the height
    net = make_unet(coordinate_channels=True)
    perturb_zero_params_(net)
    x, t, _ = make_inputs(net)
    plain = make_unet()
    state = net.state_dict()
    state["encoder.input_conv.weight"] = state["encoder.input_conv.weight"][:, :3]
    plain.load_state_dict(state)
    assert not torch.allclose(net(x, t), plain(x, t))
    with torch.no_grad():  # with the coordinate inputs' weights at 0 it is the plain U-Net
        net.encoder.input_conv.weight[:, 3:] = 0
    torch.testing.assert_close(net(x, t), plain(x, t))


def test_missing_context_mask_means_all_tokens_are_real():
    net = make_unet(context_dim=6)
    perturb_zero_params_(net)
    x, context = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 6)
    full = torch.ones(2, 5, dtype=torch.bool)
    torch.testing.assert_close(
        net(x, 3, {"context": context}), net(x, 3, {"context": context, "context_mask": full})
    )


def test_null_class_label_and_no_label_dropout_inside_the_network():
    net = make_unet(num_classes=4)
    perturb_zero_params_(net)
    x = torch.randn(2, 3, 8, 8)
    null = torch.full((2,), 4)
    out_null = net(x, 5, {"y": null})
    out_real = net(x, 5, {"y": torch.tensor([0, 3])})
    assert torch.isfinite(out_null).all()
    assert not torch.allclose(out_null, out_real)
    # class_dropout_prob is the training task's rate (difflab.train.tasks.conditions): the
    # network sees the labels it is given, in training mode too, even at rate 1
    dropping = make_unet(num_classes=4, class_dropout_prob=1.0)
    dropping.load_state_dict(net.state_dict())
    dropping.train()
    torch.testing.assert_close(dropping(x, 5, {"y": torch.tensor([0, 3])}), out_real, rtol=0, atol=0)
    torch.testing.assert_close(dropping(x, 5, {"y": null}), out_null, rtol=0, atol=0)
    dropping.eval()
    torch.testing.assert_close(dropping(x, 5, {"y": torch.tensor([0, 3])}), out_real, rtol=0, atol=0)


def test_concat_channels_are_used():
    net = make_unet(concat_channels=2)
    perturb_zero_params_(net)
    x, extra = torch.randn(2, 3, 8, 8), torch.randn(2, 2, 8, 8)
    assert not torch.allclose(net(x, 1, {"concat": extra}), net(x, 1, {"concat": extra * 2}))


def test_dropout_is_active_only_in_training():
    net = make_unet(dropout=0.5)
    perturb_zero_params_(net)
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(5)
    first = net(x, 1)
    assert not torch.allclose(first, net(x, 1))
    net.eval()
    assert torch.equal(net(x, 1), net(x, 1))


def test_channels_last_input_gives_the_same_output():
    net = make_unet()
    perturb_zero_params_(net)
    x = torch.randn(2, 3, 8, 8)
    reference = net(x, 4)
    net = net.to(memory_format=torch.channels_last)
    out = net(x.to(memory_format=torch.channels_last), 4)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "cond_fn, message",
    [
        (lambda x: {"y": torch.zeros(2, dtype=torch.long)}, r"unknown cond keys \['y'\].*control"),
        (lambda x: {"context": torch.zeros(2, 3, 4)}, r"unknown cond keys \['context'\]"),
        (lambda x: {"colour": 1}, r"accepts \['control'\]"),
        (lambda x: {"control": [torch.zeros(2, 8, 8, 8)]}, "list of 5 tensors"),
        (lambda x: "y", "must be a dict"),
    ],
)
def test_bad_cond_raises_value_error(cond_fn, message):
    net = make_unet()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=message):
        net(x, 1, cond_fn(x))


def test_bad_conditioning_values_raise():
    net = make_unet(num_classes=4, context_dim=6, concat_channels=1)
    x = torch.randn(2, 3, 8, 8)
    good = {
        "y": torch.tensor([0, 1]), "context": torch.randn(2, 3, 6),
        "concat": torch.randn(2, 1, 8, 8),
    }
    net(x, 1, good)
    cases = [
        ({"y": None}, r'needs cond\["y"\]'),
        ({"y": torch.tensor([0, 5])}, r"\[0, 4\].*max 5"),
        ({"y": torch.tensor([-1, 0])}, "min -1"),
        ({"y": torch.tensor([0.0, 1.0])}, "integer"),
        ({"y": torch.tensor([0])}, r"shape \(2,\)"),
        ({"context": None}, r'needs cond\["context"\]'),
        ({"context": torch.randn(2, 3, 5)}, r"\(2, L, 6\)"),
        ({"context_mask": torch.ones(2, 3)}, "bool"),
        ({"context_mask": torch.ones(2, 4, dtype=torch.bool)}, r"shape \(2, 3\)"),
        ({"concat": torch.randn(2, 2, 8, 8)}, r"\(2, 1, 8, 8\)"),
        ({"concat": None}, r'needs cond\["concat"\]'),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            net(x, 1, {**good, **change})


def test_bad_images_raise():
    net = make_unet()
    with pytest.raises(ValueError, match="3 input channels, got 4"):
        net(torch.randn(2, 4, 8, 8), 1)
    with pytest.raises(ValueError, match="multiples of 2, got 7x8"):
        net(torch.randn(2, 3, 7, 8), 1)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        net(torch.randn(3, 8, 8), 1)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(norm_groups=3), "not divisible by norm_groups=3"),
        (dict(attention_resolutions=(4,)), r"entry 4 .* allowed: \[1, 2\]"),
        (dict(num_res_blocks=(1, 2, 3)), "3 entries but channel_mult has 2"),
        (dict(num_heads=3), "not divisible by num_heads=3"),
        (dict(num_head_channels=5), "not divisible by num_head_channels=5"),
        (dict(channel_mult=()), "channel_mult must not be empty"),
        (dict(learn_sigma=1), "learn_sigma must be a bool"),
        (dict(model_channels=True), "model_channels must be an int"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(context_dim=4, attention_resolutions=(), mid_attention=False), "somewhere to attend"),
        (dict(pooled_context=True), "pooled_context needs context_dim"),
        (dict(coordinate_channels=1), "coordinate_channels must be a bool"),
        (dict(widht=3), r"unknown UNetConfig keys \['widht'\]; allowed keys: \['in_channels'"),
    ],
)
def test_bad_config_raises_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        UNet({**TINY, **overrides})


def test_config_accepts_lists_and_overrides():
    net = UNet({**TINY, "channel_mult": [1, 2]}, learn_sigma=True)
    assert net.config.channel_mult == (1, 2)
    assert net.config == UNetConfig(**{**TINY, "learn_sigma": True})
