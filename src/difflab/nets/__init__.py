"""Denoising networks: ADM U-Net, DiT and the noisy classifier for classifier guidance.

Every network follows one contract, ``net(x, t, cond=None) -> Tensor``:
x is (B, C, H, W); t is the (fractional) timestep index, (B,) or a scalar; cond is
an optional dict ("y", "context", "context_mask", "concat", "control" as each
network supports). Networks are built from configs and saved/loaded with
``save_pretrained`` / ``load_network`` (JSON + safetensors, no pickle).
"""

from .base import (
    NETWORKS,
    ConfigModule,
    NetConfig,
    build_network,
    load_network,
)
from .classifier import NoisyClassifier, NoisyClassifierConfig
from .dit import DIT_PRESETS, DiT, DiTConfig, count_parameters, dit_config
from .layers import timestep_embedding
from .unet import UNet, UNetConfig

__all__ = [
    "NETWORKS",
    "ConfigModule",
    "NetConfig",
    "build_network",
    "load_network",
    "UNet",
    "UNetConfig",
    "DiT",
    "DiTConfig",
    "dit_config",
    "DIT_PRESETS",
    "NoisyClassifier",
    "NoisyClassifierConfig",
    "count_parameters",
    "timestep_embedding",
]
