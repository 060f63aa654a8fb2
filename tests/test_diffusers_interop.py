"""difflab <-> diffusers: U-Nets give diffusers' outputs both ways, schedules its alphas_cumprod,
the imported model samples as diffusers' DDIM loop does, and what cannot map is refused by name.

Tolerances: U-Net outputs 1e-5 (float32, same ops in another order); alphas_cumprod 1e-7
against difflab's betas taken to float32 (diffusers builds its tables in float32) and 1e-6
against difflab's float64 alpha_bar (float32 accumulation over 1000 products); a 10-step DDIM
loop 2e-5 (float32 alphas in diffusers, float64 coefficients in difflab; measured 3e-6).
"""

import json
import math

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from difflab.cli import main
from difflab.interop import UnsupportedOption, export_diffusers, import_diffusers
from difflab.interop.scheduler import betas_from_diffusers, to_scheduler_config
from difflab.interop.unet2d import from_diffusers_config, to_diffusers_config
from difflab.nets import UNet
from difflab.pipelines import Pipeline, new_manifest, write_manifest
from difflab.samplers import get_timesteps, sample
from difflab.schedules import Schedule

UNET_TOL, ALPHA_TOL_F32, ALPHA_TOL_F64, LOOP_TOL = 1e-5, 1e-7, 1e-6, 2e-5
T_CHECK = torch.tensor([0, 1, 250, 999])

# diffusers UNet2DModel configs written by diffusers itself, each exercising other options
DIFFUSERS_UNETS = {
    "plain": dict(block_out_channels=(8, 16), layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
                  up_block_types=("UpBlock2D",) * 2, add_attention=False, norm_num_groups=4),
    "ddpm-style": dict(block_out_channels=(8, 16, 16), layers_per_block=2, freq_shift=1, flip_sin_to_cos=False,
                       norm_eps=1e-6, attention_head_dim=None, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    "scale-shift-class": dict(block_out_channels=(8, 16, 32), layers_per_block=1,
                              resnet_time_scale_shift="scale_shift", attention_head_dim=4, norm_num_groups=4,
                              num_class_embeds=5,
                              down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                              up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    "resnet-updown": dict(block_out_channels=(8, 16), layers_per_block=1, attention_head_dim=8, norm_num_groups=4,
                          resnet_time_scale_shift="scale_shift", attn_norm_num_groups=4,
                          down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"), downsample_type="resnet",
                          up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D"), upsample_type="resnet"),
}  # fmt: skip

# difflab U-Nets to export, each exercising other options
DIFFLAB_UNETS = {
    "shipped-like": dict(model_channels=8, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(2,),
                         num_heads=2, norm_groups=4),
    "class-resnet-updown": dict(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,),
                                num_head_channels=4, norm_groups=4, use_scale_shift_norm=False,
                                resblock_updown=True, num_classes=3),
    "ddpm-features": dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                          norm_groups=8, num_head_channels=8, time_embedding_order="sin_cos",
                          time_frequency_shift=1, norm_eps=1e-6, mid_attention_norm=False),
}  # fmt: skip


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (norms away from 1/0, no zero-initialised layers), so a tensor
    mapped to the wrong place cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(noise * 0.7 / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)
    return module.eval()


def diffusers_folder(tmp_path, name: str, scheduler=None, size: int = 8):
    """A diffusers pipeline folder with a random UNet2DModel, written by diffusers."""
    unet = randomize(UNet2DModel(sample_size=size, in_channels=1, out_channels=1, **DIFFUSERS_UNETS[name]), 1)
    scheduler = scheduler or DDIMScheduler(beta_schedule="squaredcos_cap_v2")
    folder = tmp_path / f"diffusers-{name}"
    pipeline = DDPMPipeline if isinstance(scheduler, DDPMScheduler) else DDIMPipeline  # DDIMPipeline converts
    pipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder, unet


def difflab_folder(tmp_path, name: str, size: int = 8, **manifest):
    """A difflab model folder with a random U-Net."""
    options = DIFFLAB_UNETS[name]
    net = randomize(UNet(in_channels=1, **options), 2)
    folder = tmp_path / f"difflab-{name}"
    net.save_pretrained(folder)
    classes = options.get("num_classes")
    fields = {"conditioning": "class", "num_classes": classes} if classes else {}
    fields = {"schedule": Schedule.make("cosine", 1000).to_config(), "prediction": "eps", "variance": "fixed_small",
              "sample_shape": [1, size, size], **fields, **manifest}  # fmt: skip
    write_manifest(folder, new_manifest(**fields))
    return folder, net


def inputs(batch: int = 4, size: int = 8, classes: int | None = None):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 1, size, size, generator=g)
    labels = None if classes is None else torch.arange(batch) % classes
    return x, T_CHECK[:batch], labels


