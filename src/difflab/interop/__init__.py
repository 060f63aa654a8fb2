"""Interoperability with other libraries' model folders: diffusers (UNet2DModel with a DDPM or
DDIM scheduler), read as difflab models and written from them, mapped exactly or refused by name."""

from difflab.interop.diffusers import (
    export_diffusers,
    import_diffusers,
    is_diffusers_folder,
    load_diffusers_unet,
    read_diffusers_manifest,
)
from difflab.interop.unet2d import UnsupportedOption

__all__ = [
    "UnsupportedOption",
    "export_diffusers",
    "import_diffusers",
    "is_diffusers_folder",
    "load_diffusers_unet",
    "read_diffusers_manifest",
]
