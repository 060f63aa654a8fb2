"""Crafted model folders: each is refused with one line naming the file and the key, before
anything is built, in well under 2 s and 1 GB (the header's shapes are compared with the
network planned on the meta device; caps on T, sample shapes and network sizes)."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from difflab.cli import main
from difflab.pipelines import Pipeline, shipped_models

SOURCE = shipped_models()["digits-ddpm"]


def edit_json(name, change):
    def craft(folder):
        path = folder / name
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))

    return craft


def config(**values):
    return edit_json("config.json", lambda c: c.update(values))


def manifest(**values):
    return edit_json("diffusion.json", lambda m: m.update(values))


def schedule(**values):
    return edit_json("diffusion.json", lambda m: m["schedule"].update(values))


def sample_defaults(**values):
    return edit_json("diffusion.json", lambda m: m["sample"].update(values))


def weights(data):
    def craft(folder):
        (folder / "model.safetensors").write_bytes(data(folder / "model.safetensors"))

    return craft


def torch_save(folder):
    torch.save({"w": torch.zeros(3)}, folder / "model.safetensors")


def component_outside(folder):
    """The denoiser's folder is a link to a copy of the model outside the model folder."""
    outside = folder.parent / "outside"
    shutil.copytree(SOURCE, outside)
    os.symlink(outside, folder / "elsewhere")
    manifest(components={"denoiser": "elsewhere"})(folder)


# name -> (how to craft the folder from a copy of digits-ddpm, words of the one-line error)
CRAFTED = {
    "a network much wider than its weights": (config(model_channels=512), ["model.safetensors", "does not match"]),
    "a network over the size limit": (config(model_channels=1024), ["parameters", "model_channels = 1024"]),
    "a width beyond the limit": (config(model_channels=10**9), ["model_channels", "1000000000"]),
    "too many blocks": (config(num_res_blocks=10**6), ["num_res_blocks", "1000000"]),
    "an unknown network class": (config(**{"class": "Bogus"}), ["Bogus"]),
    "an unknown dtype": (config(dtype="float1024"), ["dtype", "float1024"]),
    "config.json garbage": (lambda f: (f / "config.json").write_text("{"), ["config.json"]),
    "T = 1e9": (schedule(T=10**9), ["diffusion.json", "schedule", "1000000000"]),
    "T a float": (schedule(T=1e9), ["diffusion.json", "schedule", "1000000000.0"]),
    "an empty betas schedule": (manifest(schedule={"kind": "betas", "betas": []}), ["diffusion.json", "betas"]),
    "a VE ladder of 1e9 levels": (manifest(schedule={"kind": "ve", "n": 10**9}), ["diffusion.json", "1000000000"]),
    "sample_shape 1x1e5x1e5": (manifest(sample_shape=[1, 10**5, 10**5]), ["diffusion.json", "sample_shape"]),
    "sample_shape negative": (manifest(sample_shape=[1, -16, 16]), ["diffusion.json", "sample_shape"]),
    "a latent image shape 3x1e5x1e5": (
        manifest(components={"denoiser": ".", "autoencoder": "ae"}, latent={"image_shape": [3, 10**5, 10**5]}),
        ["diffusion.json", "latent", "image_shape"],
    ),
    "a component outside the folder": (manifest(components={"denoiser": "../x"}), ["diffusion.json", "'../x'"]),
    "a component linked outside": (component_outside, ["'denoiser'", "outside the model folder"]),
    "default eta with dpmpp_2m": (sample_defaults(sampler="dpmpp_2m", eta=0.5), ["diffusion.json", "eta"]),
    "default steps beyond T": (sample_defaults(steps=5000), ["diffusion.json", "5000"]),
    "default sampler unknown": (sample_defaults(sampler="bogus"), ["diffusion.json", "bogus"]),
    "diffusion.json garbage": (lambda f: (f / "diffusion.json").write_text("[1,"), ["diffusion.json"]),
    "weights a torch.save pickle": (torch_save, ["model.safetensors", "pickle", "never unpickles"]),
    "weights a plain pickle": (weights(lambda p: pickle.dumps({"w": 1})), ["model.safetensors", "a pickle"]),
    "weights truncated": (weights(lambda p: p.read_bytes()[:100_000]), ["model.safetensors", "truncated"]),
    "weights zero bytes": (weights(lambda p: b""), ["model.safetensors", "empty"]),
    "weights header garbage": (
        weights(lambda p: b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"\xff" * 64),
        ["model.safetensors", "damaged"],
    ),
}


@pytest.fixture
def crafted(tmp_path):
    def make(craft):
        folder = shutil.copytree(SOURCE, tmp_path / "model")
        craft(folder)
        return folder

    return make


@pytest.mark.parametrize("craft, words", CRAFTED.values(), ids=CRAFTED.keys())
def test_a_crafted_model_folder_is_refused_in_one_line_naming_file_and_key(crafted, craft, words):
    folder = crafted(craft)
    with pytest.raises(ValueError) as error:
        Pipeline.from_pretrained(folder, device="cpu")
    message = str(error.value)
    assert "\n" not in message and str(folder) in message
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("name", ["a network much wider than its weights", "T = 1e9", "weights a torch.save pickle"])
def test_difflab_sample_refuses_it_before_sampling(crafted, tmp_path, capsys, name):
    folder = crafted(CRAFTED[name][0])
    out = tmp_path / "out"
    assert main(["sample", str(folder), "--n", "1", "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("difflab sample: error: ") and str(folder) in err
    assert not (out / "samples.png").exists()


MEASURE = r"""
import json, resource, sys, time
from difflab.pipelines import Pipeline

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()

Pipeline.from_pretrained(sys.argv[1], device="cpu")  # the intact model loads (and warms up imports)
out = {}
for folder in sys.argv[2:]:
    before, started = rss(), time.perf_counter()
    try:
        Pipeline.from_pretrained(folder, device="cpu")
        error = None
    except ValueError as e:
        error = str(e)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's peak so far
    out[folder] = {"seconds": seconds, "grew": peak - before, "error": error}
print(json.dumps(out))
"""


def test_every_crafted_folder_is_refused_in_under_2_s_and_1_gb(tmp_path):
    """Measured in a fresh process: the time of each refusal and how far it raised the process's
    peak resident memory above what it held before (ru_maxrss; an over-estimate, never under)."""
    folders = []
    for i, (craft, _) in enumerate(CRAFTED.values()):
        folder = shutil.copytree(SOURCE, tmp_path / f"{i}" / "model")
        craft(folder)
        folders.append(str(folder))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", MEASURE, str(SOURCE), *folders], capture_output=True, text=True,
                          env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout)
    for name, folder in zip(CRAFTED, folders):
        m = measured[folder]
        assert m["error"] is not None, name  # refused
        assert m["seconds"] < 2.0, (name, m)
        assert m["grew"] < 2**30, (name, m)