# --------------------------------------------------------------------------- U-Nets


@pytest.mark.parametrize("name", list(DIFFUSERS_UNETS))
def test_a_diffusers_unet_imports_with_its_outputs(tmp_path, name):
    folder, theirs = diffusers_folder(tmp_path, name)
    pipe = Pipeline.from_pretrained(folder, device="cpu")
    classes = DIFFUSERS_UNETS[name].get("num_class_embeds")
    x, t, labels = inputs(classes=classes)
    with torch.no_grad():
        expected = theirs(x, t, class_labels=labels).sample
        got = pipe.network(x, t.float(), None if labels is None else {"y": labels})
    assert expected.abs().max() > 0.1  # a real output, not a zero-initialised one
    assert (got - expected).abs().max().item() < UNET_TOL
    if classes:  # every diffusers class is usable; difflab's null label is an added zero row
        assert pipe.manifest["num_classes"] == classes
        assert torch.equal(pipe.network.label_embed.embedding.weight[-1], torch.zeros(4 * 8))


@pytest.mark.parametrize("name", list(DIFFLAB_UNETS))
def test_a_difflab_unet_exports_with_its_outputs(tmp_path, name):
    folder, ours = difflab_folder(tmp_path, name)
    out = export_diffusers(folder, tmp_path / "exported")
    theirs = UNet2DModel.from_pretrained(out / "unet").eval()
    classes = DIFFLAB_UNETS[name].get("num_classes")
    x, t, labels = inputs(classes=classes)
    with torch.no_grad():
        expected = ours(x, t.float(), None if labels is None else {"y": labels})
        got = theirs(x, t, class_labels=labels).sample
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max().item() < UNET_TOL
    # and back: the same network, bit for bit, with its null label and manifest
    back = Pipeline.from_pretrained(out, device="cpu")
    assert torch.equal(back.network(x, t.float(), None if labels is None else {"y": labels}), expected)
    assert back.manifest["num_classes"] == classes
    assert back.manifest["schedule"] == Schedule.make("cosine", 1000).to_config()


def test_the_exported_folder_loads_as_a_diffusers_pipeline_and_samples(tmp_path):
    folder, _ = difflab_folder(tmp_path, "shipped-like", thresholding="static")
    out = export_diffusers(folder, tmp_path / "exported")
    pipe = DDIMPipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.clip_sample
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 8, 8, 1)
    folder, _ = difflab_folder(tmp_path, "ddpm-features", sample={"sampler": "ddpm", "steps": 1000})
    assert isinstance(DDPMPipeline.from_pretrained(export_diffusers(folder, tmp_path / "ddpm")).scheduler,
                      DDPMScheduler)  # fmt: skip


def test_negative_control_flipped_time_features_are_detected(tmp_path):
    """The output comparison catches a wrong mapping: the same weights with sin and cos swapped."""
    folder, theirs = diffusers_folder(tmp_path, "ddpm-style")
    pipe = Pipeline.from_pretrained(folder, device="cpu")
    config = pipe.network.config.to_dict()
    wrong = UNet({**config, "time_embedding_order": "cos_sin"})
    wrong.load_state_dict(pipe.network.state_dict())
    x, t, _ = inputs()
    with torch.no_grad():
        expected = theirs(x, t).sample
        assert (pipe.network.eval()(x, t.float()) - expected).abs().max() < UNET_TOL
        assert (wrong.eval()(x, t.float()) - expected).abs().max() > 1e-2


def test_negative_control_swapped_query_and_key_are_detected(tmp_path):
    folder, theirs = diffusers_folder(tmp_path, "scale-shift-class")
    pipe = Pipeline.from_pretrained(folder, device="cpu")
    state = dict(pipe.network.state_dict())
    for name in [n for n in state if n.endswith("attention.qkv.weight")]:
        q, k, v = state[name].chunk(3)
        state[name] = torch.cat([k, q, v])
    wrong = UNet(pipe.network.config)
    wrong.load_state_dict(state)
    x, t, labels = inputs(classes=5)
    with torch.no_grad():
        assert (wrong.eval()(x, t.float(), {"y": labels}) - theirs(x, t, class_labels=labels).sample).abs().max() > 1e-3


# --------------------------------------------------------------------------- schedules

