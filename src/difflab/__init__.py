"""difflab: diffusion generative models in one small, tested codebase.

`difflab.Pipeline.from_pretrained("digits-ddpm")(n=16)` samples a shipped model in one call."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # imported on first use, so `import difflab` stays light
    if name == "Pipeline":
        from difflab.pipelines import Pipeline

        return Pipeline
    raise AttributeError(f"module 'difflab' has no attribute {name!r}")
