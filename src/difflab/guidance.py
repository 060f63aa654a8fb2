"""Guidance: denoisers that steer another denoiser towards a condition.

Both are `DenoiserWrapper`s, so they work with every sampler and compose with thresholding
(`ClipDenoiser(ClassifierFreeGuidance(...))`). With a = alpha_bar_t and scale w:

- classifier-free (Ho & Salimans 2022): eps = (w + 1) eps(x, t, c) - w eps(x, t, null). w = 0 is
  the plain conditional model, w = -1 the unconditional one; diffusers' `guidance_scale` is w + 1.
  A negative condition (a "negative prompt") takes the place of the null condition.
- classifier (Dhariwal & Nichol 2021): eps_hat = eps - sqrt(1 - a) w grad_x log p(y | x_t, t)
  (their Algorithm 2, valid for every sampler), or the mean shift of their Algorithm 1,
  mu + w Sigma grad, for ancestral sampling (`mode="mean_shift"`, see `ClassifierGuidance`).

With exact models both are the same thing: CFG with scale w on p(x | c) and p(x) is classifier
guidance with scale w + 1 on p(x) with the Bayes classifier p(c | x_t); the tests use that.

`conditioned` turns a loaded pipeline plus labels or a prompt into (denoiser, cond) for sampling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from difflab.denoiser import DEFAULT_PERCENTILE, Denoiser, DenoiserWrapper, device_of, thresholded
from difflab.process import Prediction, check_variance_type, model_log_variance
from difflab.schedules import broadcast

GUIDANCE_MODES = ("score", "mean_shift")
NULL_CAPTION = ""  # the empty caption is the null condition of text-conditional models
GUIDANCE_INPUT = "w"  # the cond key of a guidance-distilled network's guidance weight


def check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ValueError(f"guidance scale must be a finite number (0 = no guidance), got {scale!r}")
    return float(scale)


# ---------------------------------------------------------------- batching two conditions
def expand_entry(key: str, value, batch: int, device=None):
    """One cond entry for a batch of `batch`: an int label, a string, a length-1 list or a
    (1, ...) tensor is repeated; a full-batch entry is kept; anything else is an error."""
    if isinstance(value, bool):
        raise ValueError(f'cond["{key}"] must be a tensor, an int label, a string or a list, got a bool')
    if isinstance(value, int):
        return torch.full((batch,), value, dtype=torch.long, device=device)
    if isinstance(value, str):
        return [value] * batch
    if isinstance(value, Tensor):
        if value.ndim == 0:
            return value.to(device).expand(batch)
        if value.shape[0] == batch:
            return value.to(device)
        if value.shape[0] == 1:
            return value.to(device).expand(batch, *value.shape[1:])
    elif isinstance(value, list | tuple):
        if all(isinstance(v, str) for v in value) and len(value) in (1, batch):
            return list(value) * (batch // len(value))
        if value and all(isinstance(v, Tensor) for v in value):  # e.g. ControlNet residuals (never empty)
            return [expand_entry(key, v, batch, device) for v in value]
    size = value.shape[0] if isinstance(value, Tensor) else len(value) if isinstance(value, list | tuple) else None
    raise ValueError(
        f'cond["{key}"] has batch size {size} ({type(value).__name__}); it must be 1 (broadcast) or {batch}'
    )


def _pad_context(context: Tensor, mask: Tensor | None, length: int) -> tuple[Tensor, Tensor]:
    """Right-pad a (B, L, D) context to `length` tokens; padding is masked out (False)."""
    batch, L, _ = context.shape
    if mask is None:
        mask = torch.ones(batch, L, dtype=torch.bool, device=context.device)
    if L < length:
        context = torch.nn.functional.pad(context, (0, 0, 0, length - L))
        mask = torch.nn.functional.pad(mask, (0, length - L), value=False)
    return context, mask


def _concat(key: str, a, b):
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return torch.cat([a, b.to(a.dtype)])
    if isinstance(a, list) and isinstance(b, list):
        if all(isinstance(v, str) for v in a + b):
            return a + b
        return [_concat(key, x, y) for x, y in zip(a, b, strict=True)]
    raise ValueError(f'cannot batch cond["{key}"]: {type(a).__name__} and {type(b).__name__}')


def batch_conditions(cond: dict, other: dict, batch: int, device=None) -> dict:
    """`cond` and `other` stacked along the batch (cond first) for one network call of 2B.

    Entries only `cond` has (inputs shared by both halves, e.g. "concat" or "control") are
    repeated; an entry only `other` has is an error. Contexts of different lengths are
    right-padded and masked, which the U-Net's masked cross-attention ignores exactly."""
    cond = {k: expand_entry(k, v, batch, device) for k, v in cond.items() if v is not None}
    other = {k: expand_entry(k, v, batch, device) for k, v in other.items() if v is not None}
    extra = sorted(set(other) - set(cond))
    if extra:
        raise ValueError(f"the null/negative condition has key(s) {extra} that cond lacks; cond has {sorted(cond)}")
    if "context" in other:  # its mask belongs to its context: never borrow cond's
        cond_only = [k for k in cond if k not in other and k != "context_mask"]
    else:
        cond_only = [k for k in cond if k not in other]
    other.update({k: cond[k] for k in cond_only})
    if "context" in cond:
        a, b = cond["context"], other["context"]
        length = max(a.shape[1], b.shape[1])
        if a.shape[1] != b.shape[1] or "context_mask" in cond:
            cond["context"], cond["context_mask"] = _pad_context(a, cond.get("context_mask"), length)
            other["context"], other["context_mask"] = _pad_context(b, other.get("context_mask"), length)
    return {k: _concat(k, cond[k], other[k]) for k in cond}