SCHEDULES = {
    "linear": Schedule.make("linear", 1000),
    "linear-T500": Schedule.make("linear", 500),
    "scaled_linear": Schedule.make("scaled_linear", 1000),
    "cosine": Schedule.make("cosine", 1000),
    "sigmoid": Schedule.make("sigmoid", 1000),
    "cosine-ztsnr": Schedule.make("cosine", 1000, zero_terminal_snr=True),
    "linear-ztsnr": Schedule.make("linear", 1000, zero_terminal_snr=True),
    "cosine-s": Schedule.make("cosine", 1000, s=0.02),
    "ve-karras": Schedule.ve(sigma_min=0.01, sigma_max=20.0, n=200, spacing="karras"),
    "respaced": Schedule.make("cosine", 1000).respace(range(0, 1000, 10)),
    "betas": Schedule(torch.linspace(1e-4, 0.03, 300)),
}
NAMED_AS = {"linear": "linear", "linear-T500": "linear", "scaled_linear": "scaled_linear",
            "cosine": "squaredcos_cap_v2", "cosine-ztsnr": "squaredcos_cap_v2", "linear-ztsnr": "linear"}  # fmt: skip


def assert_alphas_agree(schedule: Schedule, scheduler) -> None:
    theirs = scheduler.alphas_cumprod.double()
    ours_f32 = torch.cumprod(1.0 - schedule.betas.float(), 0).double()
    ztsnr = schedule.alpha_bar[-1] == 0
    if ztsnr:  # diffusers' rescale runs in float32 on its own betas; the last level is 0 both ways
        assert theirs[-1].item() < 1e-7
    assert (theirs - ours_f32).abs().max().item() < (ALPHA_TOL_F64 if ztsnr else ALPHA_TOL_F32)
    assert (theirs - schedule.alpha_bar).abs().max().item() < ALPHA_TOL_F64


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, DDPMScheduler])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_exports_to_diffusers_alphas(name, scheduler_class):
    schedule = SCHEDULES[name]
    manifest = new_manifest(schedule=schedule.to_config(), prediction="eps", variance="fixed_small", sample_shape=[1])
    config = to_scheduler_config(manifest, scheduler_class.__name__)
    assert_alphas_agree(schedule, scheduler_class.from_config(config))
    if name in NAMED_AS:  # diffusers' own name where it computes the same betas
        assert config["beta_schedule"] == NAMED_AS[name] and config["trained_betas"] is None
    if name == "sigmoid":
        assert (config["trained_betas"] is None) == (scheduler_class is DDPMScheduler)  # DDIM has no sigmoid
    back = Schedule.from_config(betas_from_diffusers(config))
    assert (back.alpha_bar - schedule.alpha_bar).abs().max().item() < 1e-12


DIFFUSERS_SCHEDULERS = {
    "linear": dict(beta_schedule="linear"),
    "linear-T250": dict(beta_schedule="linear", num_train_timesteps=250, beta_start=1e-3, beta_end=0.05),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
    "zero-snr": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
    "trained_betas": dict(trained_betas=torch.linspace(1e-4, 0.02, 1000).tolist()),
}


@pytest.mark.parametrize("name", list(DIFFUSERS_SCHEDULERS))
def test_schedule_imports_with_diffusers_alphas(tmp_path, name):
    scheduler = DDIMScheduler(**DIFFUSERS_SCHEDULERS[name])
    scheduler.save_config(tmp_path)
    config = json.loads((tmp_path / "scheduler_config.json").read_text())
    schedule = Schedule.from_config(betas_from_diffusers(config))
    assert_alphas_agree(schedule, scheduler)


def test_negative_control_a_linear_schedule_without_difflab_rescaling_is_detected():
    """difflab states linear endpoints for T = 1000 and rescales them; forgetting that is caught."""
    schedule = SCHEDULES["linear-T500"]
    wrong = DDIMScheduler(num_train_timesteps=500, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    assert (wrong.alphas_cumprod.double() - schedule.alpha_bar).abs().max() > 1e-2


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_diffusers_ddim_loop_matches_difflab_ddim_on_the_imported_model(tmp_path, prediction):
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction, clip_sample=True,
                              timestep_spacing="leading", set_alpha_to_one=True, steps_offset=0)  # fmt: skip
    folder, unet = diffusers_folder(tmp_path, "ddpm-style", scheduler)
    pipe = Pipeline.from_pretrained(folder, device="cpu")
    assert pipe.manifest["thresholding"] == "static" and pipe.manifest["sample"]["spacing"] == "leading"
    steps, noise = 10, torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == get_timesteps(pipe.denoiser.schedule, steps, "leading").tolist()
    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            # difflab recomputes eps from the clipped x0, which diffusers' DDIM does when asked
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    denoiser, _ = pipe.condition(3)
    ours = sample(denoiser, noise.shape, "ddim", steps, spacing="leading", x_T=noise, progress=False)
    assert (ours - x).abs().max().item() < LOOP_TOL


