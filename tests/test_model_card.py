"""Model cards: the README.md of every exported folder has Hugging Face front matter a YAML
reader accepts (checked here by a small parser of the subset the Hub needs) and a body that
reports only what the folder records."""

import json
import re

import pytest

from difflab.interop import export_diffusers
from difflab.pipelines import Pipeline, read_manifest, shipped_models
from difflab.pipelines.card import model_card, read_records, write_model_card

SCALAR = re.compile(r'^([a-z_]+): ("(?:[^"\\]|\\.)*"|true|false|null|-?[0-9.e+-]+)$')
KEY = re.compile(r"^([a-z_]+):$")
ITEM = re.compile(r'^- ("(?:[^"\\]|\\.)*")$')


def parse_front_matter(text: str) -> tuple[dict, str]:
    """(metadata, body) of a card: a block between "---" lines of `key: scalar` and `key:` followed
    by `- "item"` lines; any other line fails the test."""
    lines = text.split("\n")
    assert lines[0] == "---", "a card starts with its front matter"
    end = lines.index("---", 1)
    meta, current = {}, None
    for line in lines[1:end]:
        if m := SCALAR.match(line):
            meta[m.group(1)], current = json.loads(m.group(2)), None
        elif m := KEY.match(line):
            current = meta[m.group(1)] = []
        elif (m := ITEM.match(line)) and current is not None:
            current.append(json.loads(m.group(1)))
        else:
            raise AssertionError(f"not front matter YAML: {line!r}")
    return meta, "\n".join(lines[end + 1 :])


def test_the_parser_rejects_what_is_not_front_matter():
    with pytest.raises(AssertionError):
        parse_front_matter("---\nlicense mit\n---\n")
    with pytest.raises(AssertionError):
        parse_front_matter("# no front matter\n")


def test_save_pretrained_writes_a_card_with_the_recipe_training_and_metrics(tmp_path):
    folder = Pipeline.from_pretrained("digits-ddpm", device="cpu").save_pretrained(tmp_path / "digits")
    meta, body = parse_front_matter((folder / "README.md").read_text())
    assert meta == {"library_name": "difflab", "license": "mit", "pipeline_tag": "unconditional-image-generation",
                    "tags": ["difflab", "diffusion", "unconditional", "eps-prediction", "digits"]}  # fmt: skip
    training = json.loads((shipped_models()["digits-ddpm"] / "training.json").read_text())
    assert f"- steps: {training['steps']:,}" in body
    assert f"{training['wall_seconds'] / 60:.0f} minutes" in body and training["recipe"] in body
    recorded = json.loads((shipped_models()["digits-ddpm"] / "metrics.json").read_text())
    assert f"| ddim-50.digits_fd | {recorded['ddim-50']['digits_fd']:.2f} |" in body  # 4 significant digits
    assert "| nll_bits_per_dim | 1.76 |" in body
    assert 'difflab.Pipeline.from_pretrained("digits")' in body and "difflab sample digits" in body
    assert "1.74M parameters" in body


def test_the_diffusers_export_card_names_diffusers_and_shows_its_pipeline(tmp_path):
    out = export_diffusers("digits-cfg", tmp_path / "cfg")
    meta, body = parse_front_matter((out / "README.md").read_text())
    assert meta["library_name"] == "diffusers" and "difflab" in meta["tags"] and "class-conditional" in meta["tags"]
    assert meta["pipeline_tag"] == "unconditional-image-generation" and meta["license"] == "mit"
    assert "UNet2DModel.from_pretrained" in body and "class_labels" in body and "label=3" in body
    assert "- steps: 2,500" in body


def test_cards_of_text_vector_and_unrecorded_models():
    text = read_manifest(shipped_models()["shapes-text"])
    meta, body = parse_front_matter(model_card(text, "shapes-text"))
    assert meta["pipeline_tag"] == "text-to-image"
    assert "text-to-image" in meta["tags"] and "v-prediction" in meta["tags"]
    assert 'prompt="' in body and "Not recorded in this folder." in body and "## Metrics" not in body
    vector = {**text, "conditioning": None, "sample_shape": [2], "data": {"name": "toy2d"}}
    meta, body = parse_front_matter(model_card(vector, "toy"))
    assert "pipeline_tag" not in meta and "toy2d" in meta["tags"]
    with pytest.raises(ValueError, match="format"):
        model_card(text, "x", fmt="onnx")


def test_write_model_card_reads_records_and_skips_unreadable_ones(tmp_path):
    (tmp_path / "training.json").write_text('{"steps": 12, "wall_seconds": 600}')
    (tmp_path / "metrics.json").write_text("{not json")
    assert set(read_records(tmp_path)) == {"training.json"}
    manifest = read_manifest(shipped_models()["digits-ddpm"])
    meta, body = parse_front_matter(write_model_card(tmp_path, manifest).read_text())
    assert meta["library_name"] == "difflab" and "- steps: 12" in body and "10 minutes" in body
