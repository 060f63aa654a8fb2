"""Behaviour of difflab.guidance that the mutation run (benchmarks/mutation.py) showed untested:
scale checks, how cond entries are broadcast, padded and batched, the CFG and classifier-guidance
arithmetic against hand-computed values, per-example weights, the mean-shift step variance and
the exact error messages."""

from __future__ import annotations

import math
import re

import pytest
import torch

from difflab.denoiser import Denoiser
from difflab.guidance import (
    AncestralVariance,
    ClassifierFreeGuidance,
    ClassifierGuidance,
    GuidanceFromCondition,
    _concat,
    _pad_context,
    as_saved,
    batch_conditions,
    check_scale,
    class_guidance,
    class_labels,
    conditioned,
    encode_prompts,
    expand_entry,
    guidance_weights,
    text_encoder_of,
    text_guidance,
)
from difflab.process import Prediction, model_log_variance
from difflab.schedules import Schedule
from test_messages_support import exact

S = Schedule.make("linear", T=100)


class Table(Denoiser):
    """x0 = x_t * (1 + y), eps = x_t - y (y = cond["y"] per example), var_frac = y / 10;
    records every call."""

    def __init__(self, variance="fixed_small"):
        self.schedule, self.variance, self.calls = S, variance, []

    def predict(self, x_t, t, cond):
        self.calls.append((x_t, t, cond))
        y = (cond or {}).get("y", torch.zeros(x_t.shape[0]))
        y = torch.as_tensor(y, dtype=x_t.dtype).reshape(-1, *[1] * (x_t.ndim - 1))
        return Prediction(x0=x_t * (1 + y), eps=x_t - y, var_frac=(y / 10).expand_as(x_t))


# ---------------------------------------------------------------- scales and entries
@pytest.mark.parametrize("bad", [True, "1", math.inf, -math.inf, math.nan, None])
def test_check_scale_rejects_non_numbers(bad):
    message = f"guidance scale must be a finite number (0 = no guidance), got {bad!r}"
    with pytest.raises(ValueError, match=exact(message)):
        check_scale(bad)


def test_check_scale_returns_a_float():
    assert check_scale(2) == 2.0 and type(check_scale(2)) is float
    assert check_scale(-1.5) == -1.5


def test_expand_entry_broadcasts_each_kind():
    labels = expand_entry("y", 3, 4)
    assert labels.dtype == torch.long and labels.tolist() == [3, 3, 3, 3]
    assert expand_entry("c", "a cat", 3) == ["a cat"] * 3
    assert expand_entry("y", torch.tensor(2.0), 3).tolist() == [2.0, 2.0, 2.0]
    full = torch.arange(3)
    assert expand_entry("y", full, 3) is full
    assert expand_entry("c", torch.ones(1, 2), 3).shape == (3, 2)
    assert expand_entry("c", ["a"], 2) == ["a", "a"]
    assert expand_entry("c", ("a", "b"), 2) == ["a", "b"]
    nested = expand_entry("r", [torch.ones(1, 2), torch.zeros(3, 1)], 3)
    assert [tuple(v.shape) for v in nested] == [(3, 2), (3, 1)]


@pytest.mark.parametrize("value, message", [
    (True, 'cond["k"] must be a tensor, an int label, a string or a list, got a bool'),
    (torch.zeros(2), 'cond["k"] has batch size 2 (Tensor); it must be 1 (broadcast) or 3'),
    (["a", "b"], 'cond["k"] has batch size 2 (list); it must be 1 (broadcast) or 3'),
    ([1], 'cond["k"] has batch size 1 (list); it must be 1 (broadcast) or 3'),
    (2.5, 'cond["k"] has batch size None (float); it must be 1 (broadcast) or 3'),
])  # fmt: skip
def test_expand_entry_names_what_cannot_be_broadcast(value, message):
    with pytest.raises(ValueError, match=exact(message)):
        expand_entry("k", value, 3)


