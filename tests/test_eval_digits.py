"""The shipped digits classifier, digits metrics (FD, confidence, histogram), the real-vs-real
floor and the NLL helper: behaviour on real digits, on noise, on collapsed sets, and bad input."""

import json
from functools import lru_cache

import pytest
import torch
from safetensors.torch import load_file, save_file

from difflab.data import get_dataset
from difflab.denoiser import Denoiser, MixtureDenoiser
from difflab.eval.digits_classifier import (
    DigitsClassifier,
    accuracy,
    load_classifier,
    load_digits_classifier,
    random_outliers,
    random_shift,
    save_classifier,
    train_digits_classifier,
)
from difflab.eval.frechet import frechet_distance
from difflab.eval.metrics import digits_metrics, nll_bpd, real_vs_real_floor
from difflab.losses import nll_bits_per_dim
from difflab.mixture import GaussianMixture
from difflab.process import Prediction
from difflab.schedules import Schedule, linear_betas


@lru_cache(maxsize=4)
def digits(split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    ds = get_dataset("digits", split=split, size=size)
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([it["x"] for it in items]), torch.stack([it["y"] for it in items])


@pytest.fixture(scope="module")
def clf16():
    return load_digits_classifier(16)


# ---------------------------------------------------------------- the shipped classifier
@pytest.mark.parametrize("size", [16, 32])
def test_shipped_classifier_accuracy(size):
    model = load_digits_classifier(size)
    assert not model.training
    x, y = digits("test", size)
    assert len(x) == 297
    acc = accuracy(model, x, y)
    assert acc >= 0.97, f"size {size}: test accuracy {acc:.4f} below 0.97"


def test_features_shape_and_head(clf16):
    x, _ = digits("test", 16)
    with torch.no_grad():
        f, logits = clf16.features(x[:7]), clf16(x[:7])
    assert f.shape == (7, 64) == (7, clf16.feature_dim)
    assert logits.shape == (7, 10)
    assert (f >= 0).all()  # ReLU features
    torch.testing.assert_close(clf16.classify(f), logits)


def test_classifier_rejects_wrong_input(clf16):
    with pytest.raises(ValueError, match=r"\(B, 1, 16, 16\)"):
        clf16(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="floating-point"):
        clf16(torch.zeros(2, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="sizes"):
        load_digits_classifier(8)
    with pytest.raises(ValueError, match="size must be one of"):
        DigitsClassifier(size=28)


# ---------------------------------------------------------------- save / load
def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = DigitsClassifier(size=16, channels=(4, 8), feature_dim=12).eval()
    save_classifier(model, tmp_path / "c", meta={"note": "tiny"})
    loaded = load_classifier(tmp_path / "c")
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert json.loads((tmp_path / "c" / "config.json").read_text())["meta"] == {"note": "tiny"}


def test_load_errors(tmp_path):
    model = DigitsClassifier(size=16, channels=(4, 8), feature_dim=12)
    d = save_classifier(model, tmp_path / "c")
    config = json.loads((d / "config.json").read_text())

    (d / "config.json").write_text(json.dumps({**config, "dropout": 0.1}))
    with pytest.raises(ValueError, match=r"unknown keys \['dropout'\]"):
        load_classifier(d)

    (d / "config.json").write_text(json.dumps({**config, "feature_dim": 13}))
    with pytest.raises(ValueError, match=r"has shape \(10, 12\), the config needs \(10, 13\)"):
        load_classifier(d)

    (d / "config.json").write_text(json.dumps(config))
    state = load_file(str(d / "model.safetensors"))
    save_file({**state, "extra.bias": torch.zeros(3)}, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected tensors \['extra.bias'\]"):
        load_classifier(d)

    with pytest.raises(FileNotFoundError, match="config.json"):
        load_classifier(tmp_path / "nowhere")


# ---------------------------------------------------------------- training pieces
def test_random_shift_moves_by_at_most_max_shift():
    x = -torch.ones(200, 1, 9, 9)
    x[:, :, 4, 4] = 1.0
    shifted = random_shift(x, 2, torch.Generator().manual_seed(0))
    pos = torch.nonzero(shifted[:, 0] == 1.0)[:, 1:]  # (row, col) of the bright pixel per image
    assert len(pos) == 200 and (pos - 4).abs().max() == 2
    assert len({tuple(p) for p in pos.tolist()}) == 25  # every offset in [-2, 2]^2 occurs
    assert ((shifted == -1) | (shifted == 1)).all()  # filled with background only
    assert torch.equal(random_shift(x, 0, torch.Generator()), x)


def test_random_outliers_are_valid_images():
    out = random_outliers(64, 16, torch.Generator().manual_seed(0))
    assert out.shape == (64, 1, 16, 16) and out.min() >= -1 and out.max() <= 1
    assert out.flatten(1).std(1).min() == 0  # blank frames are among them
    assert out.flatten(1).std(1).max() > 0.3  # and noise


def test_short_training_is_seeded_and_learns():
    a, acc_a = train_digits_classifier(size=16, steps=60, seed=3, batch_size=32)
    b, acc_b = train_digits_classifier(size=16, steps=60, seed=3, batch_size=32)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert acc_a == acc_b > 0.5  # chance is 0.1
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        train_digits_classifier(size=16, steps=0)
    with pytest.raises(ValueError, match="outlier_weight must be a finite number >= 0"):
        train_digits_classifier(size=16, outlier_weight=-1.0)


# ---------------------------------------------------------------- digits metrics
def test_metrics_on_real_test_digits(clf16):
    x, _ = digits("test", 16)
    m = digits_metrics(x, clf16, x)
    assert m["digits_fd"] == pytest.approx(0.0, abs=1e-6)
    assert m["confident_share"] >= 0.9
    assert m["num_samples"] == 297 and sum(m["class_histogram"]["counts"]) == 297
    assert sum(m["class_histogram"]["shares"]) == pytest.approx(1.0)
    # the test split has 29 or 30 of each class (shares 9.8%..10.1%); allow some misclassification
    assert m["max_class_deviation_pp"] <= 2.0


def test_metrics_on_noise_are_bad(clf16):
    """Gaussian pixel noise and blurred noise: no digits, so high FD and little confidence."""
    real, _ = digits("test", 16)
    floor = real_vs_real_floor(real, clf16, seed=0)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(300, 1, 16, 16, generator=g).clamp(-1, 1)
    blurred = torch.nn.functional.avg_pool2d(torch.randn(300, 1, 18, 18, generator=g), 3, stride=1).mul(2).clamp(-1, 1)
    for samples in (noise, blurred):
        m = digits_metrics(samples, clf16, real)
        assert m["digits_fd"] > 20 * floor
        assert m["confident_share"] < 0.2


def test_metrics_catch_mode_collapse(clf16):
    """Only 0s and 1s: every sample confident, yet FD far above the floor and the histogram skewed."""
    real, y = digits("test", 16)
    collapsed = real[(y == 0) | (y == 1)].repeat(5, 1, 1, 1)
    m = digits_metrics(collapsed, clf16, real)
    floor = real_vs_real_floor(real, clf16, seed=0)
    assert m["confident_share"] >= 0.9
    assert m["digits_fd"] > 5 * floor
    assert m["max_class_deviation_pp"] == pytest.approx(40.0, abs=2.0)  # ~50% share each vs 10%


def test_real_vs_real_floor(clf16):
    real, _ = digits("test", 16)
    floors = [real_vs_real_floor(real, clf16, seed=s) for s in range(3)]
    assert floors[0] == real_vs_real_floor(real, clf16, seed=0)  # seeded
    assert len(set(floors)) == 3 and min(floors) > 0
    # averaging 10 splits tames single-split noise (single splits differ by 2x and more)
    assert max(floors) < 1.3 * min(floors)
    # FD shrinks with more samples: all train digits vs all test digits sit below the half-split floor
    train, _ = digits("train", 16)
    with torch.no_grad():
        assert frechet_distance(clf16.features(train), clf16.features(real)) < min(floors)


def test_metrics_bad_input(clf16):
    real, _ = digits("test", 16)
    with pytest.raises(ValueError, match=r"samples must have shape \(N, 1, 16, 16\)"):
        digits_metrics(torch.zeros(10, 1, 32, 32), clf16, real)
    with pytest.raises(ValueError, match="at least 2 images"):
        digits_metrics(real[:1], clf16, real)
    with pytest.raises(ValueError, match="scaled to"):
        digits_metrics((real + 1) * 127.5, clf16, real)
    with pytest.raises(ValueError, match="NaN or inf"):
        digits_metrics(torch.full((4, 1, 16, 16), float("nan")), clf16, real)
    with pytest.raises(ValueError, match="real_test_images"):
        digits_metrics(real, clf16, real[:, :, :8])
    with pytest.raises(ValueError, match="seed"):
        real_vs_real_floor(real, clf16, seed=-1)
    with pytest.raises(ValueError, match="num_splits"):
        real_vs_real_floor(real, clf16, num_splits=0)
    with pytest.raises(ValueError, match="at least 4 images"):
        real_vs_real_floor(real[:3], clf16)


# ---------------------------------------------------------------- NLL in bits/dim
def gaussian_denoiser(T: int = 20) -> MixtureDenoiser:
    mixture = GaussianMixture.isotropic(torch.ones(1), torch.zeros(1, 4), 0.3)
    return MixtureDenoiser(mixture, Schedule(linear_betas(T, 1e-3, 0.3)))


def test_nll_bpd_matches_losses_for_one_batch():
    den = gaussian_denoiser()
    x = (torch.randn(6, 4, generator=torch.Generator().manual_seed(0)) * 0.3).clamp(-1, 1)
    expected = nll_bits_per_dim(den, x, None, torch.Generator().manual_seed(5))["total"].mean()
    assert nll_bpd(den, x, batch_size=6, seed=5) == pytest.approx(float(expected), rel=1e-12)


def test_nll_bpd_batching_and_data_sensitivity():
    den = gaussian_denoiser()
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(64, 4, generator=g) * 0.3).clamp(-1, 1)
    whole, batched = nll_bpd(den, x, batch_size=64), nll_bpd(den, x, batch_size=10)
    assert batched == pytest.approx(whole, rel=0.05)  # same bound, different noise draws
    far = (x + 0.6).clamp(-1, 1)  # off the model's distribution: must cost more bits
    assert nll_bpd(den, far, batch_size=64) > whole + 0.5


def test_nll_bpd_slices_cond_per_batch():
    seen = []

    class Recorder(Denoiser):
        schedule = Schedule(linear_betas(3, 1e-3, 0.3))

        def predict(self, x_t, t, cond):
            assert len(cond["y"]) == len(x_t)
            seen.append((tuple(cond["y"].tolist()), cond["scale"]))
            return Prediction.from_x0(torch.zeros_like(x_t), x_t, self.schedule.alpha_bar_at(t))

    x = torch.linspace(-0.9, 0.9, 14).view(7, 2)
    nll_bpd(Recorder(), x, batch_size=3, cond={"y": torch.arange(7), "scale": 2.0})
    assert len(seen) == 3 * 3  # T calls per batch
    assert set(seen) == {((0, 1, 2), 2.0), ((3, 4, 5), 2.0), ((6,), 2.0)}
    with pytest.raises(ValueError, match="batch_size"):
        nll_bpd(Recorder(), x, batch_size=0)
