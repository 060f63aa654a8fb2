"""unCLIP: the prior's standardisation, the decoder's condition dropout and guidance, the prior's
best-of-two pick, embedding arithmetic, and tiny prior/decoder runs that train, resume, export."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from difflab.denoiser import NetworkDenoiser, Prediction
from difflab.guidance import ClassifierFreeGuidance, batch_conditions
from difflab.methods.unclip import (
    decoder_dropout,
    guided_decoder,
    pick_closest,
    slerp,
    text_diff,
)
from difflab.nets import CLIP, DiffusionPrior, EmbeddingStandardizer, UnCLIPDecoder, UNet
from difflab.schedules import Schedule
from difflab.train.config import Config

TINY_CLIP = {"image_size": 16, "channels": [8, 8], "embed_dim": 8, "text_encoder": {"dim": 8, "depth": 0,
             "num_heads": 2}}  # fmt: skip
TINY_UNET = {"in_channels": 3, "model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
             "attention_resolutions": [2], "num_heads": 2, "norm_groups": 4}  # fmt: skip
TINY_DECODER = {"image_embed_dim": 8, "num_image_tokens": 2, "context_dim": 8, "unet": TINY_UNET,
                "text_encoder": {"depth": 0, "num_heads": 2}}  # fmt: skip
TINY_PRIOR = {"embed_dim": 8, "token_dim": 8, "dim": 16, "depth": 1, "num_heads": 2}


# ---------------------------------------------------------------- standardisation


def test_standardisation_round_trips_and_whitens_the_training_embeddings():
    torch.manual_seed(0)
    e = F.normalize(torch.randn(500, 8) * 0.1 + torch.linspace(-1, 1, 8), dim=1)
    s = EmbeddingStandardizer(8).fit(e)
    z = s(e)
    assert torch.allclose(s.inverse(z), e, atol=1e-6)
    assert torch.allclose(z.mean(0), torch.zeros(8), atol=1e-5)
    assert torch.allclose(z.std(0), torch.ones(8), atol=1e-4)
    # negative control: unfitted statistics leave the embeddings badly scaled for unit noise
    assert EmbeddingStandardizer(8)(e).std(0).max() < 0.5


def test_standardisation_is_saved_with_the_prior(tmp_path):
    from difflab.nets import load_network

    prior = DiffusionPrior(TINY_PRIOR)
    prior.standardizer.fit(torch.randn(10, 8) * 3 + 1)
    prior.save_pretrained(tmp_path)
    loaded = load_network(tmp_path)
    assert torch.equal(loaded.standardizer.mean, prior.standardizer.mean)
    assert torch.equal(loaded.standardizer.std, prior.standardizer.std)
    with pytest.raises(ValueError, match="fit needs"):
        prior.standardizer.fit(torch.randn(10, 3))


# ---------------------------------------------------------------- decoder condition dropout


def independent(a: torch.Tensor, b: torch.Tensor, pa: float, pb: float, sigmas: float = 5.0) -> bool:
    """Rates of a, b and both within `sigmas` binomial standard deviations of pa, pb and pa * pb."""
    n = len(a)
    for observed, p in ((a.float().mean(), pa), (b.float().mean(), pb), ((a & b).float().mean(), pa * pb)):
        if abs(float(observed) - p) > sigmas * math.sqrt(p * (1 - p) / n):
            return False
    return True


def test_decoder_drop_masks_are_per_example_and_independent_per_condition():
    n, p_image, p_caption = 20_000, 0.1, 0.5
    embed = F.normalize(torch.randn(n, 8), dim=1)
    g = torch.Generator().manual_seed(0)
    dropped, captions = decoder_dropout(embed, ["a red circle"] * n, p_image, p_caption, g)
    image_off = (dropped == 0).all(1)
    caption_off = torch.tensor([c == "" for c in captions])
    # kept embeddings are untouched
    assert torch.equal(dropped[~image_off], embed[~image_off])
    # per example: a batch is neither all dropped nor all kept
    assert 0 < image_off[:64].sum() < 64 and 0 < caption_off[:64].sum() < 64
    # rates 10% and 50%, and both-dropped at 5% (independent draws); tolerance 5 binomial sigmas
    assert independent(image_off, caption_off, p_image, p_caption)
    # near miss rejected: one shared uniform draw with the same two rates gives both-dropped 10%
    u = torch.rand(n, generator=torch.Generator().manual_seed(1))
    assert not independent(u < p_image, u < p_caption, p_image, p_caption)


def test_decoder_dropout_without_captions_and_at_rate_zero():
    embed = torch.randn(16, 8)
    same, none = decoder_dropout(embed, None, 0.0, 0.5, torch.Generator().manual_seed(0))
    assert none is None and torch.equal(same, embed)
    all_off, _ = decoder_dropout(embed, None, 1.0, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(all_off, torch.zeros_like(embed))


# ---------------------------------------------------------------- decoder guidance


def tiny_decoder_denoiser(seed: int = 0) -> NetworkDenoiser:
    torch.manual_seed(seed)
    net = UnCLIPDecoder(TINY_DECODER).eval()
    with torch.no_grad():  # a fresh U-Net outputs exactly 0; give it a non-trivial function
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return NetworkDenoiser(net, Schedule.make("cosine", T=100), "eps", "fixed_small", (3, 8, 8))


def decoder_inputs(batch: int = 3):
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(batch, 3, 8, 8, generator=g)
    t = torch.tensor([5, 50, 90])[:batch]
    cond = {"image_embed": F.normalize(torch.randn(batch, 8, generator=g), dim=1),
            "caption": ["a red circle", "a big blue square", "a small green triangle"][:batch]}  # fmt: skip
    return x_t, t, cond


def test_guidance_scale_zero_equals_the_conditional_output_exactly():
    den = tiny_decoder_denoiser()
    x_t, t, cond = decoder_inputs()
    plain = den.predict(x_t, t, cond)
    zero = guided_decoder(den, 0.0).predict(x_t, t, cond)
    assert torch.equal(zero.eps, plain.eps) and torch.equal(zero.x0, plain.x0)
    # negative control: w = 2 moves the prediction
    assert not torch.allclose(guided_decoder(den, 2.0).predict(x_t, t, cond).eps, plain.eps)


def spy_on(den):
    """Record every (x_t, t, cond) the denoiser is called with."""
    calls, predict = [], den.predict

    def recording(x_t, t, cond):
        calls.append((x_t.clone(), t.clone(), cond))
        return predict(x_t, t, cond)

    den.predict = recording
    return calls


def null_branch_keeps_x_t(guidance_of) -> bool:
    """Whether guidance built by `guidance_of(denoiser, w)` runs its null branch on x_t itself,
    with the zero embedding and the empty caption, and combines as (w + 1) c - w u."""
    den, plain = tiny_decoder_denoiser(), tiny_decoder_denoiser()
    x_t, t, cond = decoder_inputs()
    calls = spy_on(den)
    guided = guidance_of(den, 2.0).predict(x_t, t, cond)
    (x, _, both), b = calls[0], x_t.shape[0]
    if not torch.equal(x[b:], x_t) or not torch.equal(x[:b], x_t):
        return False
    if not torch.equal(both["image_embed"][b:], torch.zeros(b, 8)) or both["caption"][b:] != [""] * b:
        return False
    c = plain.predict(x_t, t, cond)
    u = plain.predict(x_t, t, {"image_embed": torch.zeros(b, 8), "caption": [""] * b})
    return torch.allclose(guided.eps, 3 * c.eps - 2 * u.eps, atol=1e-5)


class LosesXt(ClassifierFreeGuidance):
    """The DALLE2-pytorch issue 285 bug: the null branch is run on a blank input, not x_t."""

    def guided(self, x_t, t, cond, w):
        b = x_t.shape[0]
        both = batch_conditions(cond, self.null_cond, b)
        pred = self.inner.predict(torch.cat([x_t, torch.zeros_like(x_t)]), torch.cat([t, t]), both)
        x0 = pred.x0[:b] + w * (pred.x0[:b] - pred.x0[b:])
        return Prediction(x0=x0, eps=pred.eps[:b] + w * (pred.eps[:b] - pred.eps[b:]), var_frac=None)


def test_the_null_branch_keeps_x_t():
    assert null_branch_keeps_x_t(guided_decoder)
    # negative control: the bug is caught
    null = {"image_embed": torch.zeros(1, 8), "caption": [""]}
    assert not null_branch_keeps_x_t(lambda den, w: LosesXt(den, w, null))


# ---------------------------------------------------------------- prior


def test_prior_picks_the_closer_of_two_draws():
    text = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    near = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    far = torch.tensor([[0.1, 0.9], [0.9, 0.1]])
    assert torch.equal(pick_closest(torch.stack([near, far]), text), near)
    assert torch.equal(pick_closest(torch.stack([far, near]), text), near)  # order does not matter
    mixed = torch.stack([torch.stack([near[0], far[1]]), torch.stack([far[0], near[1]])])
    assert torch.equal(pick_closest(mixed, text), near)  # chosen per caption
    # negative control: the farther candidate is never chosen
    assert not torch.equal(pick_closest(torch.stack([near, far]), text), far)


def test_prior_predicts_embeddings_of_the_right_shape_and_refuses_bad_cond():
    prior = DiffusionPrior(TINY_PRIOR)
    cond = {"text_tokens": torch.randn(2, 5, 8), "text_mask": torch.ones(2, 5, dtype=torch.bool),
            "text_embed": torch.randn(2, 8)}  # fmt: skip
    assert prior(torch.randn(2, 8), torch.tensor([3, 7]), cond).shape == (2, 8)
    with pytest.raises(ValueError, match="text_embed"):
        prior(torch.randn(2, 8), 3, {k: v for k, v in cond.items() if k != "text_embed"})


def test_sample_prior_returns_unit_embeddings_closest_of_its_draws():
    from difflab.methods.unclip import prior_condition, sample_prior

    torch.manual_seed(0)
    clip = CLIP(TINY_CLIP).eval()
    prior = DiffusionPrior(TINY_PRIOR).eval()
    den = NetworkDenoiser(prior, Schedule.make("cosine", T=50), "x0", "fixed_small", (8,))
    captions = ["a red circle", "a blue square"]
    out = sample_prior(den, clip, captions, guidance=1.0, draws=2, steps=3, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 8) and torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    one = sample_prior(den, clip, captions, guidance=1.0, draws=1, steps=3, generator=torch.Generator().manual_seed(0))
    text = prior_condition(clip, captions)["text_embed"]
    assert (F.cosine_similarity(out, text) >= F.cosine_similarity(one, text) - 1e-6).all()


# ---------------------------------------------------------------- embedding arithmetic


def test_slerp_and_text_diff():
    a, b = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(4, 8), dim=1)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-5) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-5)
    mid = slerp(a, b, 0.5)
    assert torch.allclose(mid.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(F.cosine_similarity(mid, a), F.cosine_similarity(mid, b), atol=1e-5)
    assert torch.allclose(text_diff(a, b[:1], b[1:2], 0.0), a, atol=1e-5)
    moved = text_diff(a, b[:1], b[1:2], 0.5)
    direction = F.normalize(b[1] - b[0], dim=0)
    assert (moved @ direction > a @ direction).all()


def test_unet_image_embedding_is_off_by_default():
    plain = UNet(TINY_UNET)
    assert "image_embed" not in plain.accepted_cond and plain.image_embed_proj is None
    with pytest.raises(ValueError, match="image_embed"):
        plain(torch.randn(1, 3, 8, 8), 1, {"image_embed": torch.randn(1, 8)})


def test_decoder_scales_the_unit_embedding_by_sqrt_dim_before_projecting_it():
    """A unit embedding's components are ~1/sqrt(D): unscaled, its projections start sqrt(D)
    times weaker than the time embedding (and the caption path wins). The scaled decoder must
    equal an unscaled one fed sqrt(D) e, and the null (zero) embedding stays zero."""
    den = tiny_decoder_denoiser()
    unscaled = UnCLIPDecoder({**TINY_DECODER, "embed_scale": False}).eval()
    unscaled.load_state_dict(den.net.state_dict())
    x_t, t, cond = decoder_inputs()
    with torch.no_grad():
        scaled_out = den.net(x_t, t, dict(cond))
        manual = unscaled(x_t, t, {**cond, "image_embed": cond["image_embed"] * 8**0.5})
        plain = unscaled(x_t, t, dict(cond))
        null = {**cond, "image_embed": torch.zeros(3, 8)}
        torch.testing.assert_close(den.net(x_t, t, dict(null)), unscaled(x_t, t, dict(null)))
    torch.testing.assert_close(scaled_out, manual)
    assert (scaled_out - plain).abs().max() > 1e-3


# ---------------------------------------------------------------- tiny runs


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from difflab.train.tasks.contrastive import CLIP_FILE, CLIP_FORMAT

    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    CLIP(TINY_CLIP).save_pretrained(folder)
    (folder / CLIP_FILE).write_text(json.dumps({"format": CLIP_FORMAT, "version": 1}), encoding="utf-8")
    return folder


def recipe(task: str, model: dict, clip: str, steps: int, **diffusion) -> Config:
    return Config.from_dict({
        "task": task,
        "data": {"name": "shapes", "size": 16, "n": 64},
        "model": model,
        "diffusion": {"schedule": "cosine", "T": 50, **diffusion},
        "unclip": {"clip": clip, "stats_examples": 64},
        "train": {"steps": steps, "batch_size": 8, "lr": 1e-3, "log_every": 1, "sample_every": 0,
                  "checkpoint_every": 2, "ema_decay": 0.9, "seed": 0, "device": "cpu"},
        "sample": {"sampler": "ddim", "steps": 3, "n": 4, "guidance": 1.0},
    })  # fmt: skip


def same_weights(a, b) -> None:
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_prior_task_trains_resumes_and_exports(tmp_path, clip_dir):
    from difflab.nets import load_network
    from difflab.pipelines.load import load_pipeline
    from difflab.train.runner import run

    model = {"class": "DiffusionPrior", **TINY_PRIOR}
    whole = run(recipe("unclip_prior", model, str(clip_dir), 4, prediction="x0"), tmp_path / "whole")
    half = run(recipe("unclip_prior", model, str(clip_dir), 2, prediction="x0"), tmp_path / "half")
    run(None, half, resume=True, overrides=["train.steps=4"])
    same_weights(load_network(whole / "model"), load_network(half / "model"))
    denoiser, manifest = load_pipeline(whole)
    assert manifest["unclip"]["role"] == "prior" and manifest["sample_shape"] == [8]
    assert denoiser.net.standardizer.std.ne(1).any()  # fitted, saved, loaded
    same_weights(load_network(whole / "model" / "clip"), load_network(clip_dir))


def test_decoder_task_trains_and_exports_with_a_sample_grid(tmp_path, clip_dir):
    from difflab.pipelines.load import load_pipeline
    from difflab.train.runner import run

    config = recipe("unclip_decoder", {"class": "UnCLIPDecoder", **TINY_DECODER}, str(clip_dir), 2, prediction="eps")
    config = Config.from_dict({**config.to_dict(), "train": {**config.to_dict()["train"], "sample_every": 2}})
    out = run(config, tmp_path / "decoder")
    denoiser, manifest = load_pipeline(out)
    assert manifest["unclip"] == {"role": "decoder", "captions": True}
    assert isinstance(denoiser.net, UnCLIPDecoder)
    assert any(out.rglob("*.png"))


def test_tasks_refuse_a_mismatched_encoder(tmp_path, clip_dir):
    from difflab.train.runner import run

    model = {"class": "DiffusionPrior", **{**TINY_PRIOR, "embed_dim": 16}}
    with pytest.raises(ValueError, match="embed_dim"):
        run(recipe("unclip_prior", model, str(clip_dir), 2, prediction="x0"), tmp_path / "bad")
    with pytest.raises(ValueError, match="clip.json"):
        run(recipe("unclip_prior", {"class": "DiffusionPrior", **TINY_PRIOR}, str(tmp_path), 2), tmp_path / "bad2")


def test_unclip_folder_generates_variations_interpolations_and_text_diffs(tmp_path, clip_dir):
    from PIL import Image

    from difflab.cli import main
    from difflab.pipelines.unclip import UnCLIPPipeline, assemble_unclip
    from difflab.train.runner import run

    prior = run(recipe("unclip_prior", {"class": "DiffusionPrior", **TINY_PRIOR}, str(clip_dir), 2, prediction="x0"),
                tmp_path / "prior")  # fmt: skip
    decoder = run(recipe("unclip_decoder", {"class": "UnCLIPDecoder", **TINY_DECODER}, str(clip_dir), 2),
                  tmp_path / "decoder")  # fmt: skip
    with pytest.raises(ValueError, match="not an unCLIP decoder"):
        assemble_unclip(prior, prior, tmp_path / "wrong")
    folder = assemble_unclip(prior, decoder, tmp_path / "unclip")
    from difflab.pipelines import Pipeline

    pipe = Pipeline.from_pretrained(folder, device="cpu")
    assert isinstance(pipe, UnCLIPPipeline)
    images = pipe.generate(3, prompt="a red circle", steps=2, prior_steps=2)
    assert images.shape == (3, 3, 16, 16) and images.abs().max() <= 1
    image = images[0]
    assert pipe.variations(image, 2, steps=2).shape == (2, 3, 16, 16)
    assert pipe.interpolate(image, images[1], 3, steps=2).shape == (3, 3, 16, 16)
    assert pipe.text_diff(image, "a red circle", "a blue circle", 3, steps=2).shape == (3, 3, 16, 16)

    png = tmp_path / "in.png"
    Image.fromarray(((image.permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).byte().numpy()).save(png)
    for extra in (["--prompt", "a red circle"], ["--variations", str(png)]):
        out = tmp_path / f"out{len(extra[1])}"
        assert main(["sample", str(folder), "--n", "2", "--steps", "2", "--save-each", "--out", str(out), *extra]) == 0
        assert (out / "samples.png").is_file() and sorted(p.name for p in (out / "images").iterdir()) == [
            "00000.png",
            "00001.png",
        ]
        with np.load(out / "samples.npz") as saved:
            assert saved["images_uint8"].shape == (2, 3, 16, 16)
            assert ("prompts" in saved) == (extra[0] == "--prompt")
    assert main(["sample", str(folder), "--n", "2", "--out", str(tmp_path / "x")]) == 2  # neither given
