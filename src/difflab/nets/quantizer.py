"""Vector quantization: the bottleneck of a VQ-regularised autoencoder (VQ-VAE, VQGAN).

Every latent vector (one position of a (B, C, h, w) latent) is replaced by its nearest
code in a learned codebook of K vectors of size C. The nearest-code choice has no
gradient, so a straight-through estimator hands the decoder's gradient to the encoder
unchanged. Two losses make up for it: the codebook loss ||e - sg[z]||^2 moves only the
codes towards the encoder outputs, the commitment loss beta * ||z - sg[e]||^2 moves only
the encoder towards its codes (sg = stop-gradient).

Codes that no encoder output picks for ``dead_code_patience`` training calls in a row
are "dead": they cannot learn (no output is near them), so they are moved onto encoder
outputs of the current batch, where they get picked again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .base import check_int


@dataclass
class Quantized:
    """What :class:`VectorQuantizer` returns for a (B, C, h, w) latent ``z``."""

    quantized: Tensor  # (B, C, h, w): the codes' values, with z's gradient (straight-through)
    indices: Tensor  # (B, h, w) long: the chosen code at each position
    codebook_loss: Tensor  # (B,) mean over latent elements of (e - sg[z])^2
    commitment_loss: Tensor  # (B,) mean over latent elements of (z - sg[e])^2
    loss: Tensor  # (B,) codebook_loss + beta * commitment_loss
    perplexity: Tensor  # scalar: exp(entropy of the batch's code frequencies); k for k equally used codes
    usage: Tensor  # scalar: fraction of the K codes used in this batch


def perplexity(counts: Tensor) -> Tensor:
    """exp(-sum p log p) of the code frequencies p = counts / sum(counts): the effective
    number of codes in use (uniform use of k codes gives exactly k)."""
    probs = counts.float() / counts.sum().clamp_min(1)
    return torch.exp(-torch.xlogy(probs, probs).sum())


def straight_through(z: Tensor, codes: Tensor) -> Tensor:
    """Exactly the values of ``codes``, with the gradient of the identity to ``z``.

    Written as codes + (z - z) rather than z + (codes - z), so the value is bit-exact codes.
    """
    return codes.detach() + (z - z.detach())


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with straight-through gradients and dead-code restarts.

    ``dead_code_patience`` = 0 turns restarts off. Restarts happen only in training mode
    and draw their replacement positions with ``generator`` (the global RNG if None). Under
    torch.distributed every process counts the codes of all processes (all-reduce) and
    takes rank 0's replacements, so the codebooks stay identical.
    """

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25, dead_code_patience: int = 100):
        super().__init__()
        check_int("num_codes", num_codes, 1)
        check_int("dim", dim, 1)
        check_int("dead_code_patience", dead_code_patience, 0)
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not beta >= 0:
            raise ValueError(f"beta must be a number >= 0, got {beta!r}")
        self.num_codes, self.dim, self.beta = num_codes, dim, float(beta)
        self.dead_code_patience = dead_code_patience
        # Small uniform init (as in taming-transformers): codes start near the origin.
        self.codebook = nn.Parameter(torch.empty(num_codes, dim).uniform_(-1.0 / num_codes, 1.0 / num_codes))
        # Training calls since each code was last picked; saved so a resumed run keeps counting.
        self.register_buffer("unused_steps", torch.zeros(num_codes, dtype=torch.long))

    def nearest(self, vectors: Tensor) -> Tensor:
        """Index of the nearest code (Euclidean) for each row of ``vectors`` (N, dim)."""
        codebook = self.codebook.detach().float()
        vectors = vectors.detach().float()
        # ||v - e||^2 = ||v||^2 - 2 v.e + ||e||^2, without materialising N x K x dim differences.
        distances = vectors.pow(2).sum(1, keepdim=True) - 2 * vectors @ codebook.T + codebook.pow(2).sum(1)
        return distances.argmin(dim=1)

    def lookup(self, indices: Tensor) -> Tensor:
        """(B, h, w) code indices -> (B, dim, h, w) code vectors."""
        if indices.dtype not in (torch.int64, torch.int32) or indices.dim() != 3:
            raise ValueError(f"indices must be an integer (B, h, w) tensor, got {indices.dtype} {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_codes):
            raise ValueError(
                f"indices must be in [0, {self.num_codes - 1}], got min {int(indices.min())} max {int(indices.max())}"
            )
        return self.codebook[indices.long()].permute(0, 3, 1, 2)

    def snap(self, z: Tensor) -> Tensor:
        """Nearest codes of z (straight-through), without losses or dead-code bookkeeping: for decoding."""
        self._check(z)
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, self.dim)
        codes = self.lookup(self.nearest(flat).view(z.shape[0], *z.shape[2:])).to(z.dtype)
        return straight_through(z, codes)

    def forward(self, z: Tensor, generator: torch.Generator | None = None) -> Quantized:
        """Quantize z; in training mode also count code use and restart dead codes."""
        self._check(z)
        batch, _, height, width = z.shape
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, self.dim)
        if self.training and self.dead_code_patience > 0:
            self._restart_dead_codes(flat, generator)
        indices = self.nearest(flat)
        codes = self.codebook[indices].view(batch, height, width, self.dim).permute(0, 3, 1, 2).to(z.dtype)
        codebook_loss = (codes - z.detach()).pow(2).mean(dim=(1, 2, 3))
        commitment_loss = (z - codes.detach()).pow(2).mean(dim=(1, 2, 3))
        counts = torch.bincount(indices, minlength=self.num_codes)
        if self.training and self.dead_code_patience > 0:
            self._count_unused(counts)
        return Quantized(
            quantized=straight_through(z, codes),
            indices=indices.view(batch, height, width),
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
            loss=codebook_loss + self.beta * commitment_loss,
            perplexity=perplexity(counts),
            usage=(counts > 0).float().mean(),
        )

    def _check(self, z: Tensor) -> None:
        if not isinstance(z, Tensor) or z.dim() != 4 or z.shape[1] != self.dim or not z.is_floating_point():
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"VectorQuantizer expects a float z of shape (B, {self.dim}, h, w), got {shape}")

    @torch.no_grad()
    def _count_unused(self, counts: Tensor) -> None:
        if _distributed():
            counts = counts.clone()
            dist.all_reduce(counts)
        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: Tensor, generator: torch.Generator | None) -> None:
        dead = (self.unused_steps >= self.dead_code_patience).nonzero().squeeze(1)
        if dead.numel() == 0 or flat.shape[0] == 0:
            return
        device = generator.device if generator is not None else flat.device
        picks = torch.randint(flat.shape[0], (dead.numel(),), generator=generator, device=device).to(flat.device)
        replacements = flat[picks].to(self.codebook.dtype)
        if _distributed():
            dist.broadcast(replacements, src=0)
        self.codebook[dead] = replacements
        self.unused_steps[dead] = 0

    def extra_repr(self) -> str:
        return f"num_codes={self.num_codes}, dim={self.dim}, beta={self.beta}, patience={self.dead_code_patience}"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