def test_pad_context_pads_with_zeros_and_masks_the_padding():
    ctx = torch.ones(2, 2, 3)
    padded, mask = _pad_context(ctx, None, 4)
    assert padded.shape == (2, 4, 3) and padded[:, 2:].abs().sum() == 0 and torch.equal(padded[:, :2], ctx)
    assert mask.dtype == torch.bool and mask.tolist() == [[True, True, False, False]] * 2
    given = torch.tensor([[True, False], [True, True]])
    same, kept = _pad_context(ctx, given, 2)
    assert same is ctx and kept is given


def test_concat_tensors_lists_and_nested_lists():
    out = _concat("y", torch.tensor([1.0]), torch.tensor([2], dtype=torch.long))
    assert out.dtype == torch.float32 and out.tolist() == [1.0, 2.0]
    # the second takes the first's dtype, also where promotion would widen it
    assert _concat("c", torch.zeros(1), torch.ones(1, dtype=torch.float64)).dtype == torch.float32
    assert _concat("c", ["a"], ["b"]) == ["a", "b"]
    nested = _concat("r", [torch.zeros(1), torch.ones(1)], [torch.ones(1), torch.zeros(1)])
    assert [v.tolist() for v in nested] == [[0.0, 1.0], [1.0, 0.0]]
    with pytest.raises(ValueError, match=exact('cannot batch cond["k"]: Tensor and list')):
        _concat("k", torch.zeros(1), [1])


def test_batch_conditions_stacks_cond_first_and_shares_cond_only_entries():
    out = batch_conditions({"y": torch.tensor([0, 1]), "concat": torch.ones(1, 3), "drop": None},
                           {"y": 5, "unused": None}, 2)  # fmt: skip
    assert sorted(out) == ["concat", "y"]
    assert out["y"].tolist() == [0, 1, 5, 5] and out["concat"].shape == (4, 3)


def test_batch_conditions_names_extra_keys():
    with pytest.raises(ValueError, match=exact(
        "the null/negative condition has key(s) ['a', 'z'] that cond lacks; cond has ['y']"
    )):  # fmt: skip
        batch_conditions({"y": 0}, {"z": 1, "a": 2, "y": 1}, 2)


def test_batch_conditions_pads_contexts_of_different_lengths():
    out = batch_conditions({"context": torch.ones(1, 3, 2)}, {"context": torch.full((1, 1, 2), 2.0)}, 2)
    assert out["context"].shape == (4, 3, 2)
    assert out["context_mask"].tolist() == [[True] * 3] * 2 + [[True, False, False]] * 2
    assert out["context"][2:, 1:].abs().sum() == 0


def test_batch_conditions_never_lends_conds_mask_to_the_other_context():
    cond = {"context": torch.ones(1, 2, 2), "context_mask": torch.tensor([[True, False]])}
    out = batch_conditions(cond, {"context": torch.ones(1, 2, 2)}, 1)
    assert out["context_mask"].tolist() == [[True, False], [True, True]]


def test_batch_conditions_leaves_equal_length_unmasked_contexts_alone():
    out = batch_conditions({"context": torch.ones(1, 2, 2)}, {"context": torch.zeros(1, 2, 2)}, 1)
    assert sorted(out) == ["context"] and out["context"].shape == (2, 2, 2)


def test_batch_conditions_copies_the_mask_when_other_has_no_context():
    cond = {"context": torch.ones(1, 2, 2), "context_mask": torch.tensor([[True, False]]), "y": 1}
    out = batch_conditions(cond, {"y": 0}, 1)
    assert out["context_mask"].tolist() == [[True, False], [True, False]]
    assert out["y"].tolist() == [1, 0]


# ---------------------------------------------------------------- classifier-free guidance
def test_cfg_rejects_bad_conditions_with_messages():
    with pytest.raises(ValueError, match=exact("null_cond must be a non-empty dict of condition entries, got {}")):
        ClassifierFreeGuidance(Table(), 1.0, {})
    with pytest.raises(ValueError, match=exact("negative_cond must be a non-empty dict of condition entries, got [1]")):
        ClassifierFreeGuidance(Table(), 1.0, {"y": 0}, [1])
    with pytest.raises(ValueError, match=exact(
        "null_cond is required: the condition the model was trained to treat as 'none'"
    )):  # fmt: skip
        ClassifierFreeGuidance(Table(), 1.0, None)
    for cond in (None, {}):
        with pytest.raises(ValueError, match=exact(
            "classifier-free guidance needs the condition: pass cond (e.g. {'y': labels})"
        )):  # fmt: skip
            ClassifierFreeGuidance(Table(), 1.0, {"y": 0})(torch.ones(2, 1), 5, cond)


