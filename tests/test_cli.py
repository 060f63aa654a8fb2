import subprocess
import sys

import torch

from difflab import __version__
from difflab.cli import main
from difflab.eval.digits_classifier import load_digits_classifier


def test_version_and_help(capsys):
    out = subprocess.run([sys.executable, "-m", "difflab.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"difflab {__version__}"
    assert main([]) == 0
    assert "train" in capsys.readouterr().out


def test_schedules_command_writes_a_png(tmp_path, capsys):
    out = tmp_path / "s.png"
    assert main(["schedules", "--T", "50", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cosine+ztsnr" in capsys.readouterr().out


def test_bad_value_is_a_clear_error_not_a_traceback(capsys):
    assert main(["schedules", "--T", "0", "--out", "x.png"]) == 2
    assert "T (number of diffusion steps) must be an integer >= 1" in capsys.readouterr().err


TINY = [
    "model.model_channels=8",
    "model.channel_mult=[1, 2]",
    "model.num_res_blocks=1",
    "model.norm_groups=4",
    "diffusion.T=20",
    "train.steps=3",
    "train.batch_size=8",
    "train.log_every=1",
    "train.sample_every=0",
    "train.checkpoint_every=0",
    "sample.steps=2",
    "sample.n=4",
]


def test_train_sample_eval_end_to_end(tmp_path, capsys):
    import json

    import numpy as np

    run = tmp_path / "run"
    args = ["train", "configs/digits-ddpm.toml", "--out", str(run)]
    for s in TINY:
        args += ["--set", s]
    assert main(args) == 0
    assert (run / "model" / "model.safetensors").is_file()
    assert len((run / "log.jsonl").read_text().splitlines()) == 3
    meta = json.loads((run / "model" / "diffusion.json").read_text())
    assert meta["thresholding"] == "static" and meta["data"]["name"] == "digits"  # images sample with x0 clipped

    out = tmp_path / "samples"
    assert main(["sample", str(run), "--n", "4", "--steps", "2", "--out", str(out)]) == 0
    data = np.load(out / "samples.npz")
    assert data["samples"].shape == (4, 1, 16, 16) and data["images_uint8"].dtype == np.uint8
    # same seed, same samples; the per-sample seeds make them independent of the batch
    assert main(["sample", str(run), "--n", "2", "--steps", "2", "--out", str(tmp_path / "two")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "two" / "samples.npz")["samples"], data["samples"][:2])

    metrics_file = tmp_path / "m.json"
    assert main(["eval", str(run), "--n", "4", "--steps", "2", "--out", str(metrics_file)]) == 0
    metrics = json.loads(metrics_file.read_text())
    assert metrics["num_samples"] == 4 and metrics["steps"] == 2 and metrics["seed"] == 0
    # eval judges the very samples `sample` drew above with the same seed: recompute its numbers from
    # them with the shipped digits classifier (softmax > 0.9 is "confident", arg-max the class)
    classifier = load_digits_classifier(16).eval()
    with torch.no_grad():
        probs = classifier(torch.from_numpy(data["samples"]).clamp(-1, 1)).softmax(1)
    assert metrics["confident_share"] == (probs.max(1).values > 0.9).sum().item() / 4
    assert metrics["class_histogram"]["counts"] == torch.bincount(probs.argmax(1), minlength=10).tolist()

    # a finished run is not overwritten by accident
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_bad_recipe_keys_fail_before_any_work(tmp_path, capsys):
    assert main(["train", "configs/digits-ddpm.toml", "--out", str(tmp_path / "r"), "--set", "train.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "stepz" in err and "steps" in err
    assert not (tmp_path / "r").exists()
    assert main(["sample", str(tmp_path / "missing")]) == 2
    assert "shipped" in capsys.readouterr().err


def test_out_of_range_sampling_values_are_refused_not_replaced(tmp_path, capsys):
    import pytest

    for flag, value, words in [
        ("--steps", "0", "argument --steps: must be an integer >= 1, got '0'"),
        ("--steps", "-3", "argument --steps: must be an integer >= 1, got '-3'"),
        ("--n", "0", "argument --n: must be an integer >= 1, got '0'"),
        ("--seed", "-1", "argument --seed: must be an integer in [0, 2**63 - 1], got '-1'"),
        ("--guidance", "nan", "argument --guidance: must be a finite number, got 'nan'"),
        ("--eta", "inf", "argument --eta: must be a finite number, got 'inf'"),
    ]:
        with pytest.raises(SystemExit) as stop:
            main(["sample", "digits-ddpm", flag, value, "--out", str(tmp_path / "o")])
        assert stop.value.code == 2
        assert words in capsys.readouterr().err
    assert main(["sample", "digits-ddpm", "--steps", "1001", "--out", str(tmp_path / "o")]) == 2
    assert "steps must be an integer in [1, 1000]" in capsys.readouterr().err
    assert main(["sample", "digits-ddpm", "--sampler", "plms", "--out", str(tmp_path / "o")]) == 2
    assert "unknown sampler 'plms'" in capsys.readouterr().err
    assert main(["sample", "digits-ddpm", "--device", "cuda:7", "--out", str(tmp_path / "o")]) == 2
    assert "cuda:7" in capsys.readouterr().err
    assert main(["sample", "digits-ddpm", "--label", "3", "--out", str(tmp_path / "o")]) == 2
    assert "label given, but the model is not class-conditional" in capsys.readouterr().err
    assert not (tmp_path / "o" / "samples.png").exists()


def test_an_unusable_output_folder_is_refused_before_sampling(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["sample", "digits-ddpm", "--n", "1", "--steps", "1", "--out", str(blocker)]) == 2
    assert f"--out {blocker} is a file" in capsys.readouterr().err
    assert main(["sample", "digits-ddpm", "--n", "1", "--steps", "1", "--out", str(blocker / "sub")]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_sample_writes_an_enlarged_grid_and_one_png_per_sample(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "s"
    assert main(["sample", "digits-ddpm", "--n", "3", "--steps", "2", "--save-each", "--out", str(out)]) == 0
    grid = Image.open(out / "samples.png")
    assert grid.width >= 2 * 96  # two columns of at least 96 px: 16 px digits are enlarged
    each = sorted((out / "images").glob("*.png"))
    assert [p.name for p in each] == ["00000.png", "00001.png", "00002.png"]
    assert Image.open(each[0]).size == (16, 16)  # native size, for FID tools
    assert "3 PNGs" in capsys.readouterr().out


def test_models_lists_every_shipped_model(capsys):
    from difflab.pipelines import shipped_models

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in shipped_models():
        assert name in out