def test_a_diffusers_folder_samples_through_the_cli_and_saves_as_difflab(tmp_path, capsys):
    folder, _ = diffusers_folder(tmp_path, "scale-shift-class")
    assert main(["sample", str(folder), "--n", "4", "--steps", "2", "--label", "1", "--out", str(tmp_path / "s"),
                 "--device", "cpu"]) == 0  # fmt: skip
    assert (tmp_path / "s" / "samples.png").is_file()
    assert main(["export", str(folder), "--out", str(tmp_path / "as-difflab")]) == 0
    again = Pipeline.from_pretrained(tmp_path / "as-difflab", device="cpu")
    assert (tmp_path / "as-difflab" / "diffusion.json").is_file() and again.manifest["num_classes"] == 5
    x, t, labels = inputs(classes=5)
    original = Pipeline.from_pretrained(folder, device="cpu")
    assert torch.equal(again.network(x, t.float(), {"y": labels}), original.network(x, t.float(), {"y": labels}))
    assert "library_name" in (tmp_path / "as-difflab" / "README.md").read_text()


def test_the_cli_exports_a_shipped_model_that_diffusers_loads(tmp_path):
    out = tmp_path / "digits-diffusers"
    assert main(["export", "digits-ddpm", "--out", str(out), "--format", "diffusers"]) == 0
    theirs = UNet2DModel.from_pretrained(out / "unet").eval()
    ours = Pipeline.from_pretrained("digits-ddpm", device="cpu").network
    x, t, _ = inputs(batch=2, size=16)
    with torch.no_grad():
        assert (theirs(x, t).sample - ours(x, t.float())).abs().max().item() < UNET_TOL
    assert (out / "training.json").is_file() and "DDIMPipeline" in (out / "README.md").read_text()
    assert main(["export", "digits-ddpm", "--out", str(out), "--format", "diffusers"]) == 2  # not over a folder


def test_import_diffusers_writes_a_difflab_model_folder(tmp_path):
    folder, _ = diffusers_folder(tmp_path, "plain")
    out = import_diffusers(folder, tmp_path / "converted")
    manifest = json.loads((out / "diffusion.json").read_text())
    assert manifest["components"] == {"denoiser": "."} and (out / "model.safetensors").is_file()
    assert manifest["schedule"] == {"kind": "named", "name": "cosine", "T": 1000, "zero_terminal_snr": False}
    pipe = Pipeline.from_pretrained(out, device="cpu")
    x = pipe(n=2, steps=2, output_type="pt")
    assert x.shape == (2, 1, 8, 8)
    # a pipeline loaded from the diffusers folder saves as a difflab folder too
    saved = Pipeline.from_pretrained(folder, device="cpu").save_pretrained(tmp_path / "saved")
    assert torch.equal(Pipeline.from_pretrained(saved, device="cpu")(n=2, steps=2, output_type="pt"), x)


def test_sharded_diffusers_weights_load(tmp_path):
    folder, theirs = diffusers_folder(tmp_path, "ddpm-style")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    theirs.save_pretrained(folder / "unet", max_shard_size="20KB")
    assert len(list((folder / "unet").glob("*.safetensors"))) > 1
    x, t, _ = inputs()
    with torch.no_grad():
        got = Pipeline.from_pretrained(folder, device="cpu").network(x, t.float())
        assert (got - theirs(x, t).sample).abs().max().item() < UNET_TOL


# --------------------------------------------------------------------------- refusals

REFUSED_DIFFUSERS = [
    ("center_input_sample", True),
    ("time_embedding_type", "fourier"),
    ("act_fn", "gelu"),
    ("mid_block_scale_factor", 1.414),
    ("downsample_padding", 0),
    ("class_embed_type", "timestep"),
    ("resnet_time_scale_shift", "spatial"),
    ("block_out_channels", [8, 12]),
    ("up_block_types", ["AttnUpBlock2D", "UpBlock2D"]),
    ("down_block_types", ["SkipDownBlock2D", "DownBlock2D"]),
    ("attn_norm_num_groups", 2),
    ("time_embedding_dim", 64),
    ("mid_block_type", None),
    ("some_future_option", 1),
]


