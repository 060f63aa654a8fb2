"""Pipelines: model folders and their manifest, loading every shipped model by name and by
folder, the one-call `Pipeline`, and inference that never imports the trainer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from difflab.denoiser import NetworkDenoiser
from difflab.guidance import conditioned, encode_prompts
from difflab.nets import MLP, UNet
from difflab.nets.text import TextConditionalUNet
from difflab.pipelines import Pipeline, load_pipeline, new_manifest, read_manifest, shipped_models, write_manifest
from difflab.samplers import resolve_sampler, sample
from difflab.schedules import Schedule

SHIPPED = sorted(shipped_models())
PROMPT = "a big red circle at the middle centre"


def _options(pipe: Pipeline) -> dict:
    return {"prompt": PROMPT} if pipe.conditioning == "text" else {}


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_model_loads_by_name_and_by_folder_and_samples_in_range(name):
    by_name = Pipeline.from_pretrained(name, device="cpu")
    by_folder = Pipeline.from_pretrained(shipped_models()[name], device="cpu")
    options = {"n": 3, "steps": 6, "seed": 4, **_options(by_name)}
    x = by_name.generate(**options)
    assert x.shape == (3, *by_name.output_shape)
    assert torch.isfinite(x).all()
    assert x.abs().max() <= 1.0 + 1e-5  # the saved x0 clipping is applied (the raw denoiser: see below)
    assert torch.equal(x, by_folder.generate(**options))


def test_the_raw_denoiser_is_unclipped_which_is_why_the_pipeline_applies_the_manifest():
    # negative control for the range check above: eps-prediction without its clip blows up
    denoiser, manifest = load_pipeline("digits-ddpm")
    assert manifest["thresholding"] == "static"
    x = sample(denoiser, (8, 1, 16, 16), "ddim", 10, generator=torch.Generator().manual_seed(0), progress=False)
    assert x.abs().max() > 10


def test_samples_do_not_depend_on_n_or_the_batch_size():
    pipe = Pipeline.from_pretrained("digits-ddpm", device="cpu")
    four = pipe.generate(4, steps=5, seed=11, batch_size=3)
    two = pipe.generate(2, steps=5, seed=11, batch_size=1)
    torch.testing.assert_close(two, four[:2], atol=1e-3, rtol=0)  # float32 convolutions differ by batch size
    assert not torch.allclose(four[0], four[1], atol=1e-2)


def test_output_types_are_what_their_names_say():
    pipe = Pipeline.from_pretrained("digits-ddpm", device="cpu")
    images = pipe(2, steps=4)
    assert len(images) == 2 and images[0].size == (16, 16) and images[0].mode == "L"
    arr = pipe(2, steps=4, output_type="np")
    assert arr.shape == (2, 16, 16, 1) and arr.min() >= 0 and arr.max() <= 1
    pt = pipe(2, steps=4, output_type="pt")
    assert torch.allclose(torch.from_numpy(arr).permute(0, 3, 1, 2) * 2 - 1, pt, atol=1e-6)
    # the PIL pixels are the tensor's, rounded
    expected = ((pt[0, 0] + 1) * 127.5).round()
    assert torch.equal(torch.tensor(list(images[0].get_flattened_data()), dtype=torch.float32).view(16, 16), expected)
    with pytest.raises(ValueError, match="unknown output_type 'jpg'; allowed: pil, np, pt"):
        pipe(2, output_type="jpg")


def test_save_pretrained_round_trips_and_keeps_the_recipe(tmp_path):
    pipe = Pipeline.from_pretrained("digits-ddpm", device="cpu")
    saved = pipe.save_pretrained(tmp_path / "copy")
    assert (saved / "recipe.toml").read_text() == (shipped_models()["digits-ddpm"] / "recipe.toml").read_text()
    again = Pipeline.from_pretrained(saved, device="cpu")
    assert again.manifest == pipe.manifest
    assert torch.equal(again.generate(2, steps=4), pipe.generate(2, steps=4))
    with pytest.raises(ValueError, match="the folder this pipeline was loaded from"):
        again.save_pretrained(saved)


def test_a_version_1_manifest_is_upgraded_on_read(tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(shipped_models()["digits-ddpm"], folder)
    v1 = {
        "format": "difflab-diffusion", "version": 1, "schedule": "cosine", "T": 1000, "zero_terminal_snr": False,
        "prediction": "eps", "variance": "fixed_small", "sample_shape": [1, 16, 16], "num_classes": None,
        "data": {"name": "digits", "size": 16},
        "sample": {"sampler": "ddim", "steps": 50, "n": 64, "eta": 0.0, "guidance": 0.0}, "thresholding": "static",
    }  # fmt: skip
    (folder / "diffusion.json").write_text(json.dumps(v1))
    assert read_manifest(folder) == read_manifest(shipped_models()["digits-ddpm"])


@pytest.mark.parametrize(
    "change, words",
    [
        ({"format": "other"}, "has format 'other'"),
        ({"version": 7}, "has version 7"),
        ({"prediction": "score"}, "prediction = 'score' is not allowed"),
        ({"components": {"denoiser": "../elsewhere"}}, "must be a folder inside the model folder"),
        ({"components": {"denoiser": "/etc"}}, "must be a folder inside the model folder"),
        ({"sample_shape": [1, -16, 16]}, "sample_shape"),
        ({"conditioning": "class", "num_classes": None}, "num_classes"),
        ({"thresholding": "soft"}, "thresholding = 'soft'"),
    ],
)
def test_bad_manifests_are_refused_with_the_key_and_file(tmp_path, change, words):
    folder = tmp_path / "bad"
    shutil.copytree(shipped_models()["digits-ddpm"], folder)
    manifest = {**read_manifest(folder), **change}
    (folder / "diffusion.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=words.replace("(", r"\(")) as err:
        Pipeline.from_pretrained(folder, device="cpu")
    assert "diffusion.json" in str(err.value)


def test_unknown_model_names_list_the_shipped_ones():
    with pytest.raises(ValueError, match="shipped: .*digits-ddpm"):
        Pipeline.from_pretrained("no-such-model")


# ---------------------------------------------------------------- conditional pipelines in memory
def _class_pipeline(device="cpu") -> Pipeline:
    torch.manual_seed(0)
    net = UNet(in_channels=1, model_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[],
               norm_groups=4, num_classes=3).to(device)  # fmt: skip
    for p in net.parameters():  # zero-initialised output layers would make every guidance weight equal
        torch.nn.init.normal_(p, std=0.05)
    schedule = Schedule.make("cosine", T=50)
    manifest = new_manifest(
        schedule=schedule.to_config(), prediction="eps", variance="fixed_small", sample_shape=[1, 8, 8],
        conditioning="class", num_classes=3,
    )  # fmt: skip
    return Pipeline(NetworkDenoiser(net.eval(), schedule, "eps", sample_shape=(1, 8, 8)), manifest)


def test_guidance_scale_is_diffusers_w_plus_one():
    pipe = _class_pipeline()
    w2 = pipe.generate(3, steps=4, guidance=2.0, label=1)
    assert torch.equal(w2, pipe.generate(3, steps=4, guidance_scale=3.0, label=1))
    assert not torch.allclose(w2, pipe.generate(3, steps=4, guidance=0.0, label=1), atol=1e-4)
    with pytest.raises(ValueError, match="not both"):
        pipe.generate(3, guidance=2.0, guidance_scale=3.0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        pipe.generate(3, label=3)


def test_a_vector_model_returns_arrays_and_refuses_pil():
    net = MLP(in_features=2, hidden=16, depth=1)
    schedule = Schedule.make("linear", T=20)
    manifest = new_manifest(schedule=schedule.to_config(), prediction="eps", variance="fixed_small", sample_shape=[2])
    pipe = Pipeline(NetworkDenoiser(net.eval(), schedule, "eps", sample_shape=(2,)), manifest)
    assert pipe(5, steps=3).shape == (5, 2)
    with pytest.raises(ValueError, match="draws vectors, not images"):
        pipe(5, output_type="pil")


def test_labels_follow_the_networks_device():
    meta_pipe = _class_pipeline(device="meta")
    _, cond = conditioned(meta_pipe.denoiser, meta_pipe.manifest, 4, scale=1.0)
    assert cond["y"].device.type == "meta"
    cpu_pipe = _class_pipeline()
    assert conditioned(cpu_pipe.denoiser, cpu_pipe.manifest, 4)[1]["y"].device.type == "cpu"


def test_encoded_prompts_follow_the_networks_device():
    tiny = {"unet": dict(in_channels=3, model_channels=8, channel_mult=[1], num_res_blocks=1, norm_groups=4,
                         attention_resolutions=[]), "text_encoder": dict(dim=8, depth=0, num_heads=2)}  # fmt: skip
    net = TextConditionalUNet(tiny).to("meta")
    seen = []

    def recording_forward(ids, mask):  # a meta tensor has no values to range-check: record instead
        seen.append(ids.device.type)
        return torch.zeros(*ids.shape, 8, device=ids.device)

    net.text_encoder.forward = recording_forward
    cond = encode_prompts(NetworkDenoiser(net, Schedule.make("linear", T=10)), [PROMPT, "a small blue square"])
    assert seen == ["meta"]
    assert cond["context"].device.type == "meta" and cond["context_mask"].device.type == "meta"


@pytest.mark.filterwarnings("ignore:this CPU has no native")  # slow there, still correct
def test_half_precision_sampling_stays_close_to_float32():
    pipe = Pipeline.from_pretrained("digits-ddpm", device="cpu")
    full = pipe.generate(4, steps=8)
    pipe.to(dtype="bf16")
    assert pipe.dtype == torch.bfloat16
    half = pipe.generate(4, steps=8)
    assert half.dtype == torch.float32  # the sampler's arithmetic stays float32
    assert (half - full).abs().mean() < 0.05
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        pipe.to(dtype="int8")


def test_bf16_on_a_cpu_without_bf16_instructions_is_kept_with_a_warning(monkeypatch):
    slow = "no native bfloat16 instructions: sampling in bfloat16 would run ~60x slower"
    monkeypatch.setattr("difflab.devices.cpu_lacks_fast", lambda dtype: dtype == torch.bfloat16)
    with pytest.warns(UserWarning, match=slow):
        Pipeline.from_pretrained("digits-ddpm", device="cpu", dtype="bf16")
    pipe = Pipeline.from_pretrained("digits-ddpm", device="cpu")
    with pytest.warns(UserWarning, match=slow):
        pipe.to(dtype="bf16")
    assert pipe.dtype == torch.bfloat16  # asked for explicitly: kept
    monkeypatch.setattr("difflab.devices.cpu_lacks_fast", lambda dtype: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a CPU with the instructions: no warning
        Pipeline.from_pretrained("digits-ddpm", device="cpu", dtype="bf16").to(dtype="bf16")


def test_sampler_aliases_name_a_sampler_and_its_spacing():
    assert resolve_sampler("dpmpp_2m_karras") == ("dpmpp_2m", "karras")
    assert resolve_sampler("ddim", "trailing") == ("ddim", "trailing")
    with pytest.raises(ValueError, match="means spacing 'karras', but spacing 'linspace' was given"):
        resolve_sampler("dpmpp_2m_karras", "linspace")
    with pytest.raises(ValueError, match="unknown sampler 'plms'; allowed: ddpm, ddim"):
        resolve_sampler("plms")


def test_inference_never_imports_the_trainer():
    code = (
        "import sys, difflab.pipelines, difflab.guidance, difflab.samplers\n"
        "p = difflab.pipelines.Pipeline.from_pretrained('digits-ddpm', device='cpu')\n"
        "p.generate(1, steps=2)\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('difflab.train', 'difflab.data.digits')))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent, timeout=120)


def test_write_manifest_refuses_what_it_could_not_read_back(tmp_path):
    with pytest.raises(ValueError, match="lacks the key 'schedule'"):
        write_manifest(tmp_path, {"format": "difflab-diffusion", "version": 2, "components": {"denoiser": "."}})
    assert not (tmp_path / "diffusion.json").exists()