def test_cfg_combines_both_halves_with_weight_w():
    inner, x = Table(), torch.tensor([[1.0], [2.0]])
    pred = ClassifierFreeGuidance(inner, 3.0, {"y": 0})(x, 5, {"y": torch.tensor([1, 2])})
    assert len(inner.calls) == 1 and inner.calls[0][0].shape == (4, 1)
    # x0_c = x (1 + y), x0_u = x: x0 = x0_c + 3 (x0_c - x0_u); eps_c = x - y, eps_u = x
    assert pred.x0.tolist() == [[1.0 * 2 + 3 * 1.0], [2.0 * 3 + 3 * 4.0]]
    assert pred.eps.tolist() == [[0.0 - 3.0], [0.0 - 6.0]]
    assert torch.equal(pred.var_frac, torch.tensor([[0.1], [0.2]]))


def test_cfg_uses_the_negative_condition_instead_of_the_null_one():
    inner = Table()
    pred = ClassifierFreeGuidance(inner, 1.0, {"y": 0}, {"y": 1})(torch.ones(1, 1), 5, {"y": 3})
    assert inner.calls[0][2]["y"].tolist() == [3, 1]
    assert pred.x0.tolist() == [[4.0 + (4.0 - 2.0)]]


def test_cfg_with_scale_zero_calls_the_inner_model_once_on_cond():
    inner = Table()
    cond = {"y": torch.tensor([2])}
    pred = ClassifierFreeGuidance(inner, 0, {"y": 0})(torch.ones(1, 1), 5, cond)
    assert len(inner.calls) == 1 and inner.calls[0][2] is cond and pred.x0.tolist() == [[3.0]]


def test_cfg_without_learned_variance_has_no_var_frac():
    class NoVar(Table):
        def predict(self, x_t, t, cond):
            pred = super().predict(x_t, t, cond)
            return Prediction(pred.x0, pred.eps)

    assert ClassifierFreeGuidance(NoVar(), 1.0, {"y": 0})(torch.ones(1, 1), 5, {"y": 1}).var_frac is None


def test_per_example_weights_come_from_cond_w():
    inner, x = Table(), torch.ones(2, 1)
    guided = GuidanceFromCondition(inner, {"y": 0})
    assert guided.scale == 1.0
    pred = guided(x, 5, {"y": 1, "w": torch.tensor([0.0, 2.0])})
    assert "w" not in inner.calls[0][2]
    assert pred.x0.tolist() == [[2.0], [2.0 + 2 * 1.0]] and pred.eps.tolist() == [[0.0], [-2.0]]
    pred = guided(x, 5, {"y": 1, "w": 3})
    assert pred.x0.tolist() == [[5.0], [5.0]]


def test_guidance_from_condition_needs_w():
    for cond in (None, {"y": 1}):
        with pytest.raises(ValueError, match=exact('GuidanceFromCondition needs the guidance weights in cond["w"]')):
            GuidanceFromCondition(Table(), {"y": 0})(torch.ones(1, 1), 5, cond)


def test_guidance_weights_accepts_numbers_and_vectors():
    w = guidance_weights(2, 3)
    assert w.dtype == torch.float32 and w.tolist() == [2.0] * 3
    assert guidance_weights(torch.tensor([1, 2], dtype=torch.float64), 2).dtype == torch.float32
    assert guidance_weights(torch.tensor([1, 2]), 2).tolist() == [1.0, 2.0]


@pytest.mark.parametrize("bad", [True, "2", torch.ones(2, 1), torch.ones(2, dtype=torch.complex64),
                                 torch.ones(2, dtype=torch.bool), [1.0, 2.0]])  # fmt: skip
