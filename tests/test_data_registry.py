"""get_dataset: names, options, and the batch contract shared by every built-in set."""

import pytest
import torch
from torch.utils.data import DataLoader

from difflab.data import DATASET_NAMES, get_dataset


def test_unknown_name_lists_the_available_names():
    with pytest.raises(ValueError, match="unknown data set 'imagenet'") as error:
        get_dataset("imagenet")
    for name in ("digits", "shapes", "toy2d", "folder", "mnist", "cifar10"):
        assert name in str(error.value) and name in DATASET_NAMES


def test_unknown_option_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['resolution'\].*'size'"):
        get_dataset("shapes", resolution=32)


@pytest.mark.parametrize(
    ("name", "options", "keys", "x_shape"),
    [
        ("digits", {"size": 16}, {"x", "y"}, (1, 16, 16)),
        ("shapes", {"size": 16, "n": 20}, {"x", "y", "caption", "labels"}, (3, 16, 16)),
        ("toy2d", {"kind": "moons", "n": 20}, {"x"}, (2,)),
    ],
)
def test_built_in_sets_give_the_documented_batch(name, options, keys, x_shape):
    for split in ("train", "test"):
        data = get_dataset(name, split, **options)
        assert data.image_shape == x_shape
        batch = next(iter(DataLoader(data, batch_size=5, shuffle=True)))
        assert set(batch) == keys
        assert batch["x"].shape == (5, *x_shape) and batch["x"].dtype == torch.float32
        if "y" in keys:
            assert batch["y"].shape == (5,) and batch["y"].dtype == torch.int64
            assert 0 <= batch["y"].min() and batch["y"].max() < data.num_classes
            assert len(data.class_names) == data.num_classes
            assert batch["x"].min() >= -1.0 and batch["x"].max() <= 1.0
        else:
            assert data.num_classes is None
        if "caption" in keys:
            assert len(batch["caption"]) == 5 and all(isinstance(c, str) for c in batch["caption"])