# ---------------------------------------------------------------- classifier-free guidance
class ClassifierFreeGuidance(DenoiserWrapper):
    """eps = (w + 1) eps(x, t, c) - w eps(x, t, u), u = `negative_cond` if given else `null_cond`.

    Both halves go through the inner denoiser in ONE call on a batch of 2B (x, t and every cond
    entry concatenated). x0 is combined with the same weights, which keeps the prediction
    consistent with x_t (the weights sum to 1) without dividing by sqrt(alpha_bar). A learned
    variance (`var_frac`) is the conditional half's. w = 0 calls the inner denoiser once on the
    plain condition, so it equals the conditional model exactly.

    null_cond: e.g. {"y": num_classes} (the null label) or the encoded empty caption
    {"context": (1, L, D), "context_mask": (1, L)}; length-1 entries are broadcast.
    """

    def __init__(self, inner: Denoiser, scale: float, null_cond: dict, negative_cond: dict | None = None):
        super().__init__(inner)
        self.scale = check_scale(scale)
        for name, value in (("null_cond", null_cond), ("negative_cond", negative_cond)):
            if value is not None and (not isinstance(value, dict) or not value):
                raise ValueError(f"{name} must be a non-empty dict of condition entries, got {value!r}")
        if null_cond is None:
            raise ValueError("null_cond is required: the condition the model was trained to treat as 'none'")
        self.null_cond, self.negative_cond = null_cond, negative_cond

    def predict(self, x_t: Tensor, t: Tensor, cond: dict | None) -> Prediction:
        if not cond:
            raise ValueError("classifier-free guidance needs the condition: pass cond (e.g. {'y': labels})")
        if self.scale == 0.0:
            return self.inner.predict(x_t, t, cond)
        return self.guided(x_t, t, cond, self.scale)

    def guided(self, x_t: Tensor, t: Tensor, cond: dict, w: float | Tensor) -> Prediction:
        """The guided prediction with weight w: a number, or one per example (B,)."""
        batch = x_t.shape[0]
        other = self.negative_cond if self.negative_cond is not None else self.null_cond
        both = batch_conditions(cond, other, batch, x_t.device)
        pred = self.inner.predict(torch.cat([x_t, x_t]), torch.cat([t, t]), both)
        x0_c, x0_u = pred.x0[:batch], pred.x0[batch:]
        eps_c, eps_u = pred.eps[:batch], pred.eps[batch:]
        if isinstance(w, Tensor):
            w = broadcast(w.to(x0_c), x0_c)
            x0, eps = x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u)
        else:
            x0, eps = torch.add(x0_c, x0_c - x0_u, alpha=w), torch.add(eps_c, eps_c - eps_u, alpha=w)
        return Prediction(x0=x0, eps=eps, var_frac=None if pred.var_frac is None else pred.var_frac[:batch])


class GuidanceFromCondition(ClassifierFreeGuidance):
    """Classifier-free guidance whose weight comes with the condition, one per example, as
    cond["w"]: the guided teacher of guidance distillation (each training example has its own
    w), whose student takes the same cond["w"] as an input (`UNet(guidance_embedding=True)`)."""

    def __init__(self, inner: Denoiser, null_cond: dict, negative_cond: dict | None = None):
        super().__init__(inner, 1.0, null_cond, negative_cond)

    def predict(self, x_t: Tensor, t: Tensor, cond: dict | None) -> Prediction:
        if not cond or GUIDANCE_INPUT not in cond:
            raise ValueError(f'GuidanceFromCondition needs the guidance weights in cond["{GUIDANCE_INPUT}"]')
        w = guidance_weights(cond[GUIDANCE_INPUT], x_t.shape[0], x_t.device)
        rest = {k: v for k, v in cond.items() if k != GUIDANCE_INPUT}
        return self.guided(x_t, t, rest, w)