def test_guidance_weights_rejects_what_is_not_a_weight(bad):
    message = f'cond["w"] must be a number or a (B,) tensor of guidance weights, got {bad!r}'
    with pytest.raises(ValueError, match=exact(message)):
        guidance_weights(bad, 2)


def test_guidance_weights_must_be_finite():
    with pytest.raises(ValueError, match=exact('cond["w"] must be finite, got [1.0, nan]')):
        guidance_weights(torch.tensor([1.0, math.nan]), 2)
    with pytest.raises(ValueError, match="finite number"):
        guidance_weights(math.inf, 2)


# ---------------------------------------------------------------- classifier guidance
class Linear:
    """logits = x @ W^T: grad_x log p(y | x) = W_y - softmax(x W^T) W."""

    def __init__(self):
        self.W = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]], dtype=torch.float64)
        self.seen = []

    def __call__(self, x, t):
        self.seen.append(t)
        return x @ self.W.T

    def grad(self, x, y):
        return self.W[y] - torch.softmax(x @ self.W.T, 1) @ self.W


X = torch.tensor([[0.5, -1.0], [2.0, 0.3]], dtype=torch.float64)


def test_classifier_gradient_is_the_log_softmax_gradient_of_each_label():
    clf = Linear()
    guided = ClassifierGuidance(Table(), clf, 1.0, 0)
    y = torch.tensor([1, 2])
    with torch.no_grad():
        grad = guided.gradient(X, torch.tensor([5, 5]), y)
    assert torch.allclose(grad, clf.grad(X, y))


@pytest.mark.parametrize("out, got", [(torch.zeros(3, 2), "(3, 2)"), (torch.zeros(2), "(2,)"), ([0.0], "list")])
def test_classifier_output_is_checked(out, got):
    guided = ClassifierGuidance(Table(), lambda x, t: out, 1.0, 0)
    with pytest.raises(ValueError, match=exact(f"the classifier must return logits of shape (2, classes), got {got}")):
        guided.gradient(X, torch.tensor([5, 5]), torch.tensor([0, 0]))


def test_score_guidance_shifts_eps_and_x0_by_the_scaled_gradient():
    clf, inner = Linear(), Table()
    t = torch.tensor([30, 70])
    pred = ClassifierGuidance(inner, clf, 2.0, torch.tensor([1, 2]))(X, t, None)
    base = inner.predict(X, t, None)
    a = S.alpha_bar_at(t).to(torch.float64)[:, None]
    g = clf.grad(X, torch.tensor([1, 2]))
    assert torch.allclose(pred.eps, base.eps - (1 - a).sqrt() * 2.0 * g)
    assert torch.allclose(pred.x0, base.x0 + (1 - a) / a.sqrt() * 2.0 * g)
    assert torch.equal(pred.var_frac, base.var_frac)
    assert torch.equal(clf.seen[0], t)


def test_classifier_guidance_reads_and_optionally_strips_labels_from_cond():
    clf, inner = Linear(), Table()
    pred = ClassifierGuidance(inner, clf, 1.0, strip_labels=True)(X, 40, {"y": 1, "other": 2})
    assert inner.calls[-1][2] == {"other": 2}
    g = clf.grad(X, torch.tensor([1, 1]))
    a = S.alpha_bar_at(torch.tensor(40)).to(torch.float64)
    assert torch.allclose(pred.eps, X - (1 - a).sqrt() * g)
    ClassifierGuidance(inner, clf, 1.0, strip_labels=True)(X, 40, {"y": 1})
    assert inner.calls[-1][2] is None
    ClassifierGuidance(inner, clf, 1.0)(X, 40, {"y": 0})
    assert inner.calls[-1][2] == {"y": 0}


def test_classifier_guidance_with_scale_zero_needs_no_labels():
    inner, clf = Table(), Linear()
    pred = ClassifierGuidance(inner, clf, 0.0)(X, 40, None)
    assert torch.equal(pred.x0, X) and clf.seen == []


