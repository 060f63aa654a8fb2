import pytest

from difflab.train.config import (
    Config,
    TrainConfig,
    apply_overrides,
    config_changes,
    load_config,
    parse_override,
    save_config,
)

RECIPE = """
task = "diffusion"

[data]
name = "digits"
size = 8

[model]
class = "UNet"
channel_mult = [1, 2]

[model.extra]
"odd key" = "x"

[diffusion]
schedule = "cosine"
T = 200

[train]
steps = 50
lr = 1
betas = [0.9, 0.99]
"""


def write(tmp_path, text=RECIPE):
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def test_defaults_and_recipe_values(tmp_path):
    config = load_config(write(tmp_path))
    assert config.task == "diffusion"
    assert config.model == {"class": "UNet", "channel_mult": [1, 2], "extra": {"odd key": "x"}}
    assert config.diffusion.schedule == "cosine" and config.diffusion.T == 200
    assert config.diffusion.prediction == "eps"  # default
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)  # int -> float
    assert config.train.betas == [0.9, 0.99]
    assert config.train.batch_size == TrainConfig().batch_size
    assert config.sample.sampler == "ddim"


def test_overrides_parse_toml_literals_and_fall_back_to_strings(tmp_path):
    config = load_config(
        write(tmp_path),
        ["train.lr=3e-4", "train.precision=bf16", "train.ema_warmup=false", "model.extra.depth=3", "task=diffusion"],
    )
    assert config.train.lr == 3e-4
    assert config.train.precision == "bf16"
    assert config.train.ema_warmup is False
    assert config.model["extra"] == {"odd key": "x", "depth": 3}
    assert parse_override('data.name="a=b"') == (["data", "name"], "a=b")
    assert parse_override("train.betas=[0.5, 0.6]") == (["train", "betas"], [0.5, 0.6])


@pytest.mark.parametrize(
    "override, words",
    [
        ("trian.lr=1", ["trian", "allowed", "train"]),
        ("train.lrr=1", ["lrr", "allowed keys", "lr", "batch_size"]),
        ("train.steps=1.5", ["train.steps", "1.5", "int"]),
        ("train.steps=true", ["train.steps", "True", "int"]),
        ("train.lr=fast", ["train.lr", "'fast'", "float"]),
        ("train.betas=[0.9]", ["train.betas", "two numbers"]),
        ("train.precision=fp16", ["train.precision", "fp16", "bf16"]),
        ("diffusion.schedule=cosin", ["diffusion.schedule", "cosin", "cosine"]),
        ("train.ema_decay=1.0", ["train.ema_decay", "[0, 1)"]),
        ("train.batch_size=10", ["batch_size", "10", "accumulate"]),
        ("noequals", ["section.key=value"]),
        ("train.lr.x=1", ["nested"]),
        ("data=3", ["[data]", "table"]),
    ],
)
def test_bad_values_are_rejected_with_the_key_and_what_is_allowed(tmp_path, override, words):
    overrides = [override, "train.accumulate=4"] if "batch_size" in override else [override]
    with pytest.raises(ValueError) as err:
        load_config(write(tmp_path), overrides)
    for word in words:
        assert word in str(err.value)


def test_hybrid_loss_needs_learned_variance():
    with pytest.raises(ValueError, match="learned"):
        Config.from_dict({"diffusion": {"loss_type": "hybrid"}})
    Config.from_dict({"diffusion": {"loss_type": "hybrid", "variance": "learned"}})


def test_saved_config_reads_back_equal(tmp_path):
    config = load_config(write(tmp_path), ['data.caption="quote \\" and \\\\ and \\u00e9"', "train.grad_clip=0"])
    path = save_config(config, tmp_path / "config.toml")
    again = load_config(path)
    assert again == config
    assert again.data["caption"] == 'quote " and \\ and é'
    assert config_changes(config, again) == []


def test_config_changes_names_dotted_keys(tmp_path):
    a = load_config(write(tmp_path))
    b = Config.from_dict(apply_overrides(a.to_dict(), ["train.steps=99", "model.channel_mult=[1]", "model.new=1"]))
    assert config_changes(a, b) == ["model.channel_mult", "model.new", "train.steps"]


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(write(tmp_path, "[train\nsteps = 1"))
