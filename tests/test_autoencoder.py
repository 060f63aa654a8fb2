"""Autoencoder networks: shapes, the KL posterior, the vector quantizer, the latent scale,
the PatchGAN discriminator and save/load round trips."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from difflab.nets.autoencoder import Autoencoder, AutoencoderConfig, DiagonalGaussian
from difflab.nets.base import ConfigModule, build_network, load_network
from difflab.nets.discriminator import PatchDiscriminator
from difflab.nets.quantizer import VectorQuantizer, perplexity

TINY = dict(model_channels=8, num_res_blocks=1, norm_groups=4, latent_channels=3)




def randomise_(net, seed=7):
    """Every parameter random (zero-initialised convs too), so nothing passes by being zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return net


# --------------------------------------------------------------------------- shapes and config


@pytest.mark.parametrize("regularization", ["kl", "vq"])
@pytest.mark.parametrize("channel_mult, f", [((1,), 1), ((1, 2), 2), ((1, 2, 2), 4), ((1, 1, 2, 2), 8)])
@pytest.mark.parametrize("latent_channels", [1, 4])
def test_latent_and_output_shapes(regularization, channel_mult, f, latent_channels):
    torch.manual_seed(0)
    config = {**TINY, "latent_channels": latent_channels, "out_channels": 2}
    net = Autoencoder(config, channel_mult=channel_mult, regularization=regularization, num_codes=8)
    x = torch.randn(2, 3, 16, 24)
    assert net.downsampling_factor == f
    assert net.latent_shape(16, 24) == (latent_channels, 16 // f, 24 // f)
    encoded = net.encode(x)
    z = encoded.sample() if regularization == "kl" else encoded
    if regularization == "kl":
        assert encoded.mean.shape == encoded.logvar.shape == (2, latent_channels, 16 // f, 24 // f)
    assert z.shape == (2, latent_channels, 16 // f, 24 // f)
    assert net.decode(z).shape == (2, 2, 16, 24)
    assert net(x).reconstruction.shape == (2, 2, 16, 24)


def test_attention_levels_add_attention_layers():
    plain = Autoencoder(TINY, channel_mult=(1, 2), mid_attention=False)
    attended = Autoencoder(TINY, channel_mult=(1, 2), mid_attention=False, attention_resolutions=(2,))
    count = lambda net: sum(type(m).__name__ == "SpatialSelfAttention" for m in net.modules())  # noqa: E731
    # one attention per res block at factor 2: 1 in the encoder, num_res_blocks + 1 = 2 in the decoder
    assert (count(plain), count(attended)) == (0, 3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"regularization": "gauss"}, "regularization must be one of"),
        ({"attention_resolutions": (4,)}, "attention_resolutions entry 4"),
        ({"norm_groups": 3}, "not divisible by norm_groups=3"),
        ({"channel_mult": ()}, "channel_mult must not be empty"),
        ({"commitment_beta": -1.0}, "commitment_beta must be a number >= 0"),
        ({"latent_channels": 0}, "latent_channels must be >= 1"),
        ({"scale": 2.0}, "unknown AutoencoderConfig keys"),
    ],
)
def test_bad_config_is_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        AutoencoderConfig.from_dict({**TINY, "channel_mult": (1, 2), **overrides})


def test_bad_inputs_are_rejected():
    net = Autoencoder(TINY, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="multiples of f=4"):
        net.encode(torch.randn(1, 3, 10, 8))
    with pytest.raises(ValueError, match="expects 3 input channels"):
        net.encode(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"float \(B, 3, h, w\) latent"):
        net.decode(torch.randn(1, 4, 2, 2))
    with pytest.raises(ValueError, match='needs a VQ autoencoder'):
        net.quantize(torch.randn(1, 3, 2, 2))


# --------------------------------------------------------------------------- KL posterior


def test_kl_equals_closed_form():
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 2, 4, 5, generator=gen, dtype=torch.float64)
    logvar = torch.randn(3, 2, 4, 5, generator=gen, dtype=torch.float64)
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    expected = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    torch.testing.assert_close(posterior.kl(), expected, rtol=1e-12, atol=1e-12)
    # and the textbook KL(N(mu, sigma^2) || N(0, 1)), computed independently by torch.distributions
    reference = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(posterior.kl(), reference, rtol=1e-10, atol=1e-10)