def test_classifier_guidance_options_are_checked_with_messages():
    clf = Linear()
    with pytest.raises(ValueError, match=exact("classifier must be callable as classifier(x_t, t) -> logits, got 3")):
        ClassifierGuidance(Table(), 3, 1.0)
    with pytest.raises(ValueError, match=exact("unknown guidance mode 'x'; allowed: score, mean_shift")):
        ClassifierGuidance(Table(), clf, 1.0, mode="x")
    for labels in (True, 1.5):
        with pytest.raises(ValueError, match=exact(
            f"labels must be an int, a (B,) integer tensor or None (read cond['y']), got {labels!r}"
        )):  # fmt: skip
            ClassifierGuidance(Table(), clf, 1.0, labels)
    for options in ({"timesteps": [3, 1]}, {"variance": "fixed_large"}):
        with pytest.raises(ValueError, match=exact('timesteps and variance are options of mode="mean_shift" only')):
            ClassifierGuidance(Table(), clf, 1.0, **options)
    no_y = "ClassifierGuidance without labels reads cond['y'], but cond has no 'y'"
    with pytest.raises(ValueError, match=exact(no_y)):
        ClassifierGuidance(Table(), clf, 1.0)(X, 5, {"y": None})


def test_classifier_guidance_defaults():
    guided = ClassifierGuidance(Table(), Linear(), 1)
    assert guided.mode == "score" and guided.strip_labels is False and guided.step_variance is None
    assert guided.scale == 1.0 and guided.labels is None


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_mean_shift_moves_x0_by_sigma_over_c_x0_times_the_gradient(variance):
    clf, inner = Linear(), Table(variance)
    steps = [80, 40, 0]
    guided = ClassifierGuidance(inner, clf, 2.0, 1, mode="mean_shift", timesteps=steps)
    assert guided.step_variance.kind == variance
    respaced = S.respace(torch.tensor(steps))
    for i, t in enumerate(steps):
        pred = guided(X, t, None)
        base = inner.predict(X, torch.tensor([t, t]), None)
        j = len(steps) - 1 - i
        log_var = model_log_variance(respaced, torch.tensor([j, j]), variance, X, None)
        shift = 0 if j == 0 else log_var.exp() / respaced.posterior_mean_coef_x0[j]
        expected = base.x0 + shift * 2.0 * clf.grad(X, torch.tensor([1, 1]))
        assert torch.allclose(pred.x0, expected), t
        assert torch.allclose(X, S.alpha_bar_at(torch.tensor(t)).sqrt() * pred.x0
                              + (1 - S.alpha_bar_at(torch.tensor(t))).sqrt() * pred.eps)  # fmt: skip
        assert torch.equal(pred.var_frac, base.var_frac)


def test_mean_shift_variance_follows_the_sampler_setting_over_the_inner_one():
    guided = ClassifierGuidance(Table("fixed_small"), Linear(), 1.0, 0, mode="mean_shift", timesteps=[9, 3],
                                variance="fixed_large")  # fmt: skip
    assert guided.step_variance.kind == "fixed_large"


@pytest.mark.parametrize("timesteps", [[3.0, 1.0], [[3, 1]], [], [1, 3], [3, 3]])
def test_mean_shift_timesteps_must_descend(timesteps):
    shown = torch.as_tensor(timesteps).tolist()
    with pytest.raises(ValueError, match=exact(
        f"mean_shift timesteps must be a descending 1-D list of integer indices, got {shown}"
    )):  # fmt: skip
        AncestralVariance(S, timesteps, "fixed_small")


def test_mean_shift_needs_timesteps_with_message():
    with pytest.raises(ValueError, match=exact(
        'mode="mean_shift" needs the sampler\'s timesteps, e.g. get_timesteps(schedule, steps, "linspace")'
    )):  # fmt: skip
        AncestralVariance(S, None, "fixed_small")


def test_step_index_finds_each_timestep_and_rejects_others():
    av = AncestralVariance(S, [99, 50, 7], "fixed_small")
    assert av.step_index(torch.tensor([99, 50, 7, 50])).tolist() == [0, 1, 2, 1]
    assert av.j.tolist() == [2, 1, 0]
    with pytest.raises(ValueError, match=exact(
        "mean_shift guidance was set up for timesteps [99, 50, 7] but was queried at t = [8.0, 100.0]; "
        "pass the same timesteps the sampler visits"
    )):  # fmt: skip
        av.step_index(torch.tensor([100, 8, 8]))


