"""Perceptual compression: GAN losses, the adaptive weight, the autoencoder and discriminator
objectives, PSNR, cached latents and a tiny autoencoder that overfits a few images."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from difflab.methods.latent import (
    AutoencoderLossConfig,
    autoencoder_loss,
    discriminator_loss,
    encode_dataset,
    psnr,
    reconstruction_loss,
)
from difflab.nets.autoencoder import Autoencoder
from difflab.nets.discriminator import PatchDiscriminator, adaptive_weight, gan_active, hinge_d_loss, hinge_g_loss

TINY = dict(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4, latent_channels=4)




def tiny_pair(regularization="kl", seed=0):
    torch.manual_seed(seed)
    autoencoder = Autoencoder(TINY, regularization=regularization, num_codes=8)
    with torch.no_grad():  # move the zero-initialised convs off zero so every path carries gradient
        for param in autoencoder.parameters():
            param.add_(torch.randn(param.shape) * 0.05)
    discriminator = PatchDiscriminator(base_channels=4, num_layers=1, norm="none")
    return autoencoder, discriminator


# --------------------------------------------------------------------------- GAN pieces


def test_hinge_losses_on_known_logits():
    real = torch.tensor([[2.0, 0.5], [-1.0, 1.0]])[:, None, :, None]  # (B=2, 1, 2, 1) logit maps
    fake = torch.tensor([[-2.0, 0.0], [1.0, -0.5]])[:, None, :, None]
    # relu(1 - real) = [[0, .5], [2, 0]] -> means [.25, 1]; relu(1 + fake) = [[0, 1], [2, .5]] -> [.5, 1.25]
    assert hinge_d_loss(real, fake).tolist() == [0.5 * (0.25 + 0.5), 0.5 * (1.0 + 1.25)]
    assert hinge_g_loss(fake).tolist() == [1.0, -0.25]
    # past the margins (real >= 1, fake <= -1) the discriminator loss is exactly 0
    assert hinge_d_loss(torch.full((3, 1, 2, 2), 1.0), torch.full((3, 1, 2, 2), -4.0)).tolist() == [0.0] * 3


def test_adaptive_weight_is_the_gradient_norm_ratio():
    w = torch.tensor([[3.0, 0.0], [0.0, 4.0]], requires_grad=True)  # ||w|| = 5
    a = torch.tensor([[1.0, 2.0], [2.0, 0.0]])  # ||a|| = 3
    rec = 0.5 * w.pow(2).sum()  # d rec / dw = w
    gan = (a * w).sum()  # d gan / dw = a
    weight = adaptive_weight(rec, gan, w)
    assert weight.item() == pytest.approx(5.0 / (3.0 + 1e-4), rel=1e-6)
    assert not weight.requires_grad
    w.grad = None
    (rec + gan).backward()  # the graphs were kept for the real backward pass
    torch.testing.assert_close(w.grad, w.detach() + a)


def test_adaptive_weight_is_clamped():
    w = torch.ones(4, requires_grad=True)
    assert adaptive_weight(w.sum() * 10, w.sum() * 0, w).item() == 1e4  # ||20|| / 1e-4 > 1e4
    assert adaptive_weight(w.sum() * 0, w.sum(), w).item() == 0.0
    with pytest.raises(ValueError, match="generator_loss must be a scalar"):
        adaptive_weight(w.sum(), w * 2, w)


def test_gan_switches_on_at_disc_start():
    assert [gan_active(step, 3) for step in (0, 2, 3, 4)] == [False, False, True, True]
    with pytest.raises(ValueError, match="step must be >= 0"):
        gan_active(-1, 3)


# --------------------------------------------------------------------------- autoencoder objective


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_kl_loss_before_disc_start_is_reconstruction_plus_weighted_kl(kind):
    autoencoder, discriminator = tiny_pair()
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    output = autoencoder(x, generator=torch.Generator().manual_seed(0))
    config = AutoencoderLossConfig(reconstruction=kind, kl_weight=1e-3, disc_start=5)
    loss, logs = autoencoder_loss(x, output, config=config, step=4, discriminator=discriminator)
    error = (output.reconstruction - x).detach()
    rec = (error.abs() if kind == "l1" else error.pow(2)).mean(dim=(1, 2, 3))
    expected = rec + 1e-3 * output.posterior.kl().detach() / (3 * 8 * 8)
    torch.testing.assert_close(loss.detach(), expected)
    assert logs["g_loss"].item() == 0.0 and logs["gan_weight"].item() == 0.0


def test_gan_term_is_adaptively_weighted_and_leaves_the_discriminator_alone():
    autoencoder, discriminator = tiny_pair()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    output = autoencoder(x, sample_posterior=False)
    config = AutoencoderLossConfig(disc_start=0, disc_weight=0.5, kl_weight=0.0)
    loss, logs = autoencoder_loss(
        x, output, config=config, step=0, discriminator=discriminator, last_layer=autoencoder.last_layer
    )
    rec = reconstruction_loss(x, output.reconstruction)
    g = -discriminator(output.reconstruction).flatten(1).mean(1)
    last = autoencoder.last_layer
    rec_norm = torch.autograd.grad(rec.mean(), last, retain_graph=True)[0].norm()
    g_norm = torch.autograd.grad(g.mean(), last, retain_graph=True)[0].norm()
    lam = (rec_norm / (g_norm + 1e-4)).item()
    assert logs["gan_weight"].item() == pytest.approx(0.5 * lam, rel=1e-5)
    torch.testing.assert_close(loss.detach(), (rec + 0.5 * lam * g).detach(), rtol=1e-5, atol=1e-6)
    assert lam > 0 and g.abs().max() > 0  # the GAN term really contributes

    loss.mean().backward()
    assert all(p.grad is None for p in discriminator.parameters())
    assert all(p.requires_grad for p in discriminator.parameters())  # unfrozen again
    assert autoencoder.last_layer.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs last_layer"):
        autoencoder_loss(x, autoencoder(x), config=config, step=0, discriminator=discriminator)


def test_vq_loss_adds_weighted_codebook_and_commitment():
    autoencoder, _ = tiny_pair("vq")
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    output = autoencoder.train()(x)
    loss, logs = autoencoder_loss(x, output, config=AutoencoderLossConfig(codebook_weight=2.0), step=0)
    q = output.quantized
    expected = reconstruction_loss(x, output.reconstruction) + 2.0 * (q.codebook_loss + 0.25 * q.commitment_loss)
    torch.testing.assert_close(loss, expected)
    assert 1.0 <= logs["perplexity"].item() <= 8.0 and 0 < logs["codebook_usage"].item() <= 1.0


def test_perceptual_term_needs_a_callable():
    autoencoder, _ = tiny_pair()
    x = torch.rand(2, 3, 8, 8)
    output = autoencoder(x, sample_posterior=False)
    config = AutoencoderLossConfig(perceptual_weight=0.5, kl_weight=0.0)
    with pytest.raises(ValueError, match="perceptual_weight=0.5 needs an LPIPS callable"):
        autoencoder_loss(x, output, config=config, step=0)
    fake_lpips = lambda a, b: (a - b).pow(2).sum(dim=(1, 2, 3))  # noqa: E731
    loss, logs = autoencoder_loss(x, output, config=config, step=0, perceptual=fake_lpips)
    expected = reconstruction_loss(x, output.reconstruction) + 0.5 * fake_lpips(x, output.reconstruction)
    torch.testing.assert_close(loss, expected)
    assert "perceptual_loss" in logs


def test_loss_config_rejects_bad_values():
    with pytest.raises(ValueError, match="reconstruction must be one of"):
        AutoencoderLossConfig(reconstruction="l3")
    with pytest.raises(ValueError, match="kl_weight must be a finite number >= 0"):
        AutoencoderLossConfig(kl_weight=-1.0)
    with pytest.raises(ValueError, match="disc_start must be an int >= 0"):
        AutoencoderLossConfig(disc_start=1.5)


# --------------------------------------------------------------------------- discriminator objective


class _Refuses(nn.Module):
    def forward(self, x):
        raise AssertionError("the discriminator must not run before disc_start")


def test_discriminator_loss_is_hinge_on_detached_reconstructions():
    autoencoder, discriminator = tiny_pair()
    config = AutoencoderLossConfig(disc_start=3)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    reconstruction = autoencoder(x).reconstruction
    loss, _ = discriminator_loss(_Refuses(), x, reconstruction, config=config, step=2)
    assert loss.tolist() == [0.0, 0.0]

    loss, logs = discriminator_loss(discriminator, x, reconstruction, config=config, step=3)
    expected = hinge_d_loss(discriminator(x), discriminator(reconstruction))
    torch.testing.assert_close(loss, expected)
    loss.mean().backward()
    assert all(p.grad is None for p in autoencoder.parameters())
    assert all(p.grad is not None for p in discriminator.parameters())
    assert logs["logits_real"].item() == pytest.approx(discriminator(x).mean().item(), rel=1e-6)


# --------------------------------------------------------------------------- metrics and caches


def test_psnr_closed_form():
    x = torch.zeros(2, 3, 4, 4)
    y = torch.stack([torch.full((3, 4, 4), 0.1), torch.full((3, 4, 4), -0.2)])
    # MSE 0.01 and 0.04 on a range of 2: 10 log10(4 / mse)
    torch.testing.assert_close(psnr(x, y), torch.tensor([10 * math.log10(400.0), 10 * math.log10(100.0)]))
    assert psnr(x, x).isinf().all()
    assert psnr(x, y, data_range=1.0)[0].item() == pytest.approx(20.0, rel=1e-6)
    with pytest.raises(ValueError, match="data_range must be a number > 0"):
        psnr(x, y, data_range=0)


class _DictDataset:
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"x": self.images[i], "y": 0}


def test_encode_dataset_caches_unit_variance_latents():
    autoencoder, _ = tiny_pair()
    autoencoder.train()
    images = torch.rand(7, 3, 8, 8) * 2 - 1
    cache = encode_dataset(autoencoder, images, batch_size=3)
    assert autoencoder.training  # mode restored
    assert cache.latents.shape == (7, 4, 4, 4) and not cache.latents.requires_grad
    assert cache.scale_factor == autoencoder.scale_factor.item()
    assert cache.latents.std().item() == pytest.approx(1.0, rel=1e-5)
    with torch.no_grad():
        expected = autoencoder.eval().encode_scaled(images)
    # batching changes float sums by ~1e-6 on these unit-variance latents
    torch.testing.assert_close(cache.latents, expected, rtol=1e-5, atol=1e-5)

    same = encode_dataset(autoencoder, _DictDataset(images), batch_size=64, rescale=False)
    assert same.scale_factor == cache.scale_factor
    assert cache.fields is None and same.fields == [{"y": 0}] * 7  # labels and captions travel along
    torch.testing.assert_close(same.latents, cache.latents, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        encode_dataset(autoencoder, images, batch_size=0)
    with pytest.raises(ValueError, match="empty data set"):
        encode_dataset(autoencoder, images[:0])


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("regularization", ["kl", "vq"])
def test_tiny_autoencoder_overfits_a_few_images(regularization):
    """40 Adam steps on 4 smooth 8x8 images cut the reconstruction MSE by at least 5x
    (measured: ~13x for KL, ~9x for VQ with this seed)."""
    torch.manual_seed(0)
    x = F.interpolate(torch.rand(4, 3, 3, 3) * 2 - 1, size=(8, 8), mode="bilinear", align_corners=True)
    net = Autoencoder(TINY, regularization=regularization, num_codes=32, dead_code_patience=5)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    config = AutoencoderLossConfig(reconstruction="l2")
    generator = torch.Generator().manual_seed(0)

    def mse():
        with torch.no_grad():
            return reconstruction_loss(x, net.eval()(x, sample_posterior=False).reconstruction, "l2").mean().item()

    before = mse()
    net.train()
    for step in range(40):
        loss, _ = autoencoder_loss(x, net(x, generator=generator), config=config, step=step)
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
    assert mse() < before / 5


def test_one_backward_of_both_objectives_gives_each_network_its_own_gradient():
    """What lets one optimizer train both nets: G's loss leaves D alone (frozen) and D's loss
    leaves the autoencoder alone (detached), so the sum's gradients are the separate ones."""
    autoencoder, discriminator = tiny_pair()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    config = AutoencoderLossConfig(disc_start=0, kl_weight=0.0)
    nets = list(autoencoder.parameters()) + list(discriminator.parameters())

    def losses():
        output = autoencoder(x, sample_posterior=False)
        g, _ = autoencoder_loss(x, output, config=config, step=0, discriminator=discriminator,
                                last_layer=autoencoder.last_layer)
        d, _ = discriminator_loss(discriminator, x, output.reconstruction, config=config, step=0)
        return g.mean(), d.mean()

    g, d = losses()
    separate = torch.autograd.grad(g, list(autoencoder.parameters())) + torch.autograd.grad(
        d, list(discriminator.parameters())
    )
    g, d = losses()
    combined = torch.autograd.grad(g + d, nets)
    for a, b in zip(separate, combined):
        torch.testing.assert_close(a, b)
