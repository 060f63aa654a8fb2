"""Training methods beyond plain denoising: losses and helpers a training Task calls.

``latent``: perceptual compression for latent diffusion (autoencoder and discriminator
losses, the autoencoder + discriminator pair trained as one module, LPIPS from local
weights, cached latents, PSNR, loading a trained autoencoder).
"""

from difflab.methods.latent import (
    AutoencoderGAN,
    AutoencoderLossConfig,
    LatentCache,
    LatentDataset,
    autoencoder_loss,
    discriminator_loss,
    encode_dataset,
    load_autoencoder,
    load_lpips,
    psnr,
    reconstruction_loss,
)

__all__ = [
    "AutoencoderGAN",
    "AutoencoderLossConfig",
    "LatentCache",
    "LatentDataset",
    "autoencoder_loss",
    "discriminator_loss",
    "encode_dataset",
    "load_autoencoder",
    "load_lpips",
    "psnr",
    "reconstruction_loss",
]
