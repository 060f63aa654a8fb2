"""difflab: diffusion generative models in one small, tested codebase."""

__version__ = "0.1.0"
