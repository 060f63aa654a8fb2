"""Guidance wrappers: exactness (w = 0, batched = separate forwards, CFG = classifier guidance
with exact models), the classifier gradient, and sampling the right distribution with the exact
Gaussian-mixture oracle, where p(y | x_t) is the mixture's responsibilities (component = class)."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.denoiser import ClipDenoiser, Denoiser, DenoiserWrapper, MixtureDenoiser, NetworkDenoiser
from difflab.guidance import (
    ClassifierFreeGuidance,
    ClassifierGuidance,
    batch_conditions,
    conditioned,
)
from difflab.mixture import GaussianMixture
from difflab.nets import NoisyClassifier, UNet
from difflab.process import Prediction, model_log_variance
from difflab.samplers import SAMPLERS, ddpm, get_timesteps, sample
from difflab.schedules import Schedule, broadcast
from test_nets_support import perturbed
from test_samplers_support import MIXTURE

SCHEDULE = {T: Schedule.make("linear", T=T) for T in (100, 1000)}
K = MIXTURE.K  # classes = mixture components; label K is the null label


# ---------------------------------------------------------------- exact oracles
class ClassMixtureDenoiser(Denoiser):
    """Exact E[x0 | x_t, y]: component y of the mixture, the whole mixture for y = K (null).
    Records the batch size of every call."""

    prediction = "x0"

    def __init__(self, schedule: Schedule, mixture: GaussianMixture = MIXTURE):
        self.schedule, self.sample_shape = schedule, (mixture.D,)
        self.parts = [GaussianMixture(torch.ones(1), mixture.means[k : k + 1], mixture.covs[k : k + 1])
                      for k in range(mixture.K)] + [mixture]  # fmt: skip
        self.calls: list[int] = []

    def predict(self, x_t, t, cond):
        self.calls.append(x_t.shape[0])
        y, ab = cond["y"], self.schedule.alpha_bar_at(t)
        x0 = torch.zeros_like(x_t)
        for k, part in enumerate(self.parts):
            pick = y == k
            if pick.any():
                x0[pick] = part.posterior_mean(x_t[pick], ab[pick])
        return Prediction.from_x0(x0, x_t, ab)


class MixtureClassifier:
    """Bayes classifier of the noised mixture: logits log w_k + log N(x_t; sqrt(a) mu_k,
    a S_k + (1 - a) I), written independently of GaussianMixture's own posterior code."""

    def __init__(self, schedule: Schedule, mixture: GaussianMixture = MIXTURE):
        self.schedule, self.mixture = schedule, mixture

    def __call__(self, x, t):
        m, x = self.mixture, x.to(torch.float64)
        t = torch.as_tensor(t).expand(x.shape[0])
        logits = torch.zeros(x.shape[0], m.K, dtype=torch.float64)
        for level in t.unique():  # samplers query one t per step: one set of K Gaussians
            pick = t == level
            a = self.schedule.alpha_bar_at(level).to(torch.float64)
            covs = a * m.covs + (1 - a) * torch.eye(m.D, dtype=torch.float64)
            dist = torch.distributions.MultivariateNormal(a.sqrt() * m.means, covs, validate_args=False)
            logits = logits.index_put((pick.nonzero()[:, 0],), dist.log_prob(x[pick][:, None, :]) + m.weights.log())
        return logits


