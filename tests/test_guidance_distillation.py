"""Guidance distillation (Meng et al. 2023; LCM's w-embedding): a guided teacher whose weight w
comes per example with the condition, a student U-Net that takes w as an input and starts as
its teacher, the consistency task that distils one into the other, and sampling such a model
with one network call per step."""

from __future__ import annotations

import pytest
import torch

from difflab.guidance import GUIDANCE_INPUT, ClassifierFreeGuidance, GuidanceFromCondition, conditioned
from difflab.nets import UNet
from difflab.pipelines import Pipeline, read_manifest
from difflab.pipelines.folder import check_manifest, new_manifest
from difflab.schedules import Schedule
from difflab.train import run
from difflab.train.tasks.teachers import with_guidance_input
from test_guidance import ClassMixtureDenoiser, K
from test_nets_support import perturbed
from test_train_support import tiny_config

SCHEDULE = Schedule.make("linear", T=100)
TINY_UNET = {"class": "UNet", "in_channels": 1, "model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
             "attention_resolutions": [], "norm_groups": 4, "num_classes": 10, "class_dropout_prob": 0.2}  # fmt: skip


def test_per_example_weights_guide_each_example_like_its_own_scalar_cfg():
    oracle = ClassMixtureDenoiser(SCHEDULE)
    x, t = torch.randn(4, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 40, 70, 99])
    y, w = torch.tensor([0, 1, 2, 0]), torch.tensor([0.0, 1.0, 3.0, 7.5])
    got = GuidanceFromCondition(oracle, {"y": K}).predict(x, t, {"y": y, GUIDANCE_INPUT: w})
    for i in range(4):
        row = slice(i, i + 1)
        one = ClassifierFreeGuidance(oracle, float(w[i]), {"y": K}).predict(x[row], t[row], {"y": y[row]})
        torch.testing.assert_close(got.x0[row], one.x0, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got.eps[row], one.eps, atol=1e-6, rtol=1e-6)
    # negative control: the weights must reach their own rows (reversed weights give other results)
    swapped = GuidanceFromCondition(oracle, {"y": K}).predict(x, t, {"y": y, GUIDANCE_INPUT: w.flip(0)})
    assert (swapped.x0 - got.x0).abs().amax() > 1e-2


def test_guided_teacher_needs_its_weights_and_refuses_bad_ones():
    teacher = GuidanceFromCondition(ClassMixtureDenoiser(SCHEDULE), {"y": K})
    x, t = torch.zeros(2, 2), torch.tensor([5, 5])
    with pytest.raises(ValueError, match='cond\\["w"\\]'):
        teacher.predict(x, t, {"y": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match="finite"):
        teacher.predict(x, t, {"y": torch.tensor([0, 1]), "w": torch.tensor([1.0, float("nan")])})
    with pytest.raises(ValueError, match="batch size 3"):
        teacher.predict(x, t, {"y": torch.tensor([0, 1]), "w": torch.ones(3)})


def test_a_student_with_a_w_embedding_starts_as_its_teacher_and_then_depends_on_w():
    torch.manual_seed(0)
    teacher = perturbed(UNet({k: v for k, v in TINY_UNET.items() if k != "class"}))  # as if trained
    student = with_guidance_input(teacher).eval()
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([3.0, 50.0, 90.0]), torch.tensor([1, 2, 10])
    expected = teacher(x, t, {"y": y})
    for w in (0.0, 2.0, torch.tensor([0.5, 4.0, 8.0])):
        assert torch.equal(student(x, t, {"y": y, "w": w}), expected)
    with pytest.raises(ValueError, match='"w"'):
        student(x, t, {"y": y})
    with pytest.raises(ValueError, match='"w"'):
        teacher(x, t, {"y": y, "w": 1.0})  # a teacher without the embedding refuses w
    # one gradient step moves the zero-initialised last layer of the embedding: w now matters
    student.train()
    loss = student(x, t, {"y": y, "w": 3.0}).mean()
    loss.backward()
    torch.optim.SGD(student.parameters(), lr=0.1).step()
    student.eval()
    assert not torch.equal(student(x, t, {"y": y, "w": 0.0}), student(x, t, {"y": y, "w": 3.0}))


def test_a_guidance_input_model_is_sampled_with_w_in_its_condition_and_no_cfg_pass():
    oracle = ClassMixtureDenoiser(SCHEDULE)
    meta = {"conditioning": "class", "num_classes": K, "guidance_input": True}
    den, cond = conditioned(oracle, meta, 4, scale=2.5, label=1)
    assert den is oracle and torch.equal(cond["w"], torch.full((4,), 2.5)) and torch.equal(cond["y"], torch.ones(4))
    # negative control: the same model without the flag is guided by running it twice
    den, cond = conditioned(oracle, {**meta, "guidance_input": False}, 4, scale=2.5, label=1)
    assert isinstance(den, ClassifierFreeGuidance) and "w" not in cond


def test_the_manifest_accepts_guidance_input_only_for_conditional_models():
    base = new_manifest(schedule=SCHEDULE.to_config(), prediction="x0", variance="fixed_small", sample_shape=[2])
    check_manifest({**base, "conditioning": "class", "num_classes": 3, "guidance_input": True})
    with pytest.raises(ValueError, match="guidance_input"):
        check_manifest({**base, "guidance_input": True})
    with pytest.raises(ValueError, match="guidance_input"):
        check_manifest({**base, "conditioning": "class", "num_classes": 3, "guidance_input": "yes"})


@pytest.fixture(scope="module")
def class_teacher(tmp_path_factory):
    """A tiny class-conditional digits U-Net (8x8) trained with label dropout."""
    folder = tmp_path_factory.mktemp("teacher")
    cfg = tiny_config(model=TINY_UNET, diffusion={"schedule": "cosine", "T": 100}, train={"steps": 2})
    return run(cfg, folder / "run") / "model"


def test_guided_consistency_distillation_exports_a_model_that_takes_w(class_teacher, tmp_path):
    recipe = tiny_config(task="consistency", model={}, diffusion={"schedule": "cosine", "T": 100},
                         consistency={"teacher": str(class_teacher), "levels": 6, "guidance": [0.0, 4.0]},
                         train={"steps": 3, "lr": 1e-2}, sample={"guidance": 2.0})  # fmt: skip
    folder = run(recipe, tmp_path / "gcd") / "model"
    manifest = read_manifest(folder)
    assert manifest["guidance_input"] is True and manifest["consistency"]["guidance_range"] == [0.0, 4.0]
    assert manifest["sample"]["guidance"] == 2.0
    pipe = Pipeline.from_pretrained(folder, device="cpu")
    assert pipe.network.config.guidance_embedding
    a, b = pipe.generate(4, seed=0, label=3, guidance=0.0), pipe.generate(4, seed=0, label=3, guidance=4.0)
    assert a.shape == (4, 1, 8, 8) and not torch.equal(a, b)  # trained: w reaches the samples


def test_guidance_distillation_refuses_an_unconditional_teacher(tmp_path):
    teacher = run(tiny_config(diffusion={"schedule": "cosine", "T": 100}, train={"steps": 1}), tmp_path / "t") / "model"
    recipe = tiny_config(task="consistency", model={}, diffusion={"T": 100},
                         consistency={"teacher": str(teacher), "guidance": [0.0, 4.0]})  # fmt: skip
    with pytest.raises(ValueError, match="class-conditional teacher"):
        run(recipe, tmp_path / "gcd")