def test_a_single_step_chain_has_no_shift():
    av = AncestralVariance(S, [60], "fixed_small")
    out = av.variance_over_coef(torch.tensor([60]), None, torch.zeros(1, 2, dtype=torch.float32))
    assert out.dtype == torch.float32 and out.tolist() == [[0.0, 0.0]]


# ---------------------------------------------------------------- loaded pipelines
class Encoder:
    def encode(self, prompts):
        return {"context": torch.ones(len(prompts), 1, 2), "prompts": prompts}


def test_text_encoder_of_looks_through_ddp_and_names_plain_networks():
    class Net(torch.nn.Module):
        pass

    net = Net()
    net.text_encoder = enc = Encoder()

    class Wrapped:
        module = net

    assert text_encoder_of(type("D", (), {"net": net})()) is enc
    assert text_encoder_of(type("D", (), {"net": Wrapped()})()) is enc
    with pytest.raises(ValueError, match=exact("Linear is not text-conditional (it has no text_encoder)")):
        text_encoder_of(type("D", (), {"net": torch.nn.Linear(1, 1)})())
    with pytest.raises(ValueError, match=exact("NoneType is not text-conditional (it has no text_encoder)")):
        text_encoder_of(Table())


def test_class_guidance_uses_the_label_after_the_classes_as_null():
    guided = class_guidance(Table(), 4.0, 2.0)
    assert guided.null_cond == {"y": 4} and type(guided.null_cond["y"]) is int and guided.scale == 2.0


def test_as_saved_reads_the_thresholding_settings():
    inner = Table()
    assert as_saved(inner, {}) is inner
    clip = as_saved(inner, {"thresholding": "static", "thresholding_limit": 3.0})
    assert clip.limit == 3.0
    dyn = as_saved(inner, {"thresholding": "dynamic"})
    assert dyn.percentile == 0.995
    assert as_saved(inner, {"thresholding": "static"}).limit == 1.0
    assert as_saved(inner, {"thresholding": "dynamic", "thresholding_percentile": 0.9}).percentile == 0.9


def test_class_labels_cycle_or_follow_the_given_labels():
    assert class_labels(5, 2).tolist() == [0, 1, 0, 1, 0]
    assert class_labels(3, 4, 2).tolist() == [2, 2, 2]
    labels = class_labels(2, 4, [3, 0])
    assert labels.dtype == torch.long and labels.tolist() == [3, 0]
    for bad in (-1, 4, [0, 4]):
        with pytest.raises(ValueError, match=r"^labels must lie in \[0, 3\], got "):
            class_labels(2, 4, bad)


# ---------------------------------------------------------------- conditioned: text and distilled models
class TextNet(torch.nn.Module):
    """A text-conditional network stand-in: its encoder records the prompts it encodes."""

    def __init__(self):
        super().__init__()
        self.text_encoder, self.seen = self, []

    def encode(self, prompts):
        self.seen.append(prompts)
        return {"context": torch.full((len(prompts), 1, 2), float(len(prompts[0]))),
                "context_mask": torch.ones(len(prompts), 1, dtype=torch.bool)}  # fmt: skip


class TextModel(Table):
    def __init__(self):
        super().__init__()
        self.net = TextNet()


def test_encode_prompts_needs_a_list_of_strings():
    model = TextModel()
    for bad in ("a cat", ["a", 1]):
        with pytest.raises(ValueError, match=exact(f"prompts must be a list of strings, got {bad!r}")):
            encode_prompts(model, bad)
    assert encode_prompts(model, ("a", "bb"))["context"].shape == (2, 1, 2) and model.net.seen == [["a", "bb"]]


def test_text_guidance_uses_the_empty_caption_or_the_negative_prompt():
    model = TextModel()
    guided = text_guidance(model, 2.5)
    assert model.net.seen == [[""]] and guided.negative_cond is None and guided.scale == 2.5
    assert guided.null_cond["context"].tolist() == [[[0.0, 0.0]]]
    guided = text_guidance(model, 1.0, "blurry")
    assert model.net.seen[1:] == [[""], ["blurry"]] and guided.negative_cond["context"].tolist() == [[[6.0, 6.0]]]