def test_kl_is_zero_at_the_prior_and_logvar_is_clamped():
    assert torch.equal(DiagonalGaussian(torch.zeros(2, 4, 3, 3)).kl(), torch.zeros(2))
    posterior = DiagonalGaussian(torch.cat([torch.zeros(1, 1, 1, 2), torch.tensor([[[[100.0, -100.0]]]])], dim=1))
    assert posterior.logvar.flatten().tolist() == [20.0, -30.0]
    torch.testing.assert_close(posterior.var.flatten(), torch.tensor([math.exp(20.0), math.exp(-30.0)]))
    assert torch.isfinite(posterior.kl()).all()


def test_posterior_sample_is_reparameterised():
    params = torch.randn(2, 6, 3, 3, requires_grad=True)
    posterior = DiagonalGaussian(params)
    sample = posterior.sample(torch.Generator().manual_seed(5))
    noise = torch.randn(2, 3, 3, 3, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(sample, posterior.mean + posterior.std * noise)
    assert torch.equal(posterior.mode(), params[:, :3])
    sample.sum().backward()  # d sample / d mean = 1, d sample / d logvar = 0.5 * std * noise
    torch.testing.assert_close(params.grad[:, :3], torch.ones(2, 3, 3, 3))
    torch.testing.assert_close(params.grad[:, 3:], (0.5 * posterior.std * noise).detach())


# --------------------------------------------------------------------------- vector quantizer


def test_quantizer_picks_the_nearest_code():
    gen = torch.Generator().manual_seed(1)
    quantizer = VectorQuantizer(num_codes=16, dim=3, dead_code_patience=0)
    with torch.no_grad():
        quantizer.codebook.copy_(torch.randn(16, 3, generator=gen))
    z = torch.randn(2, 3, 5, 4, generator=gen)
    out = quantizer(z)
    vectors = z.permute(0, 2, 3, 1).reshape(-1, 3)
    brute = torch.stack([((quantizer.codebook - v).pow(2).sum(1)).argmin() for v in vectors])
    assert torch.equal(out.indices.flatten(), brute)
    assert torch.equal(out.quantized, quantizer.codebook[brute].view(2, 5, 4, 3).permute(0, 3, 1, 2).detach())
    assert torch.equal(quantizer.lookup(out.indices), out.quantized)


def test_straight_through_passes_the_decoder_gradient_unchanged():
    quantizer = VectorQuantizer(num_codes=8, dim=2, dead_code_patience=0)
    z = torch.randn(2, 2, 3, 3, requires_grad=True)
    upstream = torch.randn(2, 2, 3, 3)
    quantizer(z).quantized.backward(upstream)
    assert torch.equal(z.grad, upstream)
    assert quantizer.codebook.grad is None  # the reconstruction gradient never reaches the codes


def test_codebook_loss_moves_only_codes_and_commitment_only_the_encoder():
    gen = torch.Generator().manual_seed(2)
    quantizer = VectorQuantizer(num_codes=4, dim=2, beta=0.25, dead_code_patience=0)
    with torch.no_grad():
        quantizer.codebook.copy_(torch.randn(4, 2, generator=gen))
    z = torch.randn(3, 2, 2, 2, generator=gen, requires_grad=True)
    out = quantizer(z)
    codes = quantizer.codebook[out.indices].permute(0, 3, 1, 2).detach()
    per_example = 2 * 2 * 2  # latent elements averaged over

    out.codebook_loss.sum().backward(retain_graph=True)
    assert z.grad is None
    expected = torch.zeros(4, 2)  # d/de_k sum_p 1[p -> k] (e_k - z_p)^2 / n = 2 (e_k - z_p) / n
    vectors = z.detach().permute(0, 2, 3, 1).reshape(-1, 2)
    for k, v in zip(out.indices.flatten().tolist(), vectors):
        expected[k] += 2 * (quantizer.codebook[k].detach() - v) / per_example
    torch.testing.assert_close(quantizer.codebook.grad, expected)

    quantizer.codebook.grad = None
    out.commitment_loss.sum().backward()
    assert quantizer.codebook.grad is None
    torch.testing.assert_close(z.grad, 2 * (z.detach() - codes) / per_example)
    torch.testing.assert_close(out.loss, out.codebook_loss + 0.25 * out.commitment_loss)


def _exact_codes_input(quantizer, assignment):
    """A (1, dim, 1, n) latent whose n vectors are exactly the codes ``assignment``."""
    return quantizer.codebook.detach()[torch.tensor(assignment)].T[None, :, None, :].clone()


def test_perplexity_equals_closed_form():
    quantizer = VectorQuantizer(num_codes=8, dim=3, dead_code_patience=0)
    with torch.no_grad():
        quantizer.codebook.copy_(torch.eye(8, 3) * 5 + torch.arange(8.0)[:, None])
    out = quantizer(_exact_codes_input(quantizer, [0, 1, 2, 3] * 3))  # uniform over k = 4 codes
    assert out.indices.flatten().tolist() == [0, 1, 2, 3] * 3
    assert out.perplexity.item() == pytest.approx(4.0, rel=1e-6)
    assert out.usage.item() == 0.5
    # frequencies (1/2, 1/4, 1/4): entropy 1.5 ln 2, perplexity 2^1.5
    assert perplexity(torch.tensor([2, 1, 1, 0])).item() == pytest.approx(2**1.5, rel=1e-6)
    assert perplexity(torch.tensor([5, 0, 0])).item() == pytest.approx(1.0)


def test_dead_code_is_restarted_from_encoder_outputs():
    quantizer = VectorQuantizer(num_codes=4, dim=2, dead_code_patience=2).train()
    with torch.no_grad():
        quantizer.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]]))
    z = torch.tensor([[0.1, 0.0], [0.9, 0.1], [0.0, 1.2], [0.2, 0.8], [1.1, -0.1], [0.05, 0.05]]).T[None, :, None, :]
    for expected_unused in (1, 2):
        quantizer(z, torch.Generator().manual_seed(0))
        assert quantizer.unused_steps.tolist() == [0, 0, 0, expected_unused]
    assert quantizer.codebook[3].tolist() == [100.0, 100.0]  # not restarted before the patience runs out
    out = quantizer(z, torch.Generator().manual_seed(0))
    restarted = quantizer.codebook[3].detach()
    vectors = z[0, :, 0, :].T
    assert any(torch.equal(restarted, v) for v in vectors)  # moved exactly onto an encoder output
    assert 3 in out.indices.flatten().tolist()  # and picked again in the same call
    assert quantizer.unused_steps[3].item() == 0


