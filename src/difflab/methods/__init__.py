"""Training methods beyond plain denoising: losses and helpers a training Task calls.

``latent``: perceptual compression for latent diffusion (autoencoder and discriminator
losses, cached latents, PSNR).
"""

from difflab.methods.latent import (
    AutoencoderLossConfig,
    LatentCache,
    autoencoder_loss,
    discriminator_loss,
    encode_dataset,
    psnr,
    reconstruction_loss,
)

__all__ = [
    "AutoencoderLossConfig",
    "LatentCache",
    "autoencoder_loss",
    "discriminator_loss",
    "encode_dataset",
    "psnr",
    "reconstruction_loss",
]