def test_conditioned_text_models_encode_one_prompt_per_sample():
    model = TextModel()
    guided, cond = conditioned(model, {"conditioning": "text"}, 3, scale=2.0, prompt="ab", negative_prompt="neg")
    assert isinstance(guided, ClassifierFreeGuidance) and guided.scale == 2.0
    assert model.net.seen[-1] == ["ab", "ab", "ab"] and guided.negative_cond["context"][0, 0, 0] == 3.0
    assert sorted(cond) == ["context", "context_mask"] and cond["context"].shape == (3, 1, 2)
    _, cond = conditioned(model, {"conditioning": "text"}, 2, prompt=["a", "bcd"])
    assert model.net.seen[-1] == ["a", "bcd"]


def test_conditioned_text_models_are_thresholded_outside_the_guidance():
    guided, _ = conditioned(TextModel(), {"conditioning": "text", "thresholding": "static"}, 1, scale=1.0, prompt="a")
    assert isinstance(guided.inner, ClassifierFreeGuidance) and guided.limit == 1.0


def test_conditioned_rejects_what_the_model_cannot_take():
    model = TextModel()
    no_prompt = 'the model is text-conditional: give a prompt ("" samples without a caption)'
    with pytest.raises(ValueError, match=exact(no_prompt)):
        conditioned(model, {"conditioning": "text"}, 2)
    with pytest.raises(ValueError, match=exact("label given, but the model is not class-conditional")):
        conditioned(model, {"conditioning": "text"}, 2, prompt="a", label=1)
    with pytest.raises(ValueError, match=exact(
        "a guidance-distilled model takes w as an input and has no negative prompt"
    )):  # fmt: skip
        conditioned(model, {"conditioning": "text", "guidance_input": True}, 2, prompt="a", negative_prompt="b")
    with pytest.raises(ValueError, match=exact(
        "unknown conditioning 'audio' in the model's diffusion.json; allowed: class, text"
    )):  # fmt: skip
        conditioned(model, {"conditioning": "audio"}, 2)
    with pytest.raises(ValueError, match=exact("prompt/negative_prompt given, but the model is not text-conditional")):
        conditioned(model, {"num_classes": 3}, 2, negative_prompt="b")
    with pytest.raises(ValueError, match=exact("guidance scale given, but the model is unconditional")):
        conditioned(model, {}, 2, scale=0.5)
    with pytest.raises(ValueError, match="finite number"):
        conditioned(model, {}, 2, scale=math.nan)
    with pytest.raises(ValueError, match=re.escape('cond["caption"] has batch size 2 (list); it must be 1')):
        conditioned(model, {"conditioning": "text"}, 3, prompt=["a", "b"])


def test_conditioned_guidance_distilled_models_take_w_as_an_input():
    model = TextModel()
    guided, cond = conditioned(model, {"conditioning": "text", "guidance_input": 1}, 2, scale=3.0, prompt="a")
    assert guided is model and cond["w"].tolist() == [3.0, 3.0] and cond["w"].dtype == torch.float32
    guided, cond = conditioned(model, {"num_classes": 4, "guidance_input": True}, 3, scale=1.5, label=2)
    assert guided is model and cond["y"].tolist() == [2, 2, 2] and cond["w"].tolist() == [1.5] * 3


def test_conditioned_class_models_guide_with_the_null_label():
    model = Table()
    guided, cond = conditioned(model, {"conditioning": "class", "num_classes": 3}, 4, scale=2.0)
    assert guided.null_cond == {"y": 3} and guided.scale == 2.0 and sorted(cond) == ["y"]
    assert cond["y"].dtype == torch.long and cond["y"].tolist() == [0, 1, 2, 0]
    plain, none = conditioned(model, {"num_classes": 0}, 2)
    assert plain is model and none is None


