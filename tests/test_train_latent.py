"""Latent diffusion through `difflab train`: the autoencoder task (GAN switched on at
disc_start, exact resume, export), diffusion on cached latents, and the latent pipeline
folder that reloads and samples exactly as the trained model does."""

import json

import numpy as np
import pytest
import torch

from difflab.cli import main
from difflab.denoiser import ClipDenoiser
from difflab.guidance import conditioned
from difflab.methods.latent import AutoencoderGAN, load_autoencoder
from difflab.nets import Autoencoder
from difflab.samplers import sample
from difflab.train import load_decoder, load_pipeline, run
from difflab.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from difflab.train.config import Config
from difflab.train.monitor import read_log
from difflab.train.runner import make_trainer
from difflab.train.tasks import DataInfo, build_task
from test_train_support import assert_identical, tiny_config, without_timing

AUTOENCODER = {
    "class": "Autoencoder",
    "in_channels": 1,
    "latent_channels": 2,
    "model_channels": 8,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "norm_groups": 4,
    "mid_attention": False,
    "discriminator": {"base_channels": 4, "num_layers": 1, "norm": "none"},
    "loss": {"disc_start": 2, "kl_weight": 1e-4},
}


TINY_UNET = {
    "model_channels": 8,
    "channel_mult": [1],
    "num_res_blocks": 1,
    "norm_groups": 4,
    "attention_resolutions": [],
    "mid_attention": False,
}


def autoencoder_recipe(steps: int = 4, **model) -> Config:
    raw = tiny_config(train={"steps": steps, "ema_decay": 0.0, "grad_clip": 0.0, "sample_every": 2}).to_dict()
    return Config.from_dict({**raw, "task": "autoencoder", "model": {**AUTOENCODER, **model}})


def test_the_autoencoder_run_starts_the_gan_at_disc_start_and_exports_the_autoencoder(tmp_path):
    run_dir = run(autoencoder_recipe(), tmp_path / "ae")
    records = read_log(run_dir)
    assert [r["g_loss"] != 0 for r in records] == [False, False, True, True]  # steps 1, 2 | 3, 4
    assert [r["d_loss"] != 0 for r in records] == [False, False, True, True]
    assert all(r["psnr"] > 0 and r["kl_loss"] > 0 for r in records)

    # the discriminator did not move before disc_start (zero gradient: Adam leaves it as it is)
    initial = make_trainer(autoencoder_recipe(), tmp_path / "fresh").model.discriminator.state_dict()
    at_2 = load_checkpoint(run_dir / "checkpoints" / "ckpt-2")["model"]
    assert_identical({k: at_2[f"discriminator.{k}"] for k in initial}, dict(initial))
    final = load_checkpoint(latest_checkpoint(run_dir))["model"]
    assert any(not torch.equal(final[f"discriminator.{k}"], v) for k, v in initial.items())

    autoencoder = load_autoencoder(run_dir)
    assert isinstance(autoencoder, Autoencoder) and not autoencoder.training
    assert_identical(
        dict(autoencoder.state_dict()),
        {k[len("autoencoder.") :]: v for k, v in final.items() if k.startswith("autoencoder.")},
    )
    meta = json.loads((run_dir / "model" / "autoencoder.json").read_text())
    assert meta["latent_shape"] == [2, 4, 4] and meta["image_shape"] == [1, 8, 8] and meta["downsampling_factor"] == 2
    assert (run_dir / "samples" / "step-0000004.png").is_file()


def test_resuming_an_autoencoder_run_is_exact_across_disc_start(tmp_path):
    whole = run(autoencoder_recipe(4, regularization="vq", num_codes=8, dead_code_patience=1), tmp_path / "whole")
    half = run(autoencoder_recipe(2, regularization="vq", num_codes=8, dead_code_patience=1), tmp_path / "half")
    run(None, half, resume=True, overrides=["train.steps=4"])
    assert without_timing(read_log(half)) == without_timing(read_log(whole))
    assert_identical(*(load_checkpoint(latest_checkpoint(r)) for r in (whole, half)))


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"class": "TrainTinyNet"}, 'needs \\[model\\] class = "Autoencoder"'),
        ({**AUTOENCODER, "loss": {"disc_strat": 3}}, r"unknown key\(s\) \['disc_strat'\]"),
        ({**AUTOENCODER, "discriminator": {"class": "UNet"}}, 'class must be "PatchDiscriminator"'),
        ({**AUTOENCODER, "in_channels": 3}, "takes 3-channel images"),
        ({**AUTOENCODER, "loss": {"perceptual_weight": 1.0}}, "needs LPIPS: `pip install lpips`"),
        ({**AUTOENCODER, "channel_mult": [1, 2, 2, 2]}, "multiples of f=8"),
    ],
)
def test_bad_autoencoder_recipes_are_rejected(model, message):
    config = Config.from_dict({**autoencoder_recipe().to_dict(), "model": model})
    with pytest.raises(ValueError, match=message):
        build_task(config, DataInfo((1, 12, 12), 10))


