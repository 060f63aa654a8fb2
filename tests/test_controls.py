"""Controls computed from images (masks, Sobel and Canny-like edges), a user's control PNG, and
the scores of how closely samples follow a control (mask IoU, edge F1 with a pixel tolerance)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from difflab.data import get_dataset
from difflab.data.controls import (
    HintDataset,
    canny_edges,
    foreground,
    load_hint,
    make_hint,
    shapes_mask,
    sobel_edges,
)
from difflab.eval.control import edge_f1, mask_iou


def square(size: int = 12, top: int = 3, left: int = 4, side: int = 5, channel: int | None = None) -> torch.Tensor:
    """A (1, 3, size, size) image in [-1, 1]: a bright square on black (one channel lit, or all)."""
    x = -torch.ones(1, 3, size, size)
    lit = slice(None) if channel is None else slice(channel, channel + 1)
    x[:, lit, top : top + side, left : left + side] = 1.0
    return x


def square_mask(**kw) -> torch.Tensor:
    return (square(**kw)[:, :1] > 0).float()


def inner_border(mask: torch.Tensor) -> torch.Tensor:
    """Object pixels with a 4-neighbour outside the object."""
    cross = torch.tensor([[0.0, 1, 0], [1, 1, 1], [0, 1, 0]])[None, None]
    eroded = F.conv2d(F.pad(mask, (1, 1, 1, 1)), cross) == 5
    return ((mask > 0) & ~eroded).float()


def outer_border(mask: torch.Tensor) -> torch.Tensor:
    """Background pixels with a 4-neighbour inside the object."""
    cross = torch.tensor([[0.0, 1, 0], [1, 0, 1], [0, 1, 0]])[None, None]
    touched = F.conv2d(F.pad(mask, (1, 1, 1, 1)), cross) > 0
    return ((mask == 0) & touched).float()


# ---------------------------------------------------------------- edges


@pytest.mark.parametrize("channel", [None, 2])  # white, and blue (one channel): the same edges
def test_canny_on_a_square_is_exactly_its_border(channel):
    x, mask = square(channel=channel), square_mask()
    assert torch.equal(canny_edges(x), inner_border(mask))  # one pixel wide, on the object's own outer pixels
    # Sobel marks both sides of the step: the object's border and the background pixels touching it
    assert torch.equal(sobel_edges(x), inner_border(mask) + outer_border(mask))


def test_canny_finds_no_edge_in_a_flat_image_or_at_the_frame():
    for value in (-1.0, 0.3, 1.0):
        assert canny_edges(torch.full((2, 3, 10, 10), value)).sum() == 0
    # a square in the top left corner: its edges are its two sides inside the image, not the frame
    edges = canny_edges(square(size=8, top=0, left=0, side=4))[0, 0]
    expected = torch.zeros(8, 8)
    expected[3, :4] = expected[:4, 3] = 1
    assert torch.equal(edges, expected)


def test_canny_hysteresis_keeps_weak_edges_only_where_connected_to_strong_ones():
    x = -torch.ones(1, 1, 12, 12)
    x[..., 2:6, 2:6] = 1.0  # strong square
    x[..., 2:6, 6:9] = -0.2  # a weak step continuing its top and bottom edges
    x[..., 9:11, 9:11] = -0.4  # a weak square on its own
    edges = canny_edges(x)[0, 0]
    assert edges[9:11, 9:11].sum() == 0  # isolated weak edges are dropped
    assert edges[2, 7:9].sum() == 2  # weak ones connected to a strong edge are kept
    assert canny_edges(x, low=0.5, high=0.5)[0, 0, 2, 7:9].sum() == 0  # low = high: no hysteresis


def test_a_shifted_square_is_rejected_by_edge_f1_at_tolerance_one():
    truth = canny_edges(square())
    assert edge_f1(canny_edges(square(left=5)), truth).item() == 1.0  # one pixel off: within tolerance
    shifted = edge_f1(canny_edges(square(left=6)), truth).item()  # negative control: two pixels off
    assert shifted < 0.7
    assert edge_f1(canny_edges(square(left=6)), truth, tolerance=2).item() == 1.0
    assert edge_f1(canny_edges(square(left=5)), truth, tolerance=0).item() < 0.8


# ---------------------------------------------------------------- masks


def test_the_foreground_mask_equals_the_renderers_coverage_on_shapes():
    for two in (False, True):
        data = get_dataset("shapes", "test", size=32, n=40, two_objects=two)
        masks = HintDataset(data, "mask")
        for i in range(len(data)):
            item = masks[i]
            assert torch.equal(item["hint"], shapes_mask(data.scene(i), 32))  # the wrapper uses the renderer
            assert torch.equal(foreground(item["x"][None])[0], item["hint"])  # and the pixels agree exactly


def test_a_mean_over_channels_foreground_is_not_the_mask():
    # negative control: reading colour images by their mean channel loses blue/red/green shapes
    data = get_dataset("shapes", "test", size=32, n=40)
    x = torch.stack([data[i]["x"] for i in range(len(data))])
    truth = torch.stack([shapes_mask(data.scene(i), 32) for i in range(len(data))])
    near_miss = ((x.mean(dim=1, keepdim=True) + 1.0) >= 1.0).float()
    assert mask_iou(near_miss, truth).min() == 0.0
    assert mask_iou(foreground(x), truth).min() == 1.0


def test_hint_dataset_computes_digit_edges_and_keeps_the_data_sets_attributes():
    digits = get_dataset("digits", "test", size=16)
    edges = HintDataset(digits, "canny")
    item = edges[3]
    assert item["hint"].shape == (1, 16, 16) and set(item["hint"].unique().tolist()) == {0.0, 1.0}
    assert torch.equal(item["hint"], canny_edges(digits[3]["x"][None])[0])
    assert edges.num_classes == 10 and len(edges) == len(digits)
    with pytest.raises(ValueError, match="unknown control kind 'sketch'"):
        HintDataset(digits, "sketch")
    with pytest.raises(ValueError, match="unknown control kind"):
        make_hint("depth", digits[0]["x"][None])


# ---------------------------------------------------------------- scores


def test_mask_iou_against_hand_computed_values():
    a = torch.zeros(3, 1, 4, 4)
    b = torch.zeros(3, 1, 4, 4)
    a[0, 0, :2, :2] = 1  # 4 pixels
    b[0, 0, :2, :3] = 1  # 6 pixels, 4 shared: 4 / 6
    a[1, 0, 0, 0] = 1  # disjoint single pixels: 0
    b[1, 0, 3, 3] = 1
    # image 2: both empty -> 1
    assert torch.allclose(mask_iou(a, b), torch.tensor([4 / 6, 0.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="same shape"):
        mask_iou(a, b[:, :, :3])


def test_edge_f1_against_hand_computed_values():
    pred = torch.zeros(2, 1, 8, 8)
    true = torch.zeros(2, 1, 8, 8)
    true[0, 0, 2, 1:5] = 1  # a 4-pixel line
    pred[0, 0, 3, 1:3] = 1  # 2 pixels one row below its first half: precision 1, recall 3/4
    pred[0, 0, 6, 6] = 1  # one stray pixel: precision 2/3
    p, r = 2 / 3, 3 / 4
    # image 1: nothing predicted where there is a true edge -> 0
    true[1, 0, 4, 4] = 1
    expected = torch.tensor([2 * p * r / (p + r), 0.0], dtype=torch.float64)
    assert torch.allclose(edge_f1(pred, true, tolerance=1), expected)
    with pytest.raises(ValueError, match="tolerance must be an int >= 0"):
        edge_f1(pred, true, tolerance=-1)


# ---------------------------------------------------------------- a user's control image


def test_load_hint_reads_grey_and_rgb_pngs_and_tensors(tmp_path):
    pixels = np.zeros((16, 16), dtype=np.uint8)
    pixels[4:9, 5:12] = 255
    Image.fromarray(pixels).save(tmp_path / "grey.png")
    Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(tmp_path / "rgb.png")
    expected = torch.from_numpy(pixels).float()[None, None] / 255
    for name in ("grey.png", "rgb.png"):
        assert torch.equal(load_hint(tmp_path / name, 1, (16, 16)), expected)  # RGB is read as grey
    assert load_hint(str(tmp_path / "grey.png"), 3, [16, 16]).shape == (1, 3, 16, 16)  # grey as RGB
    assert torch.equal(load_hint(expected[0], 1, (16, 16)), expected)  # (C, H, W) gets a batch axis


def test_a_control_image_of_the_wrong_size_or_channels_is_a_clear_error(tmp_path):
    Image.fromarray(np.zeros((8, 12), dtype=np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match=r"is 8x12 \(HxW\); this model's control is 16x16"):
        load_hint(tmp_path / "small.png", 1, (16, 16))
    with pytest.raises(ValueError, match=r"has 3 channel\(s\); this model's control takes 1"):
        load_hint(torch.zeros(1, 3, 16, 16), 1, (16, 16))
    with pytest.raises(ValueError, match="is 8x8"):
        load_hint(torch.zeros(2, 1, 8, 8), 1, (16, 16))
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        load_hint(torch.full((1, 1, 16, 16), -1.0), 1, (16, 16))
    with pytest.raises(ValueError, match="does not exist"):
        load_hint(tmp_path / "missing.png", 1, (16, 16))
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read control image"):
        load_hint(tmp_path / "text.png", 1, (16, 16))
