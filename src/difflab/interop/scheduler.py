"""difflab manifest (schedule, parameterisation, thresholding, sampling defaults) <->
diffusers DDPMScheduler / DDIMScheduler configs.

A named difflab schedule becomes diffusers' own name where the two compute the same betas
(linear with difflab's 1000 / T rescaling folded into beta_start/end, scaled_linear, the
cosine schedule as squaredcos_cap_v2, sigmoid for DDPMScheduler), with zero terminal SNR as
rescale_betas_zero_snr; every other schedule (VE ladders, respaced chains, raw betas, named
ones with other options) is written as trained_betas, in float64. Each mapping is read back
before it is written, and falls back to trained_betas unless it reproduces alpha_bar to
1e-12. diffusers builds its tables in float32, so its alphas_cumprod agree with difflab's
float64 ones to float32 accuracy (about 1e-6), and exactly with difflab's betas in float32.
"""

from __future__ import annotations

import torch

from difflab.interop.unet2d import UnsupportedOption
from difflab.schedules import Schedule, rescale_zero_terminal_snr

SCHEDULERS = ("DDIMScheduler", "DDPMScheduler")
PREDICTIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
             "fixed_large_log": "fixed_large"}  # fmt: skip
SPACINGS = ("leading", "trailing", "linspace")
DYNAMIC_RATIO = 0.995  # difflab's dynamic thresholding percentile (DynamicThresholdDenoiser's default)
NO_CAP = 1e30  # sample_max_value for difflab's dynamic thresholding, which has no upper bound on s
# diffusers' defaults for keys a scheduler config may leave out
DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "clip_sample": True, "clip_sample_range": 1.0, "thresholding": False,
    "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "prediction_type": "epsilon",
    "variance_type": "fixed_small", "timestep_spacing": "leading", "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}  # fmt: skip
EXACT = 1e-12  # how closely a named mapping must reproduce alpha_bar


def _refuse(name: str, value, allowed: str) -> ValueError:
    return UnsupportedOption(f"scheduler option {name} = {value!r} cannot be mapped; allowed: {allowed}")


# --------------------------------------------------------------------------- betas


def betas_to_diffusers(config: dict, scheduler: str = "DDIMScheduler") -> dict:
    """The beta keys of a diffusers scheduler config for a difflab schedule config."""
    schedule = Schedule.from_config(config)
    mapped = _named(config, schedule.T, scheduler)
    if mapped is not None:
        back = Schedule.from_config(betas_from_diffusers(mapped))
        if (back.alpha_bar - schedule.alpha_bar).abs().max().item() <= EXACT:
            return mapped
    return {"num_train_timesteps": schedule.T, "beta_schedule": "linear", "trained_betas": schedule.betas.tolist(),
            "rescale_betas_zero_snr": False}  # fmt: skip


def _named(config: dict, T: int, scheduler: str) -> dict | None:
    if config.get("kind") != "named":
        return None
    name, options = config["name"], {k: v for k, v in config.items() if k not in ("kind", "name", "T")}
    ztsnr = options.pop("zero_terminal_snr", False)
    out = {"num_train_timesteps": T, "trained_betas": None, "rescale_betas_zero_snr": ztsnr}
    if name == "linear":
        scale = 1000 / T  # difflab gives the endpoints for T = 1000 and rescales them
        start, end = options.pop("beta_start", 1e-4), options.pop("beta_end", 0.02)
        out.update(beta_schedule="linear", beta_start=scale * start, beta_end=scale * end)
    elif name == "scaled_linear":
        out.update(beta_schedule="scaled_linear", beta_start=options.pop("beta_start", 0.00085),
                   beta_end=options.pop("beta_end", 0.012))  # fmt: skip
    elif name == "cosine" and options.pop("s", 0.008) == 0.008 and options.pop("max_beta", 0.999) == 0.999:
        out.update(beta_schedule="squaredcos_cap_v2")
    elif name == "sigmoid" and scheduler == "DDPMScheduler":
        if (options.pop("start", -6.0), options.pop("end", 6.0)) != (-6.0, 6.0):
            return None
        out.update(beta_schedule="sigmoid", beta_start=options.pop("beta_start", 1e-4),
                   beta_end=options.pop("beta_end", 0.02))  # fmt: skip
    else:
        return None
    return None if options else out


def betas_from_diffusers(config: dict) -> dict:
    """The difflab schedule config of a diffusers scheduler config's beta keys."""
    c = {**DEFAULTS, **config}
    T, kind, ztsnr = c["num_train_timesteps"], c["beta_schedule"], bool(c["rescale_betas_zero_snr"])
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise _refuse("num_train_timesteps", T, "an integer >= 1")
    if c["trained_betas"] is not None:
        betas = torch.tensor(c["trained_betas"], dtype=torch.float64)
        if betas.ndim != 1 or betas.numel() != T:
            raise _refuse("trained_betas", f"{betas.numel()} values", f"a list of num_train_timesteps = {T} betas")
        if ztsnr:
            betas = rescale_zero_terminal_snr(betas)
        return {"kind": "betas", "betas": betas.tolist(), "name": "diffusers"}
    start, end = c["beta_start"], c["beta_end"]
    if kind == "linear":
        exact = torch.linspace(start, end, T, dtype=torch.float64)
        scale = T / 1000
        named = {"kind": "named", "name": "linear", "T": T, "zero_terminal_snr": ztsnr,
                 "beta_start": start if T == 1000 else start * scale, "beta_end": end if T == 1000 else end * scale}
        unscaled = Schedule.make("linear", T, beta_start=named["beta_start"], beta_end=named["beta_end"]).betas
        if (unscaled - exact).abs().max().item() <= EXACT:
            return named
        betas = rescale_zero_terminal_snr(exact) if ztsnr else exact
        return {"kind": "betas", "betas": betas.tolist(), "name": "diffusers-linear"}
    if kind == "scaled_linear":
        return {"kind": "named", "name": "scaled_linear", "T": T, "zero_terminal_snr": ztsnr, "beta_start": start,
                "beta_end": end}  # fmt: skip
    if kind == "squaredcos_cap_v2":
        return {"kind": "named", "name": "cosine", "T": T, "zero_terminal_snr": ztsnr}
    if kind == "sigmoid":
        return {"kind": "named", "name": "sigmoid", "T": T, "zero_terminal_snr": ztsnr, "beta_start": start,
                "beta_end": end}  # fmt: skip
    raise _refuse("beta_schedule", kind, "linear, scaled_linear, squaredcos_cap_v2, sigmoid or trained_betas")


