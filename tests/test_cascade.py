"""Cascades: a base model and super-resolution stages, checked with exact oracles.

The exact setting: the base draws 1-pixel "images" from a 1-D Gaussian mixture (its exact
denoiser); the high resolution is 2x2 with x = m * 1 + d, m the low-resolution pixel (the area
average of x) and d a zero-mean Gaussian detail orthogonal to the constant image (std TAU per
direction). The super-resolution oracle is the exact E[x0 | x_t, z_s]: given the condition z_s
(m noised to level s), m is a mixture again (the base's posterior), so x is one too. A cascade
of the two must then draw m from the base's mixture, whatever s: with the wrong level (or none)
it does not. Every check has a negative control."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from difflab.cli import main
from difflab.denoiser import Denoiser, DynamicThresholdDenoiser, MixtureDenoiser
from difflab.guidance import as_saved
from difflab.methods.cascade import level_alpha_bar, sample_until
from difflab.mixture import GaussianMixture
from difflab.pipelines import Pipeline, load_pipeline, new_manifest, read_manifest, write_manifest
from difflab.pipelines.cascade import CascadePipeline
from difflab.pipelines.sampling import sample_seeds
from difflab.process import Prediction
from difflab.samplers import default_spacing, get_timesteps
from difflab.schedules import Schedule
from difflab.train import run
from difflab.train.config import Config

MIX = GaussianMixture(torch.tensor([0.6, 0.4]), torch.tensor([[-0.8], [0.7]]), torch.tensor([[[0.15**2]], [[0.2**2]]]))
BASE_SCHEDULE = Schedule.make("linear", 100)
SR_SCHEDULE = Schedule.make("linear", 100)
NOISE_SCHEDULE = Schedule.make("cosine", 100)  # the non-truncated stage's augmentation schedule
TAU = 0.3  # std of the high-resolution detail
U = torch.full((4,), 0.5, dtype=torch.float64)  # the unit constant 2x2 image: m * 1 = 2 m * U


def base_pipeline(steps: int = 50) -> Pipeline:
    manifest = new_manifest(schedule=BASE_SCHEDULE.to_config(), prediction="x0", variance="fixed_small",
                            sample_shape=[1, 1, 1], sample={"sampler": "ddim", "steps": steps})  # fmt: skip
    return Pipeline(MixtureDenoiser(MIX, BASE_SCHEDULE, (1, 1, 1)), manifest)


def posterior_of_m(z: torch.Tensor, a: torch.Tensor):
    """Weights, means and variances (B, K) of m given z = sqrt(a) m + sqrt(1 - a) e, m ~ MIX."""
    w, mu, var = MIX.weights[None], MIX.means[:, 0][None], MIX.covs[:, 0, 0][None]
    a, z = a[:, None], z[:, None]
    c = a * var + (1 - a)
    log_r = torch.log(w) - 0.5 * ((z - a.sqrt() * mu) ** 2 / c + torch.log(c))
    return torch.softmax(log_r, 1), mu + a.sqrt() * var / c * (z - a.sqrt() * mu), var - a * var**2 / c


class SuperResolutionOracle(Denoiser):
    """The exact 1x1 -> 2x2 stage: E[x0 | x_t, z_s] from cond["concat"] (z_s resized up: a
    constant image) and cond["aug_level"] (s on `aug_schedule`). `trust_level=False` is the
    negative control: it takes every condition for clean (s = 0). Keeps every cond it gets."""

    prediction = "x0"

    def __init__(self, aug_schedule: Schedule, trust_level: bool = True):
        self.schedule, self.sample_shape = SR_SCHEDULE, (1, 2, 2)
        self.aug_schedule, self.trust_level = aug_schedule, trust_level
        self.conds: list[dict] = []

    def predict(self, x_t, t, cond):
        self.conds.append(cond)
        z = cond["concat"][:, 0, 0, 0].double()
        s = cond["aug_level"].double() if self.trust_level else torch.zeros(len(z), dtype=torch.float64)
        r, m_mean, m_var = posterior_of_m(z, level_alpha_bar(self.aug_schedule, s))
        mean, var = 2 * m_mean, 4 * m_var  # c = 2 m, the coordinate of x along U
        x = x_t.reshape(len(z), 4).double()
        a = self.schedule.alpha_bar_at(t).double()[:, None]
        c_t, perp_t = x @ U, x - (x @ U)[:, None] * U
        v = a * var + (1 - a)
        log_R = torch.log(r) - 0.5 * ((c_t[:, None] - a.sqrt() * mean) ** 2 / v + torch.log(v))
        c = (torch.softmax(log_R, 1) * (mean + a.sqrt() * var / v * (c_t[:, None] - a.sqrt() * mean))).sum(1)
        perp = a.sqrt() * TAU**2 / (a * TAU**2 + 1 - a) * perp_t
        x0 = (c[:, None] * U + perp).reshape(x_t.shape).to(x_t.dtype)
        return Prediction.from_x0(x0, x_t, self.schedule.alpha_bar_at(t).to(x_t.device))


def sr_pipeline(oracle: SuperResolutionOracle, augmentation: str, level: float, steps: int = 50) -> Pipeline:
    superres = {
        "low_size": 1,
        "channels": 1,
        "upsample": "bilinear",
        "augmentation": augmentation,
        "aug_schedule": oracle.aug_schedule.to_config(),
        "aug_levels": [0.0, 1.0],
        "aug_level": level,
    }
    manifest = new_manifest(
        schedule=SR_SCHEDULE.to_config(),
        prediction="x0",
        variance="fixed_small",
        sample_shape=[1, 2, 2],
        sample={"sampler": "dpmpp_2m", "steps": steps},
        superres=superres,
    )
    return Pipeline(oracle, manifest)  # fmt: skip  (DDIM-50 under-disperses the narrow detail by 15%)


def mixture_z_scores(m: torch.Tensor) -> dict[str, float]:
    """Standardised errors of each component's weight, mean and variance (N(0, 1) under the null)."""
    m = m.double().flatten()
    n, z = len(m), {}
    label = (m > -0.05).long()  # the components are > 7 std apart: misassignment is negligible
    for k in range(2):
        w, mu, var = MIX.weights[k].item(), MIX.means[k, 0].item(), MIX.covs[k, 0, 0].item()
        xs = m[label == k]
        z[f"w{k}"] = abs(len(xs) / n - w) / math.sqrt(w * (1 - w) / n)
        z[f"mean{k}"] = abs(xs.mean().item() - mu) / math.sqrt(var / len(xs))
        z[f"var{k}"] = abs(xs.var().item() - var) / math.sqrt(2 * var**2 / len(xs))
    return z