def guidance_weights(w, batch: int, device=None) -> Tensor:
    """cond["w"] as a float (B,) tensor: one number for all, or one finite weight per example."""
    if isinstance(w, int | float) and not isinstance(w, bool):
        w = torch.tensor(check_scale(w))
    if not isinstance(w, Tensor) or w.ndim > 1 or w.is_complex() or w.dtype == torch.bool:
        raise ValueError(f'cond["{GUIDANCE_INPUT}"] must be a number or a (B,) tensor of guidance weights, got {w!r}')
    w = expand_entry(GUIDANCE_INPUT, w, batch, device).float()
    if not torch.isfinite(w).all():
        raise ValueError(f'cond["{GUIDANCE_INPUT}"] must be finite, got {w.tolist()}')
    return w


# ---------------------------------------------------------------- classifier guidance
class ClassifierGuidance(DenoiserWrapper):
    """Steer with grad_x log p(y | x_t, t) of a noisy classifier `classifier(x_t, t) -> logits`.

    mode="score" (Algorithm 2 of Dhariwal & Nichol, for every sampler):
        eps_hat = eps - sqrt(1 - a) w g,  x0_hat = x0 + (1 - a) / sqrt(a) w g   (g = the gradient)
    mode="mean_shift" (Algorithm 1, for ancestral sampling): the step's mean becomes mu + w Sigma g.
        The DDPM mean is c_x0 x0_hat + c_xt x_t, so that is exactly x0_hat + (Sigma / c_x0) w g, with
        Sigma and c_x0 of the step from t to the next of `timesteps` (the very list the sampler
        visits, e.g. `get_timesteps(schedule, steps, "linspace")`) and `variance` the sampler's.
        The last step adds no noise (Sigma -> 0), so it gets no shift. Samplers need no change.

    labels: an int or (B,) tensor; None reads cond["y"], which the inner model then sees too (a
    class-conditional model plus classifier, as in ADM) unless `strip_labels` removes it first
    (an unconditional model; this way `sample_batched` slices the labels with the batches).
    The gradient is taken under `torch.enable_grad()`, so guidance works inside no_grad
    sampling; the classifier's own parameters get no .grad. Put the classifier in eval mode and
    on x_t's dtype and device. (At alpha_bar = 0, zero terminal SNR, the score form's x0 shift
    is infinite: start such chains one step later.)
    """

    def __init__(
        self,
        inner: Denoiser,
        classifier,
        scale: float,
        labels: int | Tensor | None = None,
        *,
        mode: str = "score",
        timesteps: Sequence[int] | Tensor | None = None,
        variance: str | None = None,
        strip_labels: bool = False,
    ):
        super().__init__(inner)
        if not callable(classifier):
            raise ValueError(f"classifier must be callable as classifier(x_t, t) -> logits, got {classifier!r}")
        if mode not in GUIDANCE_MODES:
            raise ValueError(f"unknown guidance mode {mode!r}; allowed: {', '.join(GUIDANCE_MODES)}")
        if isinstance(labels, bool) or (labels is not None and not isinstance(labels, int | Tensor)):
            raise ValueError(f"labels must be an int, a (B,) integer tensor or None (read cond['y']), got {labels!r}")
        self.classifier, self.scale, self.labels, self.mode = classifier, check_scale(scale), labels, mode
        self.strip_labels = bool(strip_labels)
        self.step_variance = None
        if mode == "mean_shift":
            self.step_variance = AncestralVariance(self.schedule, timesteps, variance or inner.variance)
        elif timesteps is not None or variance is not None:
            raise ValueError('timesteps and variance are options of mode="mean_shift" only')

    def gradient(self, x_t: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        """grad_x log p(y | x_t, t) per example (no scale), even inside torch.no_grad()."""
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            logits = self.classifier(x, t)
            if not isinstance(logits, Tensor) or logits.shape[:1] != x.shape[:1] or logits.ndim != 2:
                got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
                raise ValueError(f"the classifier must return logits of shape ({x.shape[0]}, classes), got {got}")
            log_p = torch.log_softmax(logits, dim=1).gather(1, labels[:, None].to(logits.device).long()).sum()
            (grad,) = torch.autograd.grad(log_p, x)
        return grad

    def _labels(self, cond: dict | None, batch: int, device) -> Tensor:
        labels = self.labels
        if labels is None:
            if not cond or cond.get("y") is None:
                raise ValueError("ClassifierGuidance without labels reads cond['y'], but cond has no 'y'")
            labels = cond["y"]
        return expand_entry("y", labels, batch, device)

    def predict(self, x_t: Tensor, t: Tensor, cond: dict | None) -> Prediction:
        labels = self._labels(cond, x_t.shape[0], x_t.device) if self.scale != 0.0 else None
        if self.strip_labels and cond:
            cond = {k: v for k, v in cond.items() if k != "y"} or None
        pred = self.inner.predict(x_t, t, cond)
        if labels is None:
            return pred
        grad = self.gradient(x_t, t, labels).to(pred.x0.dtype)
        ab = self.schedule.alpha_bar_at(t).to(x_t.device)
        a = broadcast(ab, x_t)
        if self.mode == "score":
            eps = pred.eps - (1.0 - a).sqrt() * self.scale * grad
            x0 = pred.x0 + (1.0 - a) / a.sqrt() * self.scale * grad
            return Prediction(x0=x0, eps=eps, var_frac=pred.var_frac)
        shift = self.step_variance.variance_over_coef(t, pred.var_frac, x_t) * self.scale * grad
        new = Prediction.from_x0(pred.x0 + shift, x_t, ab)
        new.var_frac = pred.var_frac
        return new


class AncestralVariance:
    """Sigma / c_x0 of each step of an ancestral chain over `timesteps`: the factor that turns a
    mean shift into an x0 shift. Mirrors `samplers.ddpm.AncestralStep`: the respaced chain's
    posterior coefficients and (fixed small, fixed large or learned) variance."""

    def __init__(self, schedule, timesteps: Sequence[int] | Tensor | None, variance: str):
        if timesteps is None:
            raise ValueError(
                'mode="mean_shift" needs the sampler\'s timesteps, e.g. get_timesteps(schedule, steps, "linspace")'
            )
        ts = torch.as_tensor(timesteps)
        if ts.is_floating_point() or ts.ndim != 1 or ts.numel() < 1 or (ts.diff() >= 0).any():
            raise ValueError(
                f"mean_shift timesteps must be a descending 1-D list of integer indices, got {ts.tolist()}"
            )
        self.kind = check_variance_type(variance)
        self.timesteps = ts.long().cpu()
        self.respaced = schedule.respace(self.timesteps)
        n = len(self.timesteps)
        self.j = torch.arange(n - 1, -1, -1)  # step i (descending) is respaced index n - 1 - i
        self.c_x0 = self.respaced.posterior_mean_coef_x0.flip(0)

    def step_index(self, t: Tensor) -> Tensor:
        """Position i of each t in the (descending) timesteps."""
        ascending = self.timesteps.flip(0).double()
        t = t.detach().cpu().double()
        pos = torch.searchsorted(ascending, t).clamp(max=len(ascending) - 1)
        if not torch.equal(ascending[pos], t):
            raise ValueError(
                f"mean_shift guidance was set up for timesteps {self.timesteps.tolist()} but was queried at "
                f"t = {sorted(set(t.tolist()))}; pass the same timesteps the sampler visits"
            )
        return len(ascending) - 1 - pos

    def variance_over_coef(self, t: Tensor, var_frac: Tensor | None, like: Tensor) -> Tensor:
        i = self.step_index(t)
        j = self.j[i]
        log_var = model_log_variance(self.respaced, j, self.kind, like.to(torch.float64), var_frac)
        ratio = log_var.exp() / broadcast(self.c_x0[i], log_var)
        last = broadcast((j == 0).to(torch.float64), ratio)  # no noise on the last step: no shift
        return (ratio * (1.0 - last)).to(like.dtype).to(like.device)


# ---------------------------------------------------------------- loaded pipelines
def text_encoder_of(denoiser: Denoiser):
    """The text encoder inside a text-conditional pipeline's network (a TextConditionalUNet)."""
    net = getattr(denoiser, "net", None)
    net = getattr(net, "module", net)  # DistributedDataParallel
    encoder = getattr(net, "text_encoder", None)
    if encoder is None:
        raise ValueError(f"{type(net).__name__} is not text-conditional (it has no text_encoder)")
    return encoder


@torch.no_grad()
def encode_prompts(denoiser: Denoiser, prompts: Sequence[str]) -> dict:
    """{"context", "context_mask"} for the prompts, computed once (not at every sampler step)."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a list of strings, got {prompts!r}")
    return text_encoder_of(denoiser).encode(list(prompts))


def class_guidance(denoiser: Denoiser, num_classes: int, scale: float) -> Denoiser:
    """CFG for a class-conditional U-Net whose null label is `num_classes`."""
    return ClassifierFreeGuidance(denoiser, scale, {"y": int(num_classes)})


def text_guidance(denoiser: Denoiser, scale: float, negative_prompt: str | None = None) -> Denoiser:
    """CFG for a text-conditional network: the null half is the empty caption, or the negative prompt."""
    null = encode_prompts(denoiser, [NULL_CAPTION])
    negative = None if negative_prompt is None else encode_prompts(denoiser, [negative_prompt])
    return ClassifierFreeGuidance(denoiser, scale, null, negative)


def as_saved(denoiser: Denoiser, meta: dict) -> Denoiser:
    """`denoiser` (guided or not) thresholded as the model's diffusion.json says: its
    "thresholding" kind, "thresholding_limit" (1 for pixels, +-3 for unit-variance latents) and,
    for dynamic thresholding, "thresholding_percentile" (default Imagen's 0.995)."""
    return thresholded(
        denoiser, meta.get("thresholding", "none"), meta.get("thresholding_limit", 1.0),
        meta.get("thresholding_percentile", DEFAULT_PERCENTILE),
    )  # fmt: skip


def class_labels(n: int, num_classes: int, label: int | Sequence[int] | None = None) -> Tensor:
    """The (n,) labels of a class-conditional draw: `label` (one for all, or one per sample),
    by default the classes in turn (0, 1, ..., k-1, 0, ...)."""
    if label is None:
        return torch.arange(n) % num_classes
    labels = expand_entry("y", label if isinstance(label, int) else torch.as_tensor(label), n).long()
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], got {labels.unique().tolist()}")
    return labels


def conditioned(
    denoiser: Denoiser,
    meta: dict,
    n: int,
    *,
    scale: float = 0.0,
    label: int | Sequence[int] | None = None,
    prompt: str | Sequence[str] | None = None,
    negative_prompt: str | None = None,
) -> tuple[Denoiser, dict | None]:
    """(denoiser, cond) to draw `n` samples from a loaded pipeline (`load_pipeline`'s pair).

    Class-conditional models take `label` (an int, or one per sample; default: cycle through the
    classes); text-conditional ones (meta "conditioning" = "text") take `prompt` (one string for
    all, or one per sample). `scale` is the CFG weight w (0 = the plain conditional model). The
    guided denoiser is then thresholded as the model's diffusion.json says ("thresholding"),
    outermost, so the guided x0 is what gets clipped. The condition is put on the network's
    device (labels here, encoded prompts by the text encoder)."""
    scale = check_scale(scale)
    kind = meta.get("conditioning") or ("class" if meta.get("num_classes") else None)
    if kind != "text" and (prompt is not None or negative_prompt is not None):
        raise ValueError("prompt/negative_prompt given, but the model is not text-conditional")
    if kind != "class" and label is not None:
        raise ValueError("label given, but the model is not class-conditional")
    if kind is None:
        if scale != 0.0:
            raise ValueError("guidance scale given, but the model is unconditional")
        return as_saved(denoiser, meta), None
    # a guidance-distilled network takes w as an input: one call per step, no unconditional half
    as_input = bool(meta.get("guidance_input"))
    w = {GUIDANCE_INPUT: torch.full((n,), scale, device=device_of(denoiser))} if as_input else {}
    if kind == "class":
        k = int(meta["num_classes"])
        labels = class_labels(n, k, label)
        guided = denoiser if as_input else class_guidance(denoiser, k, scale)
        return as_saved(guided, meta), {"y": labels.long().to(device_of(denoiser)), **w}
    if kind != "text":
        raise ValueError(f"unknown conditioning {kind!r} in the model's diffusion.json; allowed: class, text")
    if prompt is None:
        raise ValueError('the model is text-conditional: give a prompt ("" samples without a caption)')
    if as_input and negative_prompt is not None:
        raise ValueError("a guidance-distilled model takes w as an input and has no negative prompt")
    prompts = expand_entry("caption", [prompt] if isinstance(prompt, str) else list(prompt), n)
    guided = denoiser if as_input else text_guidance(denoiser, scale, negative_prompt)
    return as_saved(guided, meta), {**encode_prompts(denoiser, prompts), **w}