# --------------------------------------------------------------------------- whole scheduler configs


def to_scheduler_config(manifest: dict, scheduler: str) -> dict:
    """A DDPMScheduler / DDIMScheduler config for a difflab manifest (checked exportable)."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; allowed: {', '.join(SCHEDULERS)}")
    prediction = manifest["prediction"]
    if prediction not in PREDICTIONS:
        raise _refuse_manifest("prediction", prediction, ", ".join(PREDICTIONS))
    variance = manifest.get("variance", "fixed_small")
    if variance not in ("fixed_small", "fixed_large"):
        raise _refuse_manifest("variance", variance, "fixed_small, fixed_large")
    if manifest.get("denoiser_options"):
        raise _refuse_manifest("denoiser_options", manifest["denoiser_options"], "none")
    kind, limit = manifest.get("thresholding", "none"), manifest.get("thresholding_limit", 1.0)
    spacing = manifest.get("sample", {}).get("spacing")
    config = {
        "_class_name": scheduler,
        **betas_to_diffusers(manifest["schedule"], scheduler),
        "prediction_type": PREDICTIONS[prediction],
        "clip_sample": kind == "static",
        "clip_sample_range": float(limit),
        "thresholding": kind == "dynamic",
        "dynamic_thresholding_ratio": DYNAMIC_RATIO,
        "sample_max_value": NO_CAP if kind == "dynamic" else 1.0,
        "timestep_spacing": spacing if spacing in SPACINGS else "linspace",
        "steps_offset": 0,
    }
    if scheduler == "DDIMScheduler":
        config["set_alpha_to_one"] = True  # difflab's last DDIM step lands on x0_hat
    else:
        config["variance_type"] = variance
    return config


def _refuse_manifest(key: str, value, allowed: str) -> ValueError:
    return UnsupportedOption(f"difflab manifest {key} = {value!r} has no diffusers scheduler form; allowed: {allowed}")


def from_scheduler_config(config: dict) -> dict:
    """The manifest fields (schedule, prediction, variance, thresholding, sample defaults) of a
    DDPMScheduler / DDIMScheduler config. Sampling-only options difflab chooses itself
    (set_alpha_to_one, steps_offset other than 0) are not refused: they change no model."""
    name = config.get("_class_name")
    if name not in SCHEDULERS:
        raise _refuse("_class_name", name, ", ".join(SCHEDULERS))
    c = {**DEFAULTS, **config}
    prediction = {v: k for k, v in PREDICTIONS.items()}.get(c["prediction_type"])
    if prediction is None:
        raise _refuse("prediction_type", c["prediction_type"], ", ".join(PREDICTIONS.values()))
    variance = "fixed_small"
    if name == "DDPMScheduler":
        variance = VARIANCES.get(c["variance_type"])
        if variance is None:
            raise _refuse("variance_type", c["variance_type"], ", ".join(VARIANCES))
    schedule = betas_from_diffusers(c)
    T = c["num_train_timesteps"]
    spacing = c["timestep_spacing"] if c["timestep_spacing"] in SPACINGS and not c["steps_offset"] else None
    if name == "DDPMScheduler":
        sample = {"sampler": "ddpm", "steps": T, "spacing": None}
    else:
        sample = {"sampler": "ddim", "steps": min(50, T), "spacing": spacing}
    return {"schedule": schedule, "prediction": prediction, "variance": variance, **_thresholding(c),
            "sample": sample}  # fmt: skip


def _thresholding(c: dict) -> dict:
    if c["thresholding"]:
        if c["sample_max_value"] == 1.0:  # s = clamp(q, 1, 1) = 1: a plain clip to [-1, 1]
            return {"thresholding": "static", "thresholding_limit": 1.0}
        if c["dynamic_thresholding_ratio"] == DYNAMIC_RATIO and c["sample_max_value"] >= NO_CAP:
            return {"thresholding": "dynamic", "thresholding_limit": 1.0}
        raise _refuse("thresholding", f"true with dynamic_thresholding_ratio = {c['dynamic_thresholding_ratio']}, "
                      f"sample_max_value = {c['sample_max_value']}", f"sample_max_value 1, or ratio {DYNAMIC_RATIO} "
                      f"with sample_max_value >= {NO_CAP:g} (difflab's dynamic thresholding)")  # fmt: skip
    if c["clip_sample"]:
        limit = c["clip_sample_range"]
        if isinstance(limit, bool) or not isinstance(limit, int | float) or not 0 < limit < float("inf"):
            raise _refuse("clip_sample_range", limit, "a finite number > 0")
        return {"thresholding": "static", "thresholding_limit": float(limit)}
    return {"thresholding": "none", "thresholding_limit": 1.0}