@pytest.mark.parametrize("augmentation", ["noise", "truncated"])
def test_a_two_stage_cascade_on_an_exact_mixture_base_reproduces_the_mixture_at_low_resolution(augmentation):
    """downsample(stage output) follows the base's mixture (weights, means, variances within 5
    standard errors at n = 4000), and the stage adds the right detail (its variance TAU^2 within
    5%); the same cascade whose stage ignores the level does not."""
    aug_schedule = NOISE_SCHEDULE if augmentation == "noise" else BASE_SCHEDULE
    n, level = 4000, 0.3
    for trust, should_pass in ((True, True), (False, False)):
        oracle = SuperResolutionOracle(aug_schedule, trust_level=trust)
        cascade = CascadePipeline([base_pipeline(), sr_pipeline(oracle, augmentation, level)])
        low, high = cascade.generate_stages(n, seed=1, batch_size=n)
        assert high.shape == (n, 1, 2, 2)
        m = high.double().reshape(n, 4).mean(1)  # downsample (area) to 1x1
        z = mixture_z_scores(m)
        detail = (high.double().reshape(n, 4) - m[:, None]).pow(2).sum(1).mean() / 3
        if should_pass:
            assert max(z.values()) < 5, z
            assert abs(detail.item() / TAU**2 - 1) < 0.05
            assert torch.equal(oracle.conds[0]["aug_level"], torch.full((n,), level))
        else:  # negative control: z_s taken for the clean image keeps its noise
            assert max(z.values()) > 20, z
    if augmentation == "truncated":  # the base was stopped at step s: its output is z_s, not a clean sample
        assert mixture_z_scores(low)["var0"] > 20


