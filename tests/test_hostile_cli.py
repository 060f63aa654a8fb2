"""Hostile command lines: every out-of-range value and unusable output path is refused with
one line naming the flag or the value, before any sampling or training; seeds never share
samples."""

import functools

import pytest
import torch

from difflab import samplers
from difflab.cli import main
from difflab.pipelines import Pipeline, sample_seeds

MODEL = "digits-ddpm"  # unconditional, T = 1000


@pytest.fixture(autouse=True)
def no_sampling(monkeypatch):
    """Any sampler step fails the test: a refusal must come before the work."""

    def refusing(sampler):
        @functools.wraps(sampler)  # the same signature: option checks still see the sampler's own options
        def started(*args, **kwargs):
            raise AssertionError("sampling started before the input was refused")

        return started

    for name, sampler in list(samplers.SAMPLERS.items()):
        monkeypatch.setitem(samplers.SAMPLERS, name, refusing(sampler))


# values argparse refuses: (flags, the error line's words)
BAD_FLAGS = {
    "--steps 0": (["--steps", "0"], "argument --steps: must be an integer >= 1, got '0'"),
    "--steps -3": (["--steps", "-3"], "argument --steps: must be an integer >= 1, got '-3'"),
    "--steps ten": (["--steps", "ten"], "argument --steps: must be an integer >= 1, got 'ten'"),
    "--n 0": (["--n", "0"], "argument --n: must be an integer >= 1, got '0'"),
    "--batch-size 0": (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got '0'"),
    "--nrow 0": (["--nrow", "0"], "argument --nrow: must be an integer >= 1, got '0'"),
    "--seed -1": (["--seed", "-1"], "argument --seed: must be an integer in [0, 2**63 - 1], got '-1'"),
    "--seed 2**64": (["--seed", str(2**64)], f"argument --seed: must be an integer in [0, 2**63 - 1], got '{2**64}'"),
    "--seed 1e3": (["--seed", "1e3"], "argument --seed: must be an integer in [0, 2**63 - 1], got '1e3'"),
    "--label -1": (["--label", "-1"], "argument --label: must be an integer >= 0, got '-1'"),
    "--guidance nan": (["--guidance", "nan"], "argument --guidance: must be a finite number, got 'nan'"),
    "--guidance-scale inf": (["--guidance-scale", "inf"], "argument --guidance-scale: must be a finite number"),
    "--eta inf": (["--eta", "inf"], "argument --eta: must be a finite number, got 'inf'"),
}


@pytest.mark.parametrize("flags, words", BAD_FLAGS.values(), ids=BAD_FLAGS.keys())
def test_an_out_of_range_flag_is_refused_by_name(tmp_path, capsys, flags, words):
    with pytest.raises(SystemExit) as stop:
        main(["sample", MODEL, *flags, "--out", str(tmp_path / "o")])
    assert stop.value.code == 2
    assert words in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists()


def blocker(tmp_path):
    path = tmp_path / "file"
    path.write_text("not a folder")
    return path


# values refused once the model is known: (arguments after `sample MODEL`, the error's words)
BAD_REQUESTS = {
    "steps beyond T": (["--steps", "1001"], ["steps must be an integer in [1, 1000]", "1001"]),
    "unknown sampler": (["--sampler", "plms"], ["unknown sampler 'plms'"]),
    "unknown spacing": (["--spacing", "bogus"], ["unknown spacing 'bogus'"]),
    "eta with dpmpp_2m": (["--sampler", "dpmpp_2m", "--eta", "0.5"], ["eta", "0.5", "dpmpp_2m"]),
    "eta negative": (["--eta", "-1"], ["eta must be a finite number >= 0", "-1.0"]),
    "respacing disagrees with steps": (["--spacing", "ddim25", "--steps", "50"], ["'ddim25'", "steps=50"]),
    "a device that is not there": (["--device", "cuda:7"], ["cuda:7"]),
    "an unknown dtype": (["--dtype", "float1024"], ["float1024"]),
    "a label for an unconditional model": (["--label", "3"], ["label given", "not class-conditional"]),
    "a prompt for an unconditional model": (["--prompt", "a red circle"], ["prompt", "not text-conditional"]),
    "guidance for an unconditional model": (["--guidance", "2"], ["guidance", "unconditional"]),
    "guidance given twice": (["--guidance", "1", "--guidance-scale", "2"], ["guidance", "guidance_scale"]),
    "--out an existing file": (lambda t: ["--out", str(blocker(t))], ["--out", "is a file"]),
    "--out under a file": (lambda t: ["--out", str(blocker(t) / "sub")], ["--out", "not writable"]),
}


def one_line(capsys, command="sample") -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"difflab {command}: error: "), err
    return err


