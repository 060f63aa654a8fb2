"""A folder of PNG/JPEG images as a data set, optionally with one class per sub-folder.

Why validate up front: a corrupt file found inside a DataLoader worker crashes training hours
in. Every file is therefore decoded once at construction; unreadable ones are either skipped
with a warning that names them (``on_error="skip"``) or raise a ValueError naming them
(``on_error="raise"``), and the index only ever contains files that decoded.

Images are converted to ``channels`` (1: luma, 3: RGB; transparency is composited over white,
16-bit grey is scaled to 8 bits), then scaled (antialiased bicubic) and centre-cropped to
size x size, and mapped to [-1, 1]. Hidden files and folders (names starting with ".") are
ignored and files are taken in sorted path order.
"""

import warnings
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from difflab.data.images import pil_to_tensor

EXTENSIONS = (".png", ".jpg", ".jpeg")
ON_ERROR = ("skip", "raise")
CHANNELS = (1, 3)
MAX_SIZE = 4096  # a sanity limit: one 4096 x 4096 RGB image is 200 MB in float32


def load_image(path: str | Path, size: int, channels: int) -> torch.Tensor:
    """Decode one file to (channels, size, size) float32 in [-1, 1]; PIL errors propagate."""
    with Image.open(path) as image:
        image.load()
        return pil_to_tensor(image, channels, size)


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _image_files(root: Path, extensions: tuple[str, ...]) -> list[Path]:
    files = (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
    return sorted(p for p in files if _visible(p, root))


def find_images(
    root: Path, extensions: tuple[str, ...], class_folders: bool | None
) -> tuple[list[Path], list[int] | None, tuple[str, ...] | None]:
    """(files, labels, class_names) under ``root``; labels/class_names are None without classes.

    ``class_folders=None`` decides automatically: classes iff every image lies inside a
    sub-folder of root. With classes, each direct sub-folder holding images is one class (its
    images found recursively), classes are numbered in sorted name order.
    """
    files = _image_files(root, extensions)
    if not files:
        raise ValueError(f"no images with extensions {extensions} found under {root}")
    loose = [p for p in files if p.parent == root]
    if class_folders is None:
        class_folders = not loose
    if not class_folders:
        return files, None, None
    if loose:
        raise ValueError(
            f"class_folders=True but {loose[0]} lies directly in {root}, outside any class "
            "sub-folder; move it or pass class_folders=False"
        )
    class_names = tuple(sorted({p.relative_to(root).parts[0] for p in files}))
    labels = [class_names.index(p.relative_to(root).parts[0]) for p in files]
    return files, labels, class_names


class ImageFolderDataset(Dataset):
    """Images under ``root``; items ``{"x": (C, size, size) in [-1, 1]}`` plus ``"y"`` (int64)
    when classes come from sub-folders (then ``num_classes`` and ``class_names`` are set)."""

    def __init__(
        self,
        root: str | Path,
        size: int = 64,
        channels: int = 3,
        on_error: str = "skip",
        class_folders: bool | None = None,
        extensions: tuple[str, ...] = EXTENSIONS,
    ):
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"image folder root {str(root)!r} is not a directory")
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_SIZE:
            raise ValueError(f"size must be a positive int at most {MAX_SIZE}, got {size!r}")
        if channels not in CHANNELS:
            raise ValueError(f"channels must be one of {CHANNELS}, got {channels!r}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if class_folders not in (None, True, False):
            raise ValueError(f"class_folders must be None, True or False, got {class_folders!r}")
        if isinstance(extensions, str) or not all(isinstance(e, str) and e for e in extensions):
            raise ValueError(f"extensions must be a list of suffixes ('.png'), got {extensions!r}")
        extensions = tuple("." + e.lower().lstrip(".") for e in extensions)
        self.root = root
        self.size = size
        self.channels = channels
        self.image_shape = (channels, size, size)
        files, labels, self.class_names = find_images(root, extensions, class_folders)
        self.num_classes = None if self.class_names is None else len(self.class_names)
        self.files: list[Path] = []
        self.labels: list[int] | None = None if labels is None else []
        self.skipped: list[Path] = []
        for k, path in enumerate(files):
            try:
                load_image(path, size, channels)
            except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ...
                if on_error == "raise":
                    raise ValueError(f"cannot read image {path}: {error}") from error
                warnings.warn(f"skipping unreadable image {path}: {error}", stacklevel=2)
                self.skipped.append(path)
                continue
            self.files.append(path)
            if self.labels is not None:
                self.labels.append(labels[k])
        if not self.files:
            raise ValueError(f"none of the {len(files)} images under {root} could be read")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        path = self.files[i]
        try:
            x = load_image(path, self.size, self.channels)
        except Exception as error:  # the file changed on disk after validation
            raise ValueError(f"cannot read image {path}: {error}") from error
        item = {"x": x}
        if self.labels is not None:
            item["y"] = torch.tensor(self.labels[i], dtype=torch.int64)
        return item