def test_truncated_conditioning_equals_running_the_base_chain_to_step_s():
    n, level, steps, seed = 64, 0.3, 20, 7
    oracle = SuperResolutionOracle(BASE_SCHEDULE)
    cascade = CascadePipeline([base_pipeline(steps), sr_pipeline(oracle, "truncated", level)])
    stopped, _ = cascade.generate_stages(n, seed=seed)

    def explicit_chain(stop: int) -> torch.Tensor:  # DDIM (eta 0) by hand, from the same x_T
        gens = [torch.Generator().manual_seed(s) for s in sample_seeds(seed, n)]
        x = torch.stack([torch.randn((1, 1, 1), generator=g) for g in gens]).double()
        plan = get_timesteps(BASE_SCHEDULE, steps, default_spacing("ddim", BASE_SCHEDULE)).tolist()
        ts = [t for t in plan if t > stop] + [stop]
        for t, t_next in zip(ts[:-1], ts[1:]):
            a, a_next = BASE_SCHEDULE.alpha_bar_at(t).item(), BASE_SCHEDULE.alpha_bar_at(t_next).item()
            x0 = MIX.posterior_mean(x.reshape(n, 1), torch.tensor(a)).reshape(x.shape)
            eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
            x = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
        return x.float()

    expected = explicit_chain(round(level * 100) - 1)
    torch.testing.assert_close(stopped, expected, atol=2e-5, rtol=0)
    fed = oracle.conds[0]["concat"]  # what the stage was conditioned on: that state, resized up
    torch.testing.assert_close(fed, expected.expand(n, 1, 2, 2), atol=2e-5, rtol=0)
    assert (stopped - explicit_chain(round(level * 100) - 11)).abs().max() > 1e-2  # stopped at 19, not 29: differs
    full = CascadePipeline([base_pipeline(steps), sr_pipeline(SuperResolutionOracle(NOISE_SCHEDULE), "noise", level)])
    assert (stopped - full.generate_stages(n, seed=seed)[0]).abs().max() > 1e-2  # the whole chain: differs
    # the building block on its own: s = 0 runs the chain to the end, s = 1 is x_T
    x_T = torch.randn(4, 1, 1, 1)
    den = MixtureDenoiser(MIX, BASE_SCHEDULE, (1, 1, 1))
    assert torch.equal(sample_until(den, x_T, torch.tensor([99, 50, 0]), 99, "ddim"), x_T)
    with pytest.raises(ValueError, match="samplers ddim, ddpm, not 'dpmpp_2m'"):
        sample_until(den, x_T, torch.tensor([99, 50, 0]), 29, "dpmpp_2m")


def test_the_base_stage_is_the_base_model_sampled_alone():
    """Stage 0 draws from the generators `Pipeline.generate(seed=...)` uses: the same samples."""
    cascade = CascadePipeline([base_pipeline(10), sr_pipeline(SuperResolutionOracle(NOISE_SCHEDULE), "noise", 0.2)])
    stages = cascade.generate_stages(6, seed=3)
    assert torch.equal(stages[0], base_pipeline(10).generate(6, seed=3))
    assert not torch.equal(stages[0], base_pipeline(10).generate(6, seed=4))  # negative control
    assert torch.equal(cascade.generate(6, seed=3), stages[1])
    again = cascade.generate_stages(6, seed=3, stages={1: {"aug_level": 0.5}})
    assert torch.equal(again[0], stages[0]) and not torch.equal(again[1], stages[1])  # s changes only the stage
    # starting from given low-resolution images: the base's own samples give the same cascade
    given = cascade.generate_stages(6, seed=3, low_res=stages[0])
    assert torch.equal(given[0], stages[0]) and torch.equal(given[1], stages[1])
    assert not torch.equal(cascade.generate_stages(6, seed=3, low_res=stages[0] + 0.5)[1], stages[1])
    with pytest.raises(ValueError, match=r"low_res must be a tensor of shape \(6, 1, 1, 1\)"):
        cascade.generate_stages(6, low_res=torch.zeros(6, 1, 2, 2))


class PatternDenoiser(Denoiser):
    """x0_hat is a fixed spread of values (up to +-3) whatever x_t: one DDIM step returns it thresholded."""

    prediction = "x0"

    def __init__(self):
        self.schedule, self.sample_shape = BASE_SCHEDULE, (1, 4, 4)
        self.pattern = torch.linspace(-3, 3, 16).reshape(1, 1, 4, 4) ** 3 / 9

    def predict(self, x_t, t, cond):
        x0 = (self.pattern * torch.linspace(0.5, 1.5, x_t.shape[0]).reshape(-1, 1, 1, 1)).to(x_t)
        return Prediction.from_x0(x0, x_t, self.schedule.alpha_bar_at(t).to(x_t.device))


class CopyStage(Denoiser):
    """A super-resolution stage that returns its condition (resized up)."""

    prediction = "x0"

    def __init__(self):
        self.schedule, self.sample_shape = SR_SCHEDULE, (1, 8, 8)

    def predict(self, x_t, t, cond):
        return Prediction.from_x0(cond["concat"].to(x_t), x_t, self.schedule.alpha_bar_at(t).to(x_t.device))