def noised_points(schedule: Schedule, t: int, n: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x0 = MIXTURE.sample(n, gen)
    ab = schedule.alpha_bar_at(torch.tensor(t))
    return ab.sqrt() * x0 + (1 - ab).sqrt() * torch.randn(x0.shape, generator=gen, dtype=torch.float64)


class Counting(DenoiserWrapper):
    def __init__(self, inner):
        super().__init__(inner)
        self.batches: list[int] = []

    def predict(self, x_t, t, cond):
        self.batches.append(x_t.shape[0])
        return self.inner.predict(x_t, t, cond)


# ---------------------------------------------------------------- tiny networks
TINY_UNET = dict(in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(2,), num_heads=2, norm_groups=4)  # fmt: skip




def unet_denoiser(**overrides) -> NetworkDenoiser:
    torch.manual_seed(0)
    net = perturbed(UNet({**TINY_UNET, **overrides}))
    return NetworkDenoiser(net, SCHEDULE[100], "eps", sample_shape=(1, 8, 8))


def images(batch: int = 4, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 8, 8, generator=gen), torch.tensor([90.0, 50.0, 10.0, 0.0][:batch])


# ---------------------------------------------------------------- classifier-free guidance
def test_cfg_with_w0_is_the_conditional_model_exactly():
    den = Counting(unet_denoiser(num_classes=3))
    x, t = images()
    y = torch.tensor([0, 1, 2, 1])
    plain = den.inner(x, t, {"y": y})
    guided = ClassifierFreeGuidance(den, 0.0, {"y": 3})(x, t, {"y": y})
    assert torch.equal(guided.x0, plain.x0) and torch.equal(guided.eps, plain.eps)
    assert den.batches == [4]  # one call on the plain batch, no unconditional half


@pytest.mark.parametrize("w", [1.0, 3.5])
def test_cfg_is_two_forwards_combined_in_one_batched_call(w):
    den = Counting(unet_denoiser(num_classes=3))
    x, t = images()
    y = torch.tensor([0, 1, 2, 1])
    guided = ClassifierFreeGuidance(den, w, {"y": 3})(x, t, {"y": y})
    assert den.batches == [8]
    cond, null = den.inner(x, t, {"y": y}), den.inner(x, t, {"y": torch.full((4,), 3)})
    assert guided.eps.abs().max() > 0.1  # the check below compares something non-trivial
    torch.testing.assert_close(guided.eps, (w + 1) * cond.eps - w * null.eps, atol=1e-6, rtol=1e-5)
    # x0 = (x - sqrt(1 - a) eps) / sqrt(a): float32 round-off of each half, weighted by w + 1 and w
    torch.testing.assert_close(guided.x0, (w + 1) * cond.x0 - w * null.x0, atol=1e-5 * (2 * w + 1), rtol=1e-5)
    # x0 and eps stay consistent with x_t
    ab = broadcast(SCHEDULE[100].alpha_bar_at(t), x)
    torch.testing.assert_close(ab.sqrt() * guided.x0 + (1 - ab).sqrt() * guided.eps, x, atol=1e-5, rtol=0)


def test_cfg_with_text_context_of_another_length_and_a_negative_prompt():
    """The null context is shorter than the prompts' (padded and masked in the batched call), the
    negative one longer; shared inputs ("concat") go to both halves."""
    den = Counting(unet_denoiser(context_dim=6, concat_channels=1))
    x, t = images()
    gen = torch.Generator().manual_seed(5)
    ctx = torch.randn(4, 3, 6, generator=gen)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    concat = torch.randn(4, 1, 8, 8, generator=gen)
    cond = {"context": ctx, "context_mask": mask, "concat": concat}
    null = {"context": torch.randn(1, 1, 6, generator=gen)}
    negative = {"context": torch.randn(1, 5, 6, generator=gen), "context_mask": torch.ones(1, 5, dtype=torch.bool)}
    for other, w in ((null, 2.0), (negative, 1.5)):
        den.batches.clear()
        guided = ClassifierFreeGuidance(den, w, null, negative if other is negative else None)(x, t, cond)
        assert den.batches == [8]
        ref_c = den.inner(x, t, cond)
        ref_u = den.inner(x, t, {"context": other["context"].expand(4, -1, -1), "concat": concat})
        torch.testing.assert_close(guided.eps, (w + 1) * ref_c.eps - w * ref_u.eps, atol=1e-5, rtol=1e-5)


def test_cfg_keeps_the_conditional_halfs_learned_variance():
    class Stub(Denoiser):
        schedule, variance = SCHEDULE[100], "learned"

        def predict(self, x_t, t, cond):
            v = cond["y"].to(x_t.dtype).view(-1, 1).expand_as(x_t) / 10
            return Prediction(x0=x_t * 0, eps=x_t, var_frac=v)

    x = torch.randn(3, 2)
    pred = ClassifierFreeGuidance(Stub(), 2.0, {"y": 9})(x, 5, {"y": torch.tensor([1, 2, 3])})
    torch.testing.assert_close(pred.var_frac[:, 0], torch.tensor([0.1, 0.2, 0.3]))


@pytest.mark.parametrize("w", [0.5, 2.0])
def test_cfg_on_exact_models_is_classifier_guidance_with_scale_w_plus_1(w):
    """eps(x|y) = eps(x) - sqrt(1 - a) grad log p(y|x_t) for exact models, so (w+1) eps(x|y) - w eps(x)
    is classifier guidance of eps(x) with scale w + 1: a check with no tolerance but round-off."""
    sched = SCHEDULE[100]
    cfg = ClassifierFreeGuidance(ClassMixtureDenoiser(sched), w, {"y": K})
    cg = ClassifierGuidance(MixtureDenoiser(MIXTURE, sched), MixtureClassifier(sched), w + 1)
    for t in (0, 20, 60, 99):
        x = noised_points(sched, t, seed=t)
        y = torch.arange(x.shape[0]) % K
        a, b = cfg(x, t, {"y": y}), cg(x, t, {"y": y})
        torch.testing.assert_close(a.eps, b.eps, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(a.x0, b.x0, atol=1e-8, rtol=1e-9)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_cfg_works_with_every_sampler(sampler):
    """Same draws through CFG and through the equivalent classifier guidance (see above)."""
    sched = SCHEDULE[100]
    cfg = ClassifierFreeGuidance(ClassMixtureDenoiser(sched), 1.0, {"y": K})
    cg = ClassifierGuidance(MixtureDenoiser(MIXTURE, sched), MixtureClassifier(sched), 2.0)
    options = {"n_steps": 2} if sampler == "langevin" else {}
    y = torch.arange(32) % K
    a, b = (sample(d, (32, 2), sampler, 8, generator=torch.Generator().manual_seed(3), progress=False,
                   dtype=torch.float64, cond={"y": y}, **options) for d in (cfg, cg))  # fmt: skip
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-7)


def test_guidance_composes_with_thresholding():
    """Clip(CFG) clips the *guided* x0: the expectation comes from two separate unguided calls, and
    the limit (the median |guided x0|) clips half the entries, so a clip that hides the guidance
    (or skips it) cannot pass."""
    den = unet_denoiser(num_classes=3)
    x, t = images()
    y, w = torch.tensor([0, 1, 2, 0]), 4.0
    cond_x0 = den(x, t, {"y": y}).x0
    null_x0 = den(x, t, {"y": torch.full((4,), 3)}).x0
    guided_x0 = cond_x0 + w * (cond_x0 - null_x0)
    limit = guided_x0.abs().median().item()
    clipped = ClipDenoiser(ClassifierFreeGuidance(den, w, {"y": 3}), limit=limit)(x, t, {"y": y})
    expected = guided_x0.clamp(-limit, limit)
    torch.testing.assert_close(clipped.x0, expected, rtol=1e-5, atol=1e-6)
    # eps is recomputed from the clipped x0: x_t = sqrt(a) x0 + sqrt(1 - a) eps still holds
    a = broadcast(SCHEDULE[100].alpha_bar_at(t), x)
    torch.testing.assert_close(a.sqrt() * clipped.x0 + (1 - a).sqrt() * clipped.eps, x, rtol=1e-5, atol=1e-5)
    # negative control: the clipped *unguided* x0 is visibly different
    assert (cond_x0.clamp(-limit, limit) - clipped.x0).abs().max() > 0.2 * limit


def test_batch_conditions_rejects_what_cannot_be_batched():
    with pytest.raises(ValueError, match="has batch size 3"):
        batch_conditions({"y": torch.zeros(3, dtype=torch.long)}, {"y": 0}, 4)
    with pytest.raises(ValueError, match="that cond lacks"):
        batch_conditions({"y": torch.zeros(4, dtype=torch.long)}, {"context": torch.zeros(1, 2, 3)}, 4)
    with pytest.raises(ValueError, match="needs the condition"):
        ClassifierFreeGuidance(unet_denoiser(num_classes=3), 1.0, {"y": 3})(*images(), None)
    with pytest.raises(ValueError, match="finite number"):
        ClassifierFreeGuidance(unet_denoiser(num_classes=3), math.nan, {"y": 3})
    with pytest.raises(ValueError, match="null_cond"):
        ClassifierFreeGuidance(unet_denoiser(num_classes=3), 1.0, {})


# ---------------------------------------------------------------- classifier guidance
def tiny_classifier() -> NoisyClassifier:
    torch.manual_seed(0)
    net = NoisyClassifier(image_size=8, in_channels=1, num_classes=3, model_channels=8, channel_mult=(1, 2),
                          num_res_blocks=1, attention_resolutions=(2,), num_heads=2, norm_groups=4)  # fmt: skip
    return perturbed(net).double()


def test_classifier_gradient_matches_finite_differences_even_under_no_grad():
    clf = tiny_classifier()
    den = ClassifierGuidance(unet_denoiser(), clf, 1.0, labels=torch.tensor([0, 2]))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.tensor([30.0, 70.0], dtype=torch.float64)
    y = torch.tensor([0, 2])
    with torch.no_grad():
        grad = den.gradient(x, t, y)

    def log_p(z):
        return torch.log_softmax(clf(z, t), 1)[torch.arange(2), y].sum()

    h = 1e-5
    with torch.no_grad():
        for _ in range(3):
            v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
            numeric = (log_p(x + h * v) - log_p(x - h * v)) / (2 * h)
            assert abs(float((grad * v).sum()) - float(numeric)) <= 1e-6 * max(1.0, abs(float(numeric)))
    assert grad.abs().max() > 1e-3
    assert all(p.grad is None for p in clf.parameters())


def test_classifier_guidance_with_w0_is_the_inner_model_exactly_and_shifts_eps_by_the_gradient():
    sched = SCHEDULE[100]
    inner, clf = MixtureDenoiser(MIXTURE, sched), MixtureClassifier(sched)
    x = noised_points(sched, 40)
    y = torch.arange(x.shape[0]) % K
    plain = inner(x, 40)
    same = ClassifierGuidance(inner, clf, 0.0, labels=y)(x, 40)
    assert torch.equal(same.eps, plain.eps) and torch.equal(same.x0, plain.x0)
    guided = ClassifierGuidance(inner, clf, 3.0)(x, 40, {"y": y})  # labels from cond["y"]
    g = ClassifierGuidance(inner, clf, 1.0).gradient(x, torch.full((x.shape[0],), 40), y)
    a = sched.alpha_bar_at(torch.tensor(40))
    torch.testing.assert_close(guided.eps, plain.eps - (1 - a).sqrt() * 3.0 * g)
    torch.testing.assert_close(a.sqrt() * guided.x0 + (1 - a).sqrt() * guided.eps, x)


def test_classifier_guidance_can_take_labels_from_cond_without_showing_them_to_the_inner_model():
    den, clf = unet_denoiser(), tiny_classifier().float()
    x, t = images()
    y = torch.tensor([2, 0, 1, 1])
    fixed = ClassifierGuidance(den, clf, 2.0, labels=y)(x, t)
    from_cond = ClassifierGuidance(den, clf, 2.0, strip_labels=True)(x, t, {"y": y})  # the U-Net takes no "y"
    torch.testing.assert_close(from_cond.eps, fixed.eps, atol=0, rtol=0)
    assert (fixed.eps - den(x, t).eps).abs().max() > 1e-4


def component_z_scores(x: torch.Tensor, k: int) -> dict[str, float]:
    """Share of samples the clean mixture assigns to component k, and the standardised errors of
    their mean and covariance entries against N(mu_k, S_k) (SEs as in test_samplers_support)."""
    label = MIXTURE.responsibilities(x, torch.ones(())).argmax(1)
    xs = x[label == k]
    mu, cov, n = MIXTURE.means[k], MIXTURE.covs[k], xs.shape[0]
    mean_z = ((xs.mean(0) - mu).abs() / (cov.diagonal() / n).sqrt()).max().item()
    cov_se = ((cov**2 + torch.outer(cov.diagonal(), cov.diagonal())) / n).sqrt()
    return {"share": n / x.shape[0], "mean": mean_z, "cov": ((torch.cov(xs.T) - cov).abs() / cov_se).max().item()}


def assert_samples_components(x: torch.Tensor, y: torch.Tensor, limit: float = 4.5) -> None:
    """Samples for label k come from component k: >= 99.5% in it (the components are >= 7 std
    apart) and 6 scores per class, each ~N(0, 1) under the null; all below 4.5 (false alarm < 1e-4)."""
    for k in range(K):
        z = component_z_scores(x[y == k], k)
        assert z["share"] >= 0.995 and z["mean"] < limit and z["cov"] < limit, f"class {k}: {z}"


N = 6000


def test_classifier_guidance_w1_samples_the_class_conditional_component():
    """Algorithm 2 with the exact classifier gives the exact conditional score: DDIM draws N(mu_y, S_y)."""
    sched = SCHEDULE[1000]
    y = torch.arange(N) % K
    den = ClassifierGuidance(MixtureDenoiser(MIXTURE, sched), MixtureClassifier(sched), 1.0)
    x = sample(den, (N, 2), "ddim", 200, generator=torch.Generator().manual_seed(1), progress=False,
               dtype=torch.float64, cond={"y": y})  # fmt: skip
    assert_samples_components(x, y)


def exact_component_samples(y: torch.Tensor, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    z = torch.randn(len(y), 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    chol = torch.linalg.cholesky(MIXTURE.covs[y] * scale**2)
    return MIXTURE.means[y] + shift + torch.einsum("nij,nj->ni", chol, z)


def test_component_check_accepts_the_truth_and_rejects_near_misses():
    y = torch.arange(N) % K
    assert_samples_components(exact_component_samples(y, 0), y)
    misses = {
        "ignores the label": MIXTURE.sample(N, torch.Generator().manual_seed(1)),
        "mean off by 0.05": exact_component_samples(y, 2, shift=0.05),
        "std 10% too wide": exact_component_samples(y, 3, scale=1.1),
    }
    for name, x in misses.items():
        with pytest.raises(AssertionError):
            assert_samples_components(x, y)
            print(f"not rejected: {name}")


def test_mean_shift_guidance_is_algorithm_1_step_for_step():
    """ddpm over the wrapper == a hand-written Algorithm 1 loop (mu + w Sigma grad), same noise,
    for fixed small, fixed large and learned variance on a respaced chain."""
    sched = SCHEDULE[100]
    clf = MixtureClassifier(sched)
    ts = get_timesteps(sched, 12, "linspace")
    y = torch.arange(48) % K

    class WithVarFrac(DenoiserWrapper):
        variance = "learned"

        def predict(self, x_t, t, cond):
            pred = self.inner.predict(x_t, t, cond)
            pred.var_frac = torch.sigmoid(x_t)  # any per-element value in (0, 1)
            return pred

    for variance in ("fixed_small", "fixed_large", "learned"):
        inner = MixtureDenoiser(MIXTURE, sched)
        inner = WithVarFrac(inner) if variance == "learned" else inner
        den = ClassifierGuidance(inner, clf, 2.5, y, mode="mean_shift", timesteps=ts, variance=variance)
        x_T = torch.randn(48, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        got = ddpm(den, x_T, ts, generator=torch.Generator().manual_seed(7), progress=False, variance=variance)

        respaced, n, gen, x = sched.respace(ts), len(ts), torch.Generator().manual_seed(7), x_T
        for i, t in enumerate(ts.tolist()):
            t_batch = torch.full((48,), t)
            pred = inner(x, t_batch)
            if i == n - 1:
                x = pred.x0  # the last step adds no noise and gets no shift
                break
            j = torch.tensor([n - 1 - i])
            mean = respaced.posterior_mean_coef_x0[j] * pred.x0 + respaced.posterior_mean_coef_xt[j] * x
            log_var = model_log_variance(respaced, j, variance, x, pred.var_frac)
            mean = mean + 2.5 * log_var.exp() * den.gradient(x, t_batch, y)
            x = mean + (0.5 * log_var).exp() * torch.randn(x.shape, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(got, x, atol=1e-10, rtol=1e-10)


def test_mean_shift_w1_samples_the_class_conditional_component():
    """Algorithm 1 is first order in Sigma and DDPM's fixed variance omits the posterior spread of
    x0; on all 1000 steps together they shrink the variances by ~2-3% (measured at N = 30000), well
    inside the sampling error at n = 3000 (SE of a variance ~4.5% per class). 500 steps: ~5%."""
    sched = SCHEDULE[1000]
    ts = get_timesteps(sched, 1000, "linspace")
    y = torch.arange(3000) % K
    den = ClassifierGuidance(MixtureDenoiser(MIXTURE, sched), MixtureClassifier(sched), 1.0, y,
                             mode="mean_shift", timesteps=ts)  # fmt: skip
    x = sample(den, (3000, 2), "ddpm", 1000, generator=torch.Generator().manual_seed(4), progress=False,
               dtype=torch.float64)  # fmt: skip
    assert_samples_components(x, y)


def test_classifier_guidance_rejects_bad_settings():
    sched = SCHEDULE[100]
    inner, clf = MixtureDenoiser(MIXTURE, sched), MixtureClassifier(sched)
    with pytest.raises(ValueError, match="unknown guidance mode"):
        ClassifierGuidance(inner, clf, 1.0, 0, mode="mean")
    with pytest.raises(ValueError, match="needs the sampler's timesteps"):
        ClassifierGuidance(inner, clf, 1.0, 0, mode="mean_shift")
    with pytest.raises(ValueError, match="mean_shift"):
        ClassifierGuidance(inner, clf, 1.0, 0, timesteps=[5, 3])
    den = ClassifierGuidance(inner, clf, 1.0, 0, mode="mean_shift", timesteps=[90, 50, 0])
    with pytest.raises(ValueError, match="queried at"):
        den(torch.zeros(2, 2, dtype=torch.float64), 60)
    with pytest.raises(ValueError, match="cond has no 'y'"):
        ClassifierGuidance(inner, clf, 1.0)(torch.zeros(2, 2, dtype=torch.float64), 60)
    with pytest.raises(ValueError, match="labels must be"):
        ClassifierGuidance(inner, clf, 1.0, labels="cat")


# ---------------------------------------------------------------- loaded pipelines
def test_conditioned_builds_the_guided_denoiser_for_each_kind_of_model():
    den = unet_denoiser(num_classes=3)
    guided, cond = conditioned(den, {"num_classes": 3}, 5, scale=2.0)
    assert isinstance(guided, ClassifierFreeGuidance) and cond["y"].tolist() == [0, 1, 2, 0, 1]
    _, cond = conditioned(den, {"num_classes": 3}, 2, label=1)
    assert cond["y"].tolist() == [1, 1]
    with pytest.raises(ValueError, match="labels must lie in"):
        conditioned(den, {"num_classes": 3}, 2, label=3)
    with pytest.raises(ValueError, match="not text-conditional"):
        conditioned(den, {"num_classes": 3}, 2, prompt="a red circle")
    plain = unet_denoiser()
    assert conditioned(plain, {"num_classes": None}, 2) == (plain, None)
    with pytest.raises(ValueError, match="unconditional"):
        conditioned(plain, {"num_classes": None}, 2, scale=1.0)
    with pytest.raises(ValueError, match="not class-conditional"):
        conditioned(plain, {"num_classes": None}, 2, label=1)