def test_quantizer_keeps_its_counters_outside_training():
    quantizer = VectorQuantizer(num_codes=4, dim=2, dead_code_patience=1)
    with torch.no_grad():
        quantizer.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]]))
    codebook = quantizer.codebook.detach().clone()
    z = torch.rand(1, 2, 3, 3)
    quantizer.eval()(z)
    quantizer.train().snap(z)
    assert quantizer.unused_steps.tolist() == [0, 0, 0, 0]
    assert torch.equal(quantizer.codebook, codebook)
    with pytest.raises(ValueError, match=r"float z of shape \(B, 2, h, w\)"):
        quantizer(torch.rand(1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"indices must be in \[0, 3\]"):
        quantizer.lookup(torch.full((1, 2, 2), 4))


def test_vq_decode_quantizes_first():
    torch.manual_seed(0)
    net = randomise_(Autoencoder(TINY, channel_mult=(1, 2), regularization="vq", num_codes=6)).train()
    z = net.encode(torch.randn(2, 3, 8, 8)).detach()
    indices = net.quantizer.nearest(z.permute(0, 2, 3, 1).reshape(-1, 3)).view(2, 4, 4)
    codes = net.quantizer.lookup(indices)
    assert torch.equal(net.decode(z), net.decoder(codes))
    assert net.quantizer.unused_steps.sum().item() == 0  # decoding is not training


# --------------------------------------------------------------------------- latent scale


@pytest.mark.parametrize("regularization", ["kl", "vq"])
def test_scale_factor_makes_latents_unit_variance(regularization):
    torch.manual_seed(0)
    net = randomise_(Autoencoder(TINY, channel_mult=(1, 2), regularization=regularization)).eval()
    x = torch.randn(6, 3, 8, 8)
    latents = net.latent(x)
    scale = net.compute_scale_factor(latents)
    assert scale == pytest.approx(1.0 / latents.double().std().item(), rel=1e-6)
    assert net.scale_factor.item() == scale
    assert net.encode_scaled(x).std().item() == pytest.approx(1.0, rel=1e-5)
    assert net.encode_scaled(x).shape == latents.shape
    torch.testing.assert_close(net.decode_scaled(net.encode_scaled(x)), net.decode(latents), rtol=1e-5, atol=1e-5)


def test_scale_factor_rejects_degenerate_latents():
    net = Autoencoder(TINY, channel_mult=(1, 2))
    with pytest.raises(ValueError, match="finite, positive standard deviation"):
        net.compute_scale_factor(torch.ones(2, 3, 4, 4))
    with pytest.raises(ValueError, match="at least 2 latent values"):
        net.compute_scale_factor(torch.ones(1))


# --------------------------------------------------------------------------- discriminator


def test_patch_discriminator_output_map():
    torch.manual_seed(0)
    for layers, size in ((1, 16), (2, 16), (3, 32)):
        net = PatchDiscriminator(base_channels=4, num_layers=layers)
        assert net(torch.randn(2, 3, size, size + 8)).shape == (2, 1, *net.output_size(size, size + 8))
        assert net.output_size(size, size + 8) == (size // 2**layers - 2, (size + 8) // 2**layers - 2)
    with pytest.raises(ValueError, match="needs H and W >= 24"):
        PatchDiscriminator(base_channels=4, num_layers=3)(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="norm must be one of"):
        PatchDiscriminator(norm="layer")


# --------------------------------------------------------------------------- save / load


def _scaled_autoencoder(regularization):
    torch.manual_seed(3)
    net = randomise_(Autoencoder(TINY, channel_mult=(1, 2), regularization=regularization, num_codes=5))
    net.compute_scale_factor(torch.randn(100) * 3.7)
    if net.quantizer is not None:
        net.quantizer.unused_steps.copy_(torch.tensor([0, 3, 1, 4, 2]))
    return net.eval()


@pytest.mark.parametrize("regularization", ["kl", "vq"])
def test_autoencoder_round_trip_is_bit_identical(regularization, tmp_path):
    net = _scaled_autoencoder(regularization)
    net.save_pretrained(tmp_path)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for loaded in (Autoencoder.from_pretrained(tmp_path), ConfigModule.from_pretrained(tmp_path),
                   load_network(tmp_path)):
        assert type(loaded) is Autoencoder and loaded.config == net.config
        assert loaded.scale_factor.item() == net.scale_factor.item() != 1.0
        for name, tensor in net.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
        assert torch.equal(loaded.encode_scaled(x), net.encode_scaled(x))
        assert torch.equal(loaded.decode_scaled(net.encode_scaled(x)), net.decode_scaled(net.encode_scaled(x)))


def test_discriminator_round_trip_and_build(tmp_path):
    torch.manual_seed(0)
    net = PatchDiscriminator(base_channels=4, num_layers=2)
    net(torch.randn(4, 3, 16, 16))  # moves the batch-norm running statistics off their defaults
    net.eval().save_pretrained(tmp_path)
    loaded = load_network(tmp_path)
    x = torch.randn(2, 3, 16, 16)
    assert type(loaded) is PatchDiscriminator and torch.equal(loaded(x), net(x))
    built = build_network({"class": "PatchDiscriminator", "base_channels": 4, "num_layers": 2})
    assert built.config == net.config
    assert type(build_network({"class": "Autoencoder", **TINY})) is Autoencoder