# ---------------------------------------------------------------- messages name the entry; shapes are read by axis
def test_batching_errors_name_the_entry():
    with pytest.raises(ValueError, match=exact('cond["c"] has batch size 2 (Tensor); it must be 1 (broadcast) or 3')):
        batch_conditions({"c": torch.zeros(2)}, {}, 3)
    with pytest.raises(ValueError, match=exact('cond["c"] has batch size 2 (Tensor); it must be 1 (broadcast) or 3')):
        batch_conditions({"c": torch.zeros(3)}, {"c": torch.zeros(2)}, 3)
    with pytest.raises(ValueError, match=exact('cannot batch cond["c"]: Tensor and list')):
        batch_conditions({"c": torch.zeros(1)}, {"c": [torch.zeros(1)]}, 1)
    with pytest.raises(ValueError, match=exact('cannot batch cond["r"]: Tensor and str')):
        _concat("r", [torch.zeros(1)], ["a"])
    with pytest.raises(ValueError, match=exact('cond["r"] has batch size 2 (Tensor); it must be 1 (broadcast) or 3')):
        expand_entry("r", [torch.zeros(2)], 3)
    with pytest.raises(ValueError, match=exact('cond["w"] has batch size 2 (Tensor); it must be 1 (broadcast) or 3')):
        guidance_weights(torch.zeros(2), 3)
    with pytest.raises(ValueError, match=exact('cond["y"] has batch size 2 (Tensor); it must be 1 (broadcast) or 3')):
        class_labels(3, 4, [0, 1])
    with pytest.raises(ValueError, match=exact('cond["y"] has batch size 3 (Tensor); it must be 1 (broadcast) or 2')):
        ClassifierGuidance(Table(), Linear(), 1.0, torch.tensor([0, 1, 2]))(X, 5, None)


def test_nested_lists_of_different_lengths_cannot_be_batched():
    with pytest.raises(ValueError):
        _concat("r", [torch.zeros(1), torch.zeros(1)], [torch.zeros(1)])


def test_contexts_are_compared_by_length_not_width():
    out = batch_conditions({"context": torch.ones(1, 2, 6)}, {"context": torch.ones(1, 4, 6)}, 1)
    assert out["context"].shape == (2, 4, 6) and out["context_mask"].tolist()[0] == [True] * 2 + [False] * 2
    same = batch_conditions({"context": torch.ones(1, 3, 5)}, {"context": torch.zeros(1, 3, 5)}, 1)
    assert "context_mask" not in same


def test_per_example_weights_multiply_the_difference():
    """x0_c - x0_u = 6 and eps_c - eps_u = -3 (not +-1, where w * d and w / d agree)."""
    inner, x = Table(), torch.full((2, 1), 2.0)
    pred = GuidanceFromCondition(inner, {"y": 0})(x, 5, {"y": 3, "w": torch.tensor([0.5, 2.0])})
    assert pred.x0.tolist() == [[8.0 + 0.5 * 6.0], [8.0 + 2.0 * 6.0]]
    assert pred.eps.tolist() == [[-1.0 - 0.5 * 3.0], [-1.0 - 2.0 * 3.0]]


def test_guidance_from_condition_uses_the_negative_condition():
    inner = Table()
    GuidanceFromCondition(inner, {"y": 0}, {"y": 2})(torch.ones(1, 1), 5, {"y": 1, "w": 1.0})
    assert inner.calls[0][2]["y"].tolist() == [1, 2]


def test_classifier_shape_error_names_the_batch_size():
    x = torch.zeros(3, 2, dtype=torch.float64)
    guided = ClassifierGuidance(Table(), lambda x, t: torch.zeros(2, 2), 1.0, 0)
    with pytest.raises(ValueError, match=exact("the classifier must return logits of shape (3, classes), got (2, 2)")):
        guided.gradient(x, torch.tensor([5, 5, 5]), torch.tensor([0, 0, 0]))


def test_an_empty_list_entry_is_refused_not_passed_on():
    """An empty list used to pass the "every item is a tensor" check and come back as []."""
    from difflab.guidance import expand_entry

    with pytest.raises(ValueError, match='cond\\["k"\\]'):
        expand_entry("k", [], 3)
