"""The shapes judge: accuracy is 'every attribute of the prompt read back', computed exactly as
the heads' arg-max says; larger images are area-pooled to the classifier's input."""

import pytest
import torch
import torch.nn.functional as F

from difflab.data import get_dataset
from difflab.data.shape_scenes import ATTRIBUTES, parse_caption
from difflab.eval.shapes import ShapesJudge
from difflab.nets import AttributeClassifier


def test_judge_scores_match_the_heads_and_pool_large_images():
    torch.manual_seed(0)
    classifier = AttributeClassifier(image_size=8, channels=(4,), feature_dim=8).eval()
    test = get_dataset("shapes", "test", size=16, n=12)
    prompts = [test[i]["caption"] for i in range(12)]
    real = torch.stack([test[i]["x"] for i in range(12)])
    judge = ShapesJudge(classifier, prompts, real)

    scores = judge(real)
    with torch.no_grad():
        logits = classifier(F.avg_pool2d(real, 2))
    right = torch.ones(12, dtype=torch.bool)
    for name, out in logits.items():
        target = torch.tensor([ATTRIBUTES[name].index(parse_caption(p)[0][name]) for p in prompts])
        assert scores[f"acc_{name}"] == pytest.approx((out.argmax(1) == target).double().mean().item())
        right &= out.argmax(1) == target
    assert scores["accuracy"] == pytest.approx(right.double().mean().item())
    assert abs(scores["attribute_fd"]) < 1e-6  # the real scenes against themselves

    with pytest.raises(ValueError, match="got 3 images for 12 prompts"):
        judge(real[:3])
    with pytest.raises(ValueError, match="reads 8x8 images"):
        judge(torch.zeros(12, 3, 12, 12))
    with pytest.raises(ValueError, match="single-object prompts"):
        ShapesJudge(classifier, ["a red circle at the top left and a blue square at the middle centre"], real[:1])
