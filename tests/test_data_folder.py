"""Image folder set on folders the tests write; MNIST/CIFAR-10 wrapper without torchvision."""

import importlib.util
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from difflab.data import get_dataset
from difflab.data.folder import ImageFolderDataset
from difflab.data.torchvision_sets import LabelledImageDataset

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def solid(colour, size=(20, 12), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


@pytest.fixture
def class_folder(tmp_path):
    """cats/: 2 red PNGs; dogs/: a blue JPEG, a blue grey-scale PNG and a corrupt PNG."""
    (tmp_path / "cats").mkdir()
    (tmp_path / "dogs" / "inner").mkdir(parents=True)
    solid(RED).save(tmp_path / "cats" / "a.png")
    solid(RED, size=(7, 30)).save(tmp_path / "cats" / "b.PNG")
    solid(BLUE).save(tmp_path / "dogs" / "c.jpg", quality=95)
    solid(BLUE).convert("L").save(tmp_path / "dogs" / "inner" / "d.png")
    (tmp_path / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "dogs" / "notes.txt").write_text("not an image, not a candidate")
    (tmp_path / ".hidden").mkdir()
    solid(GREEN).save(tmp_path / ".hidden" / "e.png")
    return tmp_path


def test_class_subfolders_give_labels_and_the_corrupt_file_is_skipped(class_folder):
    broken = class_folder / "dogs" / "broken.png"
    with pytest.warns(UserWarning, match=re.escape(str(broken))):
        data = ImageFolderDataset(class_folder, size=8)
    assert data.class_names == ("cats", "dogs") and data.num_classes == 2
    assert [p.name for p in data.files] == ["a.png", "b.PNG", "c.jpg", "d.png"]
    assert data.skipped == [broken]
    assert len(data) == 4 and data.image_shape == (3, 8, 8)
    for i, (label, colour) in enumerate([(0, RED), (0, RED), (1, BLUE), (1, None)]):
        item = data[i]
        assert set(item) == {"x", "y"}
        assert item["x"].shape == (3, 8, 8) and item["x"].dtype == torch.float32
        assert item["y"].dtype == torch.int64 and int(item["y"]) == label
        if colour is not None:  # solid colours survive resizing (JPEG within a few levels)
            expected = torch.tensor(colour, dtype=torch.float32) / 127.5 - 1
            assert torch.allclose(item["x"].mean(dim=(1, 2)), expected, atol=0.05)
    grey = data[3]["x"]  # the grey PNG becomes 3 equal channels
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_raise_mode_names_the_corrupt_file(class_folder):
    broken = class_folder / "dogs" / "broken.png"
    with pytest.raises(ValueError, match=re.escape(str(broken))):
        ImageFolderDataset(class_folder, size=8, on_error="raise")


def test_truncated_png_is_caught_at_construction(tmp_path):
    solid(RED, size=(64, 64)).save(tmp_path / "good.png")
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))
    noisy.save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:300])
    with pytest.warns(UserWarning, match="cut.png"):
        data = ImageFolderDataset(tmp_path, size=4)
    assert [p.name for p in data.files] == ["good.png"] and data.num_classes is None
    assert set(data[0]) == {"x"}


def test_one_channel_and_conversions(tmp_path):
    solid(RED).save(tmp_path / "red.png")
    transparent = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    transparent.save(tmp_path / "transparent.png")
    deep = Image.fromarray(np.full((10, 10), 65535, dtype=np.uint16))
    deep.save(tmp_path / "white16.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here is unreadable
        data = ImageFolderDataset(tmp_path, size=6, channels=1)
    by_name = {p.name: data[i]["x"] for i, p in enumerate(data.files)}
    assert by_name["red.png"].shape == (1, 6, 6)
    # ITU-R 601 luma of pure red is 0.299 * 255 = 76
    assert by_name["red.png"].mean().item() == pytest.approx(76 / 127.5 - 1, abs=1e-6)
    assert torch.all(by_name["transparent.png"] == 1.0)  # composited over white
    assert torch.all(by_name["white16.png"] == 1.0)  # 16-bit white is white, not clipped


def test_centre_crop_keeps_the_middle(tmp_path):
    wide = np.zeros((30, 90, 3), dtype=np.uint8)
    wide[:, :30], wide[:, 30:60], wide[:, 60:] = RED, GREEN, BLUE
    Image.fromarray(wide).save(tmp_path / "wide.png")
    x = ImageFolderDataset(tmp_path, size=10)[0]["x"]
    assert torch.allclose(x[:, 2:8, 2:8], torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1))


def test_class_folders_option(tmp_path):
    (tmp_path / "a").mkdir()
    solid(RED).save(tmp_path / "a" / "1.png")
    solid(RED).save(tmp_path / "loose.png")
    auto = ImageFolderDataset(tmp_path, size=4)  # a loose image: no classes, all images
    assert auto.num_classes is None and auto.class_names is None and len(auto) == 2
    forced = ImageFolderDataset(tmp_path / "a", size=4, class_folders=False)
    assert len(forced) == 1
    solid(RED).save(tmp_path / "a" / "2.gif")
    assert len(ImageFolderDataset(tmp_path / "a", size=4, extensions=["GIF", ".png"])) == 2
    with pytest.raises(ValueError, match="loose.png"):
        ImageFolderDataset(tmp_path, size=4, class_folders=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"on_error": "ignore"}, "on_error must be one of"),
        ({"channels": 4}, "channels must be one of"),
        ({"size": 0}, "size must be a positive int"),
        ({"extensions": ".png"}, "extensions must be a list"),
    ],
)
def test_bad_options_are_named(tmp_path, kwargs, message):
    solid(RED).save(tmp_path / "x.png")
    with pytest.raises(ValueError, match=message):
        ImageFolderDataset(tmp_path, **kwargs)


def test_empty_missing_and_all_corrupt_folders(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "bad.png").write_bytes(b"junk")
    with pytest.warns(UserWarning, match="bad.png"), pytest.raises(ValueError, match="none of"):
        ImageFolderDataset(tmp_path)


def test_dataloader_and_registry_splits(class_folder):
    with pytest.warns(UserWarning):
        data = get_dataset("folder", root=class_folder, size=8)
    batch = next(iter(DataLoader(data, batch_size=3)))
    assert batch["x"].shape == (3, 3, 8, 8) and batch["y"].tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="sub-folder"):
        get_dataset("folder", "test", root=class_folder)
    with pytest.warns(UserWarning):
        dogs = get_dataset("folder", "dogs", root=class_folder, size=8)  # root/<split>/
    assert len(dogs) == 2 and dogs.num_classes is None  # c.jpg, and inner/ holds d.png
    with pytest.raises(ValueError, match="needs root"):
        get_dataset("folder")


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="installed")
@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_torchvision_sets_name_the_missing_package(name):
    with pytest.raises(ImportError, match="torchvision"):
        get_dataset(name)


def test_labelled_image_wrapper_converts_pairs():
    pairs = [(solid(GREEN, (32, 32)), 3), (solid(RED, (32, 32)), 1)]
    data = LabelledImageDataset(pairs, channels=3, class_names="abcd")
    assert data.image_shape == (3, 32, 32) and data.num_classes == 4
    item = data[0]
    assert torch.all(item["x"] == torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1))
    assert item["y"].dtype == torch.int64 and int(item["y"]) == 3
    grey = LabelledImageDataset(pairs, channels=1, class_names="abcd", size=16)
    assert grey.image_shape == (1, 16, 16) and grey[1]["x"].shape == (1, 16, 16)
