"""The vendored UCI digits: the file itself, split sizes, stratification, pixel range and resizing."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from difflab.data.digits import (
    DATA_FILE,
    NUM_IMAGES,
    DigitsDataset,
    _raw_digits,
    digit_labels,
    split_indices,
)


def test_the_vendored_file_is_the_uci_digits_set():
    import hashlib

    digest = hashlib.sha256(DATA_FILE.read_bytes()).hexdigest()
    assert digest == "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"  # see DIGITS-NOTICE.md
    images, labels = _raw_digits()
    assert images.shape == (1797, 8, 8) and images.min() == 0 and images.max() == 16
    assert torch.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert int(images.sum()) == 561718
    assert images[0, 0].tolist() == [0, 0, 5, 13, 9, 1, 0, 0]  # the first row of the first "0"


def test_split_sizes_cover_everything_without_overlap():
    train, test = split_indices()["train"], split_indices()["test"]
    assert (len(train), len(test)) == (1500, 297)
    assert len(set(train.tolist()) & set(test.tolist())) == 0
    assert sorted(train.tolist() + test.tolist()) == list(range(NUM_IMAGES))
    assert len(DigitsDataset("train")) == 1500 and len(DigitsDataset("test")) == 297
    assert len(DigitsDataset("all")) == NUM_IMAGES


def test_split_is_stratified_and_balanced():
    labels = digit_labels()
    per_class = torch.bincount(labels, minlength=10).double()
    test_counts = torch.bincount(labels[split_indices()["test"]], minlength=10).double()
    train_counts = torch.bincount(labels[split_indices()["train"]], minlength=10)
    # each class's test share is its proportional share of 297, rounded (error < 1 image)
    assert (test_counts - per_class * 297 / NUM_IMAGES).abs().max() < 1.0
    assert int(train_counts.min()) >= 145 and int(train_counts.max()) <= 153
    assert int(test_counts.min()) >= 29 and int(test_counts.max()) <= 30


def test_split_is_fixed():
    # recomputed without the cache it is identical, and pinned so it never silently changes
    fresh = split_indices.__wrapped__()
    assert torch.equal(fresh["test"], split_indices()["test"])
    assert split_indices()["test"][:5].tolist() == [4, 19, 31, 48, 55]


@pytest.mark.parametrize("size", [8, 16, 32])
def test_items_follow_the_contract(size):
    data = DigitsDataset("test", size=size)
    item = data[3]
    assert set(item) == {"x", "y"}
    assert item["x"].shape == (1, size, size) == data.image_shape
    assert item["x"].dtype == torch.float32
    assert item["y"].dtype == torch.int64 and item["y"].shape == ()
    assert data.num_classes == 10 and data.class_names == tuple("0123456789")
    images = data.images
    assert images.min() == -1.0 and images.max() <= 1.0
    # every digit has background, which is exactly -1 at every size
    assert (images.flatten(1).min(dim=1).values == -1.0).all()


def test_native_size_is_raw_values_scaled_linearly():
    raw = _raw_digits()[0]
    data = DigitsDataset("all", size=8)
    assert torch.equal(data.images[:, 0], raw / 8.0 - 1.0)  # 0 -> -1, 16 -> 1


def test_resized_digits_keep_their_shape():
    original = DigitsDataset("all", size=8).images
    for size in (16, 32):
        pooled = F.avg_pool2d(DigitsDataset("all", size=size).images, size // 8)
        a = (original - original.mean(dim=(2, 3), keepdim=True)).flatten(1)
        b = (pooled - pooled.mean(dim=(2, 3), keepdim=True)).flatten(1)
        correlation = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
        assert correlation.min() > 0.9, size  # a transposed or shifted resize drops far below


def test_item_is_a_copy():
    data = DigitsDataset("train")
    data[0]["x"].fill_(5.0)
    assert data.images[0].max() <= 1.0


def test_dataloader_collates_to_the_documented_batch():
    batch = next(iter(DataLoader(DigitsDataset("train", size=16), batch_size=7)))
    assert batch["x"].shape == (7, 1, 16, 16) and batch["y"].shape == (7,)
    assert batch["y"].dtype == torch.int64


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"size": 12}, "size must be one of"), ({"split": "val"}, "split must be one of")],
)
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DigitsDataset(**kwargs)