def test_dynamic_thresholding_percentile_is_honoured(tmp_path):
    base = Pipeline(PatternDenoiser(), new_manifest(schedule=BASE_SCHEDULE.to_config(), prediction="x0",
                    variance="fixed_small", sample_shape=[1, 4, 4], thresholding="static",
                    sample={"sampler": "ddim", "steps": 1}))  # fmt: skip
    superres = {"low_size": 4, "channels": 1, "upsample": "nearest", "augmentation": "none", "aug_level": 0.0}
    stage = Pipeline(CopyStage(), new_manifest(schedule=SR_SCHEDULE.to_config(), prediction="x0",
                     variance="fixed_small", sample_shape=[1, 8, 8], sample={"sampler": "ddim", "steps": 1},
                     superres=superres))  # fmt: skip
    cascade = CascadePipeline([base, stage])
    x0 = PatternDenoiser().predict(torch.zeros(5, 1, 4, 4), torch.zeros(5), None).x0

    def dynamic(p: float) -> torch.Tensor:
        s = torch.quantile(x0.flatten(1).abs(), p, dim=1).clamp(min=1).reshape(-1, 1, 1, 1)
        return x0.clamp(-s, s) / s

    out = {p: cascade.generate_stages(5, stages={0: {"thresholding": "dynamic", "percentile": p}}) for p in (0.6, 0.9)}
    for p, (low, high) in out.items():
        torch.testing.assert_close(low, dynamic(p), atol=1e-6, rtol=0)
        torch.testing.assert_close(high, low.repeat_interleave(2, 2).repeat_interleave(2, 3), atol=1e-6, rtol=0)
    assert (out[0.6][0] - out[0.9][0]).abs().max() > 0.1  # negative control: the percentile matters
    torch.testing.assert_close(cascade.generate_stages(5)[0], x0.clamp(-1, 1), atol=1e-6, rtol=0)  # static default
    # a model folder's manifest carries the percentile to every sampler
    meta = {"thresholding": "dynamic", "thresholding_percentile": 0.8}
    assert isinstance(as_saved(base.denoiser, meta), DynamicThresholdDenoiser)
    assert as_saved(base.denoiser, meta).percentile == 0.8 and as_saved(base.denoiser, {"thresholding": "dynamic"}
                                                                        ).percentile == 0.995  # fmt: skip
    with pytest.raises(ValueError, match="thresholding_percentile = 1.5 is not allowed"):
        write_manifest(tmp_path, {**base.manifest, "thresholding_percentile": 1.5})
    with pytest.raises(ValueError, match="percentile = 0 must lie in"):
        cascade.generate_stages(2, stages=["0.percentile=0"])


# ---------------------------------------------------------------- trained stages, folders and the CLI
TINY = {"class": "UNet", "in_channels": 1, "model_channels": 8, "channel_mult": [1, 1], "num_res_blocks": 1,
        "attention_resolutions": [], "mid_attention": False, "norm_groups": 4, "num_classes": 10,
        "class_dropout_prob": 0.2}  # fmt: skip
