"""Networks: the ADM U-Net, DiT, the noisy classifier for classifier guidance, text
encoders, the KL/VQ autoencoders (with their patch discriminator) of latent diffusion, and
the attribute classifier that judges text-to-image samples, and ControlNet (a trainable copy
of a locked U-Net's encoder that adds spatial control).

Every network follows one contract, ``net(x, t, cond=None) -> Tensor``:
x is (B, C, H, W); t is the (fractional) timestep index, (B,) or a scalar; cond is
an optional dict ("y", "context", "context_mask", "concat", "control" as each
network supports). Networks are built from configs and saved/loaded with
``save_pretrained`` / ``load_network`` (JSON + safetensors, no pickle).
"""

from .attributes import AttributeClassifier, AttributeClassifierConfig
from .autoencoder import Autoencoder, AutoencoderConfig, DiagonalGaussian
from .base import (
    NETWORKS,
    ConfigModule,
    NetConfig,
    build_network,
    load_network,
)
from .classifier import NoisyClassifier, NoisyClassifierConfig
from .clip import CLIP, CLIPConfig
from .controlnet import ControlledUNet, ControlNet, ControlNetConfig
from .decoder import UnCLIPDecoder, UnCLIPDecoderConfig
from .discriminator import PatchDiscriminator, PatchDiscriminatorConfig
from .dit import DIT_PRESETS, DiT, DiTConfig, count_parameters, dit_config
from .layers import timestep_embedding
from .mlp import MLP, MLPConfig
from .prior import DiffusionPrior, EmbeddingStandardizer, PriorConfig
from .quantizer import VectorQuantizer
from .text import (
    FrozenSentenceEncoder,
    TextConditionalUNet,
    TextConditionalUNetConfig,
    TextEncoder,
    TextEncoderConfig,
    WordTokenizer,
)
from .unet import UNet, UNetConfig

__all__ = [
    "NETWORKS",
    "ConfigModule",
    "NetConfig",
    "build_network",
    "load_network",
    "UNet",
    "UNetConfig",
    "ControlNet",
    "ControlNetConfig",
    "ControlledUNet",
    "DiT",
    "DiTConfig",
    "dit_config",
    "DIT_PRESETS",
    "NoisyClassifier",
    "NoisyClassifierConfig",
    "AttributeClassifier",
    "AttributeClassifierConfig",
    "count_parameters",
    "timestep_embedding",
    "Autoencoder",
    "AutoencoderConfig",
    "DiagonalGaussian",
    "VectorQuantizer",
    "PatchDiscriminator",
    "PatchDiscriminatorConfig",
    "TextEncoder",
    "TextEncoderConfig",
    "TextConditionalUNet",
    "TextConditionalUNetConfig",
    "FrozenSentenceEncoder",
    "WordTokenizer",
    "MLP",
    "MLPConfig",
    "CLIP",
    "CLIPConfig",
    "DiffusionPrior",
    "EmbeddingStandardizer",
    "PriorConfig",
    "UnCLIPDecoder",
    "UnCLIPDecoderConfig",
]