@pytest.mark.parametrize("extra, words", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_a_bad_sampling_request_is_refused_in_one_line_before_sampling(tmp_path, capsys, extra, words):
    extra = extra(tmp_path) if callable(extra) else [*extra, "--out", str(tmp_path / "o")]
    assert main(["sample", MODEL, "--n", "2", *extra]) == 2
    err = one_line(capsys)
    for word in words:
        assert word in err, (word, err)
    assert not (tmp_path / "o" / "samples.png").exists()


def test_a_missing_model_is_refused_in_one_line(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "missing" in one_line(capsys) and not (tmp_path / "o" / "samples.png").exists()


@pytest.mark.parametrize("where", ["an existing folder", "under a file"])
def test_eval_checks_its_output_file_before_sampling(tmp_path, capsys, where):
    out = tmp_path / "metrics" if where == "an existing folder" else blocker(tmp_path) / "m.json"
    if where == "an existing folder":
        out.mkdir()
    assert main(["eval", MODEL, "--n", "4", "--steps", "2", "--out", str(out)]) == 2
    err = one_line(capsys, "eval")
    assert "--out" in err and ("is a folder" in err or "is a file" in err)


@pytest.mark.parametrize("where", ["an existing file", "under a file"])
def test_train_checks_its_run_folder_before_any_work(tmp_path, capsys, where, monkeypatch):
    import difflab.train.runner as runner

    monkeypatch.setattr(runner, "make_trainer", lambda *a, **k: pytest.fail("work started"))
    out = blocker(tmp_path) if where == "an existing file" else blocker(tmp_path) / "run"
    assert main(["train", "configs/digits-ddpm.toml", "--out", str(out)]) == 2
    err = one_line(capsys, "train")
    assert f"the run folder {out} cannot be created" in err and "is a file" in err


def test_an_os_error_while_writing_is_reported_in_one_line(tmp_path, capsys, monkeypatch):
    import numpy as np

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "o" / "samples.npz"))

    monkeypatch.setattr(Pipeline, "generate", lambda self, n, **options: torch.zeros(n, 1, 16, 16))
    monkeypatch.setattr(np, "savez_compressed", full_disk)
    assert main(["sample", MODEL, "--n", "2", "--out", str(tmp_path / "o")]) == 1
    assert "No space left on device" in one_line(capsys)


# ---------------------------------------------------------------- seeds
def test_per_sample_seeds_of_different_seeds_never_overlap():
    seeds = {s: sample_seeds(s, 1000) for s in (0, 1, 2, 2**63 - 1)}
    assert len(set().union(*seeds.values())) == 4 * 1000  # seed + index would share 999 of 1000
    assert sample_seeds(0, 10) == seeds[0][:10]  # a sample's seed does not depend on n
    with pytest.raises(ValueError, match="seed must be an integer in"):
        sample_seeds(2**63, 1)


def test_samples_of_neighbouring_seeds_differ_but_not_with_n_or_batch_size(monkeypatch):
    monkeypatch.undo()  # this test samples
    pipe = Pipeline.from_pretrained(MODEL, device="cpu")
    a = pipe.generate(3, steps=2, seed=0, batch_size=3)
    b = pipe.generate(3, steps=2, seed=1, batch_size=3)
    assert not any(torch.equal(x, y) for x in a for y in b)  # sample i of seed 1 is not sample i + 1 of seed 0
    assert torch.equal(pipe.generate(5, steps=2, seed=0, batch_size=2)[:3], a)  # same with n and batch size
