"""uint8 <-> [-1, 1] conversions and grid PNGs."""

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.data.images import from_uint8_images, make_grid, save_grid, to_uint8_images


def test_uint8_mapping_is_exact_and_invertible():
    levels = torch.arange(256, dtype=torch.uint8)
    x = from_uint8_images(levels)
    assert x[0] == -1.0 and x[255] == 1.0 and x.dtype == torch.float32
    assert torch.equal(to_uint8_images(x), levels)
    special = torch.tensor([-5.0, 5.0, 0.0, float("nan"), float("inf"), -float("inf")])
    assert to_uint8_images(special).tolist() == [0, 255, 128, 128, 255, 0]
    assert to_uint8_images(torch.zeros(2, 3, 4, 5)).shape == (2, 3, 4, 5)
    with pytest.raises(ValueError, match="uint8"):
        from_uint8_images(torch.zeros(3))
    with pytest.raises(ValueError, match="floating-point"):
        to_uint8_images(levels)


def test_make_grid_places_images_row_by_row():
    batch = torch.stack([torch.full((1, 3, 4), float(i) / 10) for i in range(5)])
    grid = make_grid(batch, nrow=2, padding=1, pad_value=-1.0)
    assert grid.shape == (1, 3 * (3 + 1) + 1, 2 * (4 + 1) + 1)  # 3 rows of 2
    assert grid[0, 1, 1] == 0.0 and grid[0, 1, 6] == pytest.approx(0.1)
    assert grid[0, 5, 1] == pytest.approx(0.2) and grid[0, 9, 1] == pytest.approx(0.4)
    assert grid[0, 9, 6] == -1.0 and grid[0, 0, 0] == -1.0  # padding and the empty slot
    assert make_grid(batch[:2], nrow=8, padding=0).shape == (1, 3, 8)  # at most B wide


@pytest.mark.parametrize(("channels", "mode"), [(1, "L"), (3, "RGB")])
def test_save_grid_writes_a_png_of_the_expected_size(tmp_path, channels, mode):
    batch = torch.rand(10, channels, 8, 6) * 2 - 1
    path = save_grid(batch, tmp_path / "sub" / "grid.png", nrow=4, padding=2)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == mode
        assert image.size == (4 * (6 + 2) + 2, 3 * (8 + 2) + 2)  # (width, height)
        first = torch.from_numpy(np.array(image.crop((2, 2, 8, 10))))  # (8, 6[, 3])
    assert torch.equal(first, to_uint8_images(batch[0]).permute(1, 2, 0).squeeze(-1))


@pytest.mark.parametrize(
    ("shape", "kwargs", "message"),
    [
        ((2, 2, 4, 4), {}, "C in"),
        ((2, 3, 4, 4), {"nrow": 0}, "nrow must be"),
        ((2, 3, 4, 4), {"padding": -1}, "padding must be"),
    ],
)
def test_save_grid_rejects_bad_input(tmp_path, shape, kwargs, message):
    with pytest.raises(ValueError, match=message):
        save_grid(torch.zeros(shape), tmp_path / "g.png", **kwargs)