TRAIN = {"steps": 1, "batch_size": 8, "lr": 1e-3, "log_every": 1, "sample_every": 0, "checkpoint_every": 1,
         "ema_decay": 0.9, "seed": 0, "device": "cpu"}  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny class-conditional 8x8 digits base and a truncated 8 -> 16 stage on its chain."""
    root = tmp_path_factory.mktemp("cascade")
    base = run(Config.from_dict({
        "task": "diffusion", "data": {"name": "digits", "size": 8}, "model": TINY,
        "diffusion": {"schedule": "cosine", "T": 100}, "train": TRAIN,
        "sample": {"sampler": "ddim", "steps": 4, "n": 4, "guidance": 1.0},
    }), root / "base")  # fmt: skip
    stage = run(Config.from_dict({
        "task": "super_resolution", "data": {"name": "digits", "size": 16},
        "model": {**TINY, "concat_channels": 1, "aug_level_embedding": True},
        "diffusion": {"schedule": "cosine", "T": 100}, "train": TRAIN,
        "sample": {"sampler": "ddim", "steps": 3, "n": 4, "guidance": 1.0},
        "superres": {"low_size": 8, "augmentation": "truncated", "base": str(base), "aug_levels": [0.0, 0.5],
                     "aug_level": 0.2},
    }), root / "stage")  # fmt: skip
    return base, stage


def test_a_cascade_folder_samples_every_stage_through_the_cli(trained, tmp_path, capsys):
    base, stage = trained
    folder, out = tmp_path / "cascade", tmp_path / "out"
    assert main(["cascade", str(base), str(stage), "--out", str(folder), "--stage", "0.thresholding=dynamic",
                 "--stage", "1.aug_level=0.1"]) == 0  # fmt: skip
    manifest = read_manifest(folder)
    entries = manifest["cascade"]["stages"]
    assert [e["component"] for e in entries] == ["stage-0", "stage-1"]
    assert entries[0]["sample"]["thresholding"] == "dynamic" and entries[1]["sample"]["aug_level"] == 0.1
    assert manifest["sample_shape"] == [1, 8, 8]  # the top level is the base: tools that know no cascade see it
    assert load_pipeline(folder)[0].sample_shape == (1, 8, 8)
    pipe = Pipeline.from_pretrained(folder, device="cpu")
    assert isinstance(pipe, CascadePipeline) and pipe.output_shape == (1, 16, 16)
    assert main(["sample", str(folder), "--n", "4", "--steps", "3", "--label", "3", "--seed", "2",
                 "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip
    for name in ("stage-0.png", "stage-1.png", "samples.png"):
        assert (out / name).is_file()
    arrays = np.load(out / "samples.npz")
    assert arrays["stage_0"].shape == (4, 1, 8, 8) and arrays["stage_1"].shape == (4, 1, 16, 16)
    assert np.array_equal(arrays["samples"], arrays["stage_1"])
    expected = pipe.generate_stages(4, steps=3, label=3, seed=2)
    assert np.array_equal(arrays["stage_1"], expected[1].numpy())
    # per-stage settings from the command line reach their stage only
    assert main(["sample", str(folder), "--n", "4", "--steps", "3", "--label", "3", "--seed", "2", "--stage",
                 "1.aug_level=0.3", "--out", str(tmp_path / "out2"), "--device", "cpu"]) == 0  # fmt: skip
    other = np.load(tmp_path / "out2" / "samples.npz")
    assert not np.array_equal(other["stage_0"], arrays["stage_0"])  # truncated: the base stops elsewhere
    assert not np.array_equal(other["stage_1"], arrays["stage_1"])
    capsys.readouterr()
    # negative controls: an off-grid truncated level, and the stage sampled on its own
    assert main(["sample", str(folder), "--stage", "1.aug_level=0.105", "--out", str(tmp_path / "o3")]) == 2
    assert "not a step of the previous stage's chain" in capsys.readouterr().err
    assert main(["sample", str(stage), "--out", str(tmp_path / "o4")]) == 2
    assert "super-resolution stage" in capsys.readouterr().err
    assert main(["sample", str(base), "--stage", "1.aug_level=0.1", "--out", str(tmp_path / "o5")]) == 2
    assert "not a cascade" in capsys.readouterr().err
    saved = pipe.save_pretrained(tmp_path / "copy")  # a cascade saves and loads as it was
    assert json.loads((saved / "diffusion.json").read_text())["cascade"] == manifest["cascade"]


def test_cascades_that_do_not_fit_are_refused(trained):
    base, stage = trained
    b, s = (Pipeline.from_pretrained(p, device="cpu") for p in (base, stage))
    with pytest.raises(ValueError, match="must be a base model, not a super-resolution stage"):
        CascadePipeline([s, s])
    with pytest.raises(ValueError, match="is not a super-resolution stage"):
        CascadePipeline([b, b])
    with pytest.raises(ValueError, match=r"refines images of shape \(1, 8, 8\) but stage 0 draws \(1, 1, 1\)"):
        CascadePipeline([base_pipeline(), s])
    with pytest.raises(ValueError, match="its sampler 'dpmpp_2m' cannot do"):
        CascadePipeline([b, s], [{"sampler": "dpmpp_2m"}, {}])
    with pytest.raises(ValueError, match="aug_level is a setting of super-resolution stages"):
        CascadePipeline([b, s], [{"aug_level": 0.1}, {}])
    with pytest.raises(ValueError, match="stage 5 does not exist"):
        CascadePipeline([b, s]).generate_stages(2, stages={5: {"steps": 2}})
    with pytest.raises(ValueError, match="K.KEY=VALUE"):
        CascadePipeline([b, s]).generate_stages(2, stages=["1.strength=2"])
    unconditional = base_pipeline()
    with pytest.raises(ValueError, match="guidance = 2 but this stage is unconditional"):
        CascadePipeline([unconditional, sr_pipeline(SuperResolutionOracle(NOISE_SCHEDULE), "noise", 0.1)],
                        [{"guidance": 2}, {}])  # fmt: skip
