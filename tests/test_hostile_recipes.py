"""Hostile recipes: every bad recipe is refused in one line that names the key and its value,
before the run folder is created (so before any data set is built or step is taken)."""

from pathlib import Path

import pytest

from difflab.cli import main
from difflab.train import load_config
from difflab.train.preflight import check_recipe

DDPM, CFG, TOY = "configs/digits-ddpm.toml", "configs/digits-cfg.toml", "configs/toy2d.toml"
SHORT = ["train.steps=1", "train.batch_size=8", "train.sample_every=0"]  # were a check missing: a short run

# (recipe, --set overrides, words the one-line error must contain: the key and the bad value)
BAD_RECIPES = {
    # sizes that would allocate absurd memory
    "T huge": (DDPM, ["diffusion.T=1000000000"], ["diffusion.T", "1000000000"]),
    "T zero": (DDPM, ["diffusion.T=0"], ["diffusion.T", "0"]),
    "width huge": (DDPM, ["model.model_channels=1000000000"], ["model_channels", "1000000000"]),
    "network over the parameter limit": (DDPM, ["model.model_channels=1024"], ["parameters", "model_channels = 1024"]),
    "too many blocks": (DDPM, ["model.num_res_blocks=1000"], ["num_res_blocks", "1000"]),
    "too many levels": (DDPM, ["model.channel_mult=[" + ", ".join(["1"] * 100) + "]"], ["channel_mult", "100"]),
    "MLP hidden huge": (TOY, ["model.hidden=1000000000"], ["hidden", "1000000000"]),
    "MLP depth huge": (TOY, ["model.depth=100000"], ["depth", "100000"]),
    "grid huge": (DDPM, ["sample.n=1000000000"], ["sample.n", "1000000000"]),
    "grid empty": (DDPM, ["sample.n=0"], ["sample.n", "0"]),
    "consistency levels huge": (DDPM, ["consistency.levels=1000000000"], ["consistency.levels", "1000000000"]),
    "digits size huge": (DDPM, ["data.size=100000"], ["size", "100000"]),
    # numbers that overflow float32 or are not numbers
    "lr overflows float32": (DDPM, ["train.lr=1e39"], ["train.lr", "1e+39", "float32"]),
    "lr inf": (DDPM, ["train.lr=inf"], ["train.lr", "inf"]),
    "lr nan": (DDPM, ["train.lr=nan"], ["train.lr", "nan"]),
    "lr negative": (DDPM, ["train.lr=-1e-3"], ["train.lr", "-0.001"]),
    "weight decay overflows": (DDPM, ["train.weight_decay=1e40"], ["train.weight_decay", "1e+40"]),
    "snr gamma overflows": (DDPM, ["diffusion.snr_gamma=1e300"], ["diffusion.snr_gamma", "1e+300"]),
    # [sample] against the model it will train
    "unknown sampler": (DDPM, ["sample.sampler=bogus"], ["sample.sampler", "bogus"]),
    "guidance, unconditional model": (DDPM, ["sample.guidance=2"], ["sample.guidance", "2.0", "unconditional"]),
    "guidance, unconditional MLP": (TOY, ["sample.guidance=1"], ["sample.guidance", "1.0", "unconditional"]),
    "eta with dpmpp_2m": (DDPM, ["sample.sampler=dpmpp_2m", "sample.eta=0.5"], ["sample.eta", "0.5", "dpmpp_2m"]),
    "eta with an alias": (DDPM, ["sample.sampler=dpmpp_2m_karras", "sample.eta=1"], ["sample.eta", "dpmpp_2m_karras"]),
    "eta with euler": (TOY, ["sample.sampler=euler", "sample.eta=0.3"], ["sample.eta", "0.3", "euler"]),
    "eta negative": (DDPM, ["sample.eta=-1"], ["sample.eta", "-1.0"]),
    "steps beyond T": (DDPM, ["sample.steps=5000"], ["steps = 5000", "T = 1000"]),
    "steps beyond a small T": (DDPM, ["diffusion.T=20", "sample.steps=21"], ["steps = 21", "T = 20"]),
    "respacing disagrees with steps": (DDPM, ["sample.spacing=ddim25"], ["spacing = 'ddim25'", "steps = 50"]),
    "unknown spacing": (DDPM, ["sample.spacing=bogus"], ["sample.spacing", "bogus"]),
    "unknown thresholding": (DDPM, ["sample.thresholding=bogus"], ["sample.thresholding", "bogus"]),
    "guidance nan": (CFG, ["sample.guidance=nan"], ["sample.guidance", "nan"]),
    # the rest of the recipe
    "unknown key": (DDPM, ["train.stepz=3"], ["stepz", "steps"]),
    "wrong type": (DDPM, ["train.steps=ten"], ["train.steps", "ten"]),
    "unknown task": (DDPM, ["task=bogus"], ["task", "bogus"]),
    "unknown network": (DDPM, ["model.class=Bogus"], ["Bogus"]),
    "unknown data set": (DDPM, ["data.name=bogus"], ["data set", "bogus"]),
    "more classes in the data than the network has": (CFG, ["model.num_classes=3"], ["num_classes", "3"]),
    "class-conditional network, unlabelled data": (TOY, ["model.num_classes=8"], ["num_classes = 8", "no labels"]),
}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line, not a traceback
    assert err.startswith("difflab train: error: ")
    return err


@pytest.mark.parametrize("recipe, overrides, words", BAD_RECIPES.values(), ids=BAD_RECIPES.keys())
def test_a_bad_recipe_is_refused_in_one_line_before_the_run_folder_exists(tmp_path, capsys, recipe, overrides, words):
    out = tmp_path / "run"
    args = ["train", recipe, "--out", str(out)]
    for override in SHORT + overrides:  # the case's own overrides come last, and win
        args += ["--set", override]
    assert main(args) == 2
    err = one_line_error(capsys)
    for word in words:
        assert word in err, (word, err)
    assert not out.exists()  # refused before the run folder was created: no work started


def test_a_bad_change_on_resume_is_refused_too(tmp_path, capsys):
    """`--resume RUN --set sample.eta=...` is checked like a new recipe, before anything is loaded."""
    assert main(["train", "--resume", str(tmp_path / "none"), "--set", "sample.sampler=euler"]) == 2
    assert "no checkpoint" in one_line_error(capsys)


@pytest.mark.parametrize("recipe", sorted(str(p) for p in Path("configs").glob("*.toml")))
def test_every_shipped_recipe_passes_the_checks(recipe):
    """No false alarms: the checks accept every recipe the project ships (guidance on digits-cfg,
    text conditioning on shapes-text, dpmpp_2m on toy2d, teachers' tasks without [model])."""
    check_recipe(load_config(recipe))


def test_guidance_is_accepted_for_conditional_networks():
    check_recipe(load_config(CFG, ["sample.guidance=3"]))
    check_recipe(load_config(DDPM, ["sample.guidance=0", "sample.sampler=ddim", "sample.eta=1"]))