def test_the_latent_pipeline_reloads_and_samples_exactly_as_trained(tmp_path):
    autoencoder_run = run(autoencoder_recipe(2), tmp_path / "ae")
    recipe = tiny_config(
        model={"class": "UNet", "in_channels": 2, "num_classes": 10, "class_dropout_prob": 0.1, **TINY_UNET},
        train={"steps": 2},
        sample={"guidance": 1.5},
    ).to_dict()
    config = Config.from_dict({**recipe, "latent": {"autoencoder": str(autoencoder_run), "batch_size": 100}})
    run_dir = run(config, tmp_path / "ldm")

    denoiser, meta = load_pipeline(run_dir)
    # latents are clipped at +-3 (unit variance), not at the pixels' +-1
    assert meta["sample_shape"] == [2, 4, 4] and meta["thresholding"] == "static" and meta["thresholding_limit"] == 3.0
    assert meta["latent"]["image_shape"] == [1, 8, 8] and (run_dir / "model" / "autoencoder").is_dir()

    # the scale factor makes the cached training latents unit-variance
    trainer = make_trainer(config, tmp_path / "again")
    latents = trainer.dataset.cache.latents
    assert latents.std().item() == pytest.approx(1.0, rel=1e-5)
    assert meta["latent"]["scale_factor"] == trainer.dataset.cache.scale_factor
    assert trainer.dataset[5]["y"] == trainer.dataset.cache.fields[5]["y"]  # labels travel with the latents

    # the trained model (trainer + checkpoint) and the reloaded pipeline draw identical images
    trainer.load_state_dict(load_checkpoint(list_checkpoints(run_dir)[-1]))
    trainer.sampling_model().eval()
    trained = trainer.task.sample_images(trainer.sampling_model(), 4, torch.Generator().manual_seed(3))
    guided, cond = conditioned(denoiser, meta, 4, scale=meta["sample"]["guidance"])
    assert isinstance(guided, ClipDenoiser) and guided.limit == 3.0
    decode = load_decoder(run_dir)
    x = sample(guided, (4, 2, 4, 4), "ddim", 4, generator=torch.Generator().manual_seed(3), progress=False, cond=cond)
    reloaded = decode(x)
    assert reloaded.shape == (4, 1, 8, 8)
    assert torch.equal(trained, reloaded)

    out = tmp_path / "samples"
    assert main(["sample", str(run_dir), "--n", "3", "--steps", "2", "--label", "4", "--out", str(out)]) == 0
    assert np.load(out / "samples.npz")["samples"].shape == (3, 1, 8, 8)


def test_a_pixel_pipeline_has_no_decoder_and_a_wrong_scale_factor_is_caught(tmp_path):
    pixel = run(tiny_config(train={"steps": 1}), tmp_path / "pixel")
    assert load_decoder(pixel) is None

    autoencoder_run = run(autoencoder_recipe(1), tmp_path / "ae")
    raw = tiny_config(model={"class": "TrainTinyNet", "channels": 2}, train={"steps": 1}).to_dict()
    latent = run(Config.from_dict({**raw, "latent": {"autoencoder": str(autoencoder_run)}}), tmp_path / "ldm")
    meta_path = latent / "model" / "diffusion.json"
    meta = json.loads(meta_path.read_text())
    meta["latent"]["scale_factor"] *= 2
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="trained on latents scaled by"):
        load_decoder(latent)
    with pytest.raises(ValueError, match="holds no Autoencoder"):
        load_autoencoder(pixel)


def test_autoencoder_gan_module_holds_both_networks():
    task = build_task(autoencoder_recipe(), DataInfo((1, 8, 8), 10, examples=torch.zeros(2, 1, 8, 8)))
    assert isinstance(task.model, AutoencoderGAN) and task.model.discriminator is not None
    images = task.sample_images(task.model, 4, torch.Generator())
    assert images.shape == (4, 1, 8, 8) and torch.equal(images[:2], torch.zeros(2, 1, 8, 8))