@pytest.mark.parametrize(("option", "value"), REFUSED_DIFFUSERS)
def test_unmappable_diffusers_unet_options_are_refused_by_name(tmp_path, option, value):
    folder, _ = diffusers_folder(tmp_path, "plain")
    path = folder / "unet" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), option: value}))
    with pytest.raises(UnsupportedOption, match=option.split("_types")[0]) as error:
        Pipeline.from_pretrained(folder, device="cpu")
    assert "allowed" in str(error.value) or "maps" in str(error.value)


REFUSED_SCHEDULERS = [
    ("_class_name", "PNDMScheduler"),
    ("prediction_type", "flow_prediction"),
    ("beta_schedule", "laplace"),
    ("thresholding", True),  # with diffusers' ratio 0.995 and sample_max_value 1.5 below
]


@pytest.mark.parametrize(("option", "value"), REFUSED_SCHEDULERS)
def test_unmappable_scheduler_options_are_refused_by_name(tmp_path, option, value):
    folder, _ = diffusers_folder(tmp_path, "plain")
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), option: value, "sample_max_value": 1.5}))
    with pytest.raises(UnsupportedOption, match=option):
        Pipeline.from_pretrained(folder, device="cpu")


def test_learned_variance_and_pickled_weights_are_refused(tmp_path):
    folder, _ = diffusers_folder(tmp_path, "plain", DDPMScheduler(variance_type="learned_range"))
    with pytest.raises(UnsupportedOption, match="variance_type"):
        Pipeline.from_pretrained(folder, device="cpu")
    folder, _ = diffusers_folder(tmp_path, "plain")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_name("diffusion_pytorch_model.bin"))
    with pytest.raises(ValueError, match="pickle difflab never loads"):
        Pipeline.from_pretrained(folder, device="cpu")


REFUSED_DIFFLAB = [
    ("efficient_updown", dict(efficient_updown=True, attention_resolutions=(2,))),
    ("skip_rescale", dict(skip_rescale=True)),
    ("learn_sigma", dict(learn_sigma=True)),
    ("channel_mult", dict(channel_mult=(2, 2))),
    ("num_res_blocks", dict(num_res_blocks=(1, 2))),
    ("conv_resample", dict(conv_resample=False)),
    ("context_dim", dict(context_dim=8)),
    ("coordinate_channels", dict(coordinate_channels=True)),
    ("num_heads", dict(num_heads=2, attention_resolutions=(1, 2))),
    ("mid_attention_norm", dict(mid_attention_norm=False, use_scale_shift_norm=False)),
    ("guidance_embedding", dict(guidance_embedding=True)),
    ("aug_level_embedding", dict(aug_level_embedding=True)),
    ("image_embed_dim", dict(image_embed_dim=8)),
]


@pytest.mark.parametrize(("option", "changes"), REFUSED_DIFFLAB, ids=[r[0] for r in REFUSED_DIFFLAB])
def test_unmappable_difflab_unet_options_are_refused_by_name(option, changes):
    base = dict(in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,),
                num_heads=1, norm_groups=4)  # fmt: skip
    config = UNet({**base, **changes}).config
    with pytest.raises(UnsupportedOption, match=option) as error:
        to_diffusers_config(config, (8, 8))
    assert "allowed" in str(error.value)


@pytest.mark.parametrize(("key", "value"), [("prediction", "consistency"), ("variance", "learned"),
                                            ("conditioning", "text")])  # fmt: skip
def test_unmappable_manifests_are_refused_by_name(tmp_path, key, value):
    fields = {key: value, **({"null_caption": ""} if key == "conditioning" else {})}
    if key == "variance":
        folder, _ = difflab_folder(tmp_path, "shipped-like", variance=value)
    else:
        folder, _ = difflab_folder(tmp_path, "shipped-like")
        manifest = json.loads((folder / "diffusion.json").read_text())
        (folder / "diffusion.json").write_text(json.dumps({**manifest, **fields}))
    with pytest.raises((UnsupportedOption, ValueError), match=key):
        export_diffusers(folder, tmp_path / "out")


def test_round_trip_of_configs_is_exact():
    """difflab -> diffusers -> difflab gives back the same UNetConfig for every exported kind."""
    for options in DIFFLAB_UNETS.values():
        config = UNet(in_channels=1, **options).config
        fields, size, _ = from_diffusers_config(to_diffusers_config(config, (8, 8)))
        fields["num_classes"] = config.num_classes
        fields["out_channels"] = None
        again = type(config).from_dict(fields)
        assert UNet(again).state_dict().keys() == UNet(config).state_dict().keys() and size == (8, 8)
        assert {k: v for k, v in again.to_dict().items() if k not in ("num_heads", "num_head_channels")} == {
            k: v for k, v in config.to_dict().items() if k not in ("num_heads", "num_head_channels")
        }
