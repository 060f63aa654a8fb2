"""ControlNet training (task = "control"): a locked base model and a trainable control branch.

The base (a model folder, run or shipped name, [control] base) is loaded from its folder and
declared frozen: no gradient, not in the optimizer, the EMA or the checkpoints, which record its
source and fingerprint (a resumed run refuses a base that changed). The control branch
(`difflab.nets.controlnet.ControlNet`) starts as a copy of the base's encoder with zero
convolutions, so step 0 is exactly the base model, and is trained with the base's own objective:
its schedule, parameterisation and variance from its manifest, the loss of [diffusion]. The
control of each training image is computed from it (`difflab.data.controls.make_hint`) and a
share of the captions (or labels) is replaced by the null one, so that the control alone must
carry the layout.

Every step logs how closely the prediction follows the control ("control_iou" for masks, the
mask IoU of the foreground of x0_hat; "control_f1" for edge maps, the edge F1 of x0_hat's edges)
over the examples that only the control can explain: condition dropped and t in the noisiest
fifth, where the base alone cannot place the object (shapes-text, caption dropped: IoU 0.7 at
t = 700, 0.37 at 850, 0.003 at 950; with its caption 0.97 everywhere, as the caption names the
position). ControlNet's "sudden convergence" is the step where it jumps. A batch without such
examples falls back to the noisiest fifth, then to all.

The export is a model folder: the control branch at its top level, a copy of the base in
``base/`` (the manifest's "denoiser" component) and a "control" entry (control kind, channels,
size, default strength and guess mode); `Pipeline` joins them into a `ControlledUNet`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from difflab.data.controls import foreground, hint_picture, make_hint
from difflab.denoiser import Denoiser, DenoiserWrapper, build_denoiser
from difflab.eval.control import edge_f1, mask_iou
from difflab.pipelines.folder import CONTROL, DENOISER, new_manifest, write_manifest
from difflab.process import Prediction
from difflab.schedules import Schedule
from difflab.train.config import Config
from difflab.train.distributed import Dist
from difflab.train.tasks.conditions import NULL_CAPTION, drop_captions, drop_labels
from difflab.train.tasks.frozen import Frozen

if TYPE_CHECKING:
    from difflab.train.tasks import DataInfo

BASE_DIR = "base"  # the copy of the locked base inside a controlled model's folder
HINT_CHANNELS = 1  # every control of difflab.data.controls is a one-channel map
NOISIEST = 0.8  # the control measure of the log reads t >= NOISIEST * T


def load_base(path: str | Path) -> tuple[Frozen, dict]:
    """(frozen base network, its manifest): a pixel-space UNet or TextConditionalUNet model."""
    from difflab.nets.controlnet import base_unet
    from difflab.pipelines import load_pipeline, resolve

    directory = resolve(path)
    raw, manifest = load_pipeline(directory)
    if manifest.get("latent") is not None:
        raise ValueError(f"{directory} is a latent model; ControlNet here controls pixel-space models only")
    if manifest.get("control") is not None:
        raise ValueError(f"{directory} is already a controlled model; give its base instead")
    base_unet(raw.net)  # a clear error for networks without a U-Net encoder to copy
    return Frozen(raw.net, str(directory)), manifest


def control_score(kind: str, x0: Tensor, hint: Tensor) -> Tensor:
    """(B,) how closely images x0 follow their controls: mask IoU of their foreground for
    masks, edge F1 (1-pixel tolerance) of their edges of the same kind for edge maps."""
    if kind == "mask":
        return mask_iou(foreground(x0), hint)
    return edge_f1(make_hint(kind, x0), hint, tolerance=1)


class Recorded(DenoiserWrapper):
    """Keeps the last prediction of the denoiser it wraps (to measure control during training)."""

    last: Prediction | None = None

    def predict(self, x_t: Tensor, t: Tensor, cond: dict | None) -> Prediction:
        self.last = self.inner.predict(x_t, t, cond)
        return self.last


class ControlTask:
    """A ControlNet on the base of [control] base; see the module docstring and `ControlConfig`."""

    def __init__(self, config: Config, data: DataInfo, dist: Dist | None = None):
        from difflab.nets.controlnet import ControlNet
        from difflab.train.tasks.diffusion import recipe_objective

        c, d = config.control, config.diffusion
        if not c.base:
            raise ValueError('task "control" needs [control] base = a model folder, run or shipped name')
        if config.model:
            raise ValueError('task "control" copies its network from the base: leave [model] out (use [control])')
        frozen, self.base_manifest = load_base(c.base)
        self.config, self.data, self.step = config, data, 0
        self.frozen = {"base": frozen}
        self.base = frozen.module
        self.check_data(data)
        self.model = ControlNet.from_base(self.base, hint_channels=HINT_CHANNELS, hint_widths=tuple(c.hint_widths))
        self.model.train().requires_grad_(True)
        self.schedule = Schedule.from_config(self.base_manifest["schedule"])
        self.objective = recipe_objective(d, self.schedule, dist)
        self.check_sampling()

    # ---------------------------------------------------------------- checks before training
    @property
    def conditioning(self) -> str | None:
        return self.base_manifest.get("conditioning")

    def check_data(self, data: DataInfo) -> None:
        source = self.frozen["base"].source
        if tuple(self.base_manifest["sample_shape"]) != tuple(data.sample_shape):
            raise ValueError(
                f"the base {source} draws samples of shape {tuple(self.base_manifest['sample_shape'])} but the "
                f"data's examples have shape {tuple(data.sample_shape)}; train on data of the base's shape"
            )
        if self.conditioning == "text" and data.captions is None:
            raise ValueError(f"the base {source} is text-conditional but the data has no captions")
        if self.conditioning == "class" and data.num_classes is None:
            raise ValueError(f"the base {source} is class-conditional but the data has no labels")

    def check_sampling(self) -> None:
        """[sample] against the base's schedule, so the exported model's defaults can sample."""
        from difflab.samplers import sampling_plan

        s = self.config.sample
        try:
            sampling_plan(self.schedule, s.sampler, s.steps, s.eta, s.spacing or None)
        except ValueError as error:
            raise ValueError(f"[sample] does not fit the base's schedule (T = {self.schedule.T}): {error}") from None
        if s.guidance != 0 and self.conditioning is None:
            raise ValueError(f"sample.guidance = {s.guidance} needs a conditional base; the base is unconditional")

    # ---------------------------------------------------------------- the task contract
    def denoiser(self, model: nn.Module) -> Denoiser:
        from difflab.nets.controlnet import ControlledUNet

        m = self.base_manifest
        net = ControlledUNet(self.base, model)
        options = m.get("denoiser_options") or {}
        return build_denoiser(net, self.schedule, m["prediction"], m["variance"], tuple(m["sample_shape"]), **options)

    def hints(self, batch: dict) -> Tensor:
        """The controls of a batch: its own "hint" if the data gives one, else computed from x."""
        hint = batch.get("hint")
        return hint if hint is not None else make_hint(self.config.control.hint, batch["x"])

    def condition(self, batch: dict, generator: torch.Generator) -> dict:
        """The base's condition (a share of it dropped) and the control image."""
        p = self.config.control.caption_dropout
        cond: dict = {}
        if self.conditioning == "text":
            captions = batch.get("caption")
            if captions is None or isinstance(captions, str):
                raise ValueError(f'a text-conditional base needs batch "caption": a list of strings, got {captions!r}')
            cond["caption"] = drop_captions(captions, p, generator)
        elif self.conditioning == "class":
            cond["y"] = drop_labels(batch["y"], p, int(self.base_manifest["num_classes"]), generator)
        cond["hint"] = self.hints(batch).to(batch["x"].device)
        return cond

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        cond = self.condition(batch, generator)
        recorded = Recorded(self.denoiser(model))
        losses, logs = self.objective(recorded, batch["x"], cond, generator)
        out = {k: v.float().mean() for k, v in logs.items() if k != "t"}
        noisy = logs["t"] >= int(NOISIEST * self.schedule.T)
        dropped = self.dropped(cond).to(noisy.device)
        pick = next(m for m in (noisy & dropped, noisy, torch.ones_like(noisy)) if bool(m.any()))
        kind = self.config.control.hint
        with torch.no_grad():
            score = control_score(kind, recorded.last.x0.detach()[pick], cond["hint"][pick])
        out["control_iou" if kind == "mask" else "control_f1"] = score.float().mean().to(losses.device)
        return losses, out

    def dropped(self, cond: dict) -> Tensor:
        """(B,) bools: the examples whose condition is the null one (all, for an unconditional base)."""
        if self.conditioning == "text":
            return torch.tensor([c == NULL_CAPTION for c in cond["caption"]])
        if self.conditioning == "class":
            return cond["y"] == int(self.base_manifest["num_classes"])
        return torch.ones(cond["hint"].shape[0], dtype=torch.bool)

    @torch.no_grad()
    def sample_images(self, model: nn.Module, n: int, generator: torch.Generator) -> Tensor:
        """Pairs (control | sample) for the first training examples' controls and conditions,
        with [sample] guidance, strength and guess mode: about n pictures, in a square grid of
        even side (16 -> 8 pairs, 4 per row)."""
        from difflab.guidance import conditioned
        from difflab.nets.controlnet import control_condition
        from difflab.samplers import sample

        s, c = self.config.sample, self.config.control
        device = next(model.parameters()).device
        side = max(2, 2 * round(math.sqrt(n) / 2))  # the grid is square: an even side keeps pairs together
        pairs = side * side // 2
        dataset = self.data.dataset
        items = [dataset[i % len(dataset)] for i in range(pairs)]
        hints = torch.stack([it["hint"] if "hint" in it else make_hint(c.hint, it["x"][None])[0] for it in items])
        options = {}
        if self.conditioning == "text":
            options["prompt"] = [it["caption"] for it in items]
        elif self.conditioning == "class":
            options["label"] = [int(it["y"]) for it in items]
        denoiser, cond = conditioned(self.denoiser(model), self.base_manifest, pairs, scale=s.guidance, **options)
        cond = {**(cond or {}), **control_condition(hints, pairs, c.strength, c.guess_mode, device)}
        x = sample(denoiser, (pairs, *self.data.sample_shape), s.sampler, s.steps, s.eta, s.spacing or None,
                   generator=generator, progress=False, cond=cond, device=device)  # fmt: skip
        pictures = hint_picture(hints.to(x.device), x.shape[1])
        return torch.stack([pictures, x], dim=1).flatten(0, 1)  # control, sample, control, sample, ...

    def extra_state(self) -> dict:
        return {"timesteps": self.objective.timesteps.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.objective.timesteps.load_state_dict(state["timesteps"])

    def export(self, model: nn.Module, directory: Path) -> None:
        """The control branch at the folder's top level, a copy of the base in base/, the manifest."""
        directory = Path(directory)
        model.save_pretrained(directory)
        self.base.save_pretrained(directory / BASE_DIR)
        write_manifest(directory, self.metadata())

    def metadata(self) -> dict:
        """The controlled model's manifest: the base's, with both components and the control."""
        m, s, c = self.base_manifest, self.config.sample, self.config.control
        kept = {k: v for k, v in m.items() if k not in ("format", "version", "components", "sample", "data")}
        height, width = self.data.sample_shape[-2:]
        return new_manifest(
            **kept,
            components={DENOISER: BASE_DIR, CONTROL: "."},
            sample={
                "sampler": s.sampler,
                "steps": s.steps,
                "spacing": s.spacing or None,
                "n": s.n,
                "eta": s.eta,
                "guidance": s.guidance,
            },
            data=dict(self.config.data),
            control={
                "hint": c.hint,
                "channels": HINT_CHANNELS,
                "size": [height, width],
                "strength": c.strength,
                "guess_mode": c.guess_mode,
                "caption_dropout": c.caption_dropout,
                "base": self.frozen["base"].source,
            },
        )
