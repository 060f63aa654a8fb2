"""Reading safetensors files someone handed over: the header is checked before any tensor is.

A safetensors file is an 8-byte little-endian header length, that many bytes of JSON (name ->
dtype, shape, data_offsets) and the tensor bytes. `read_header` reads and checks only the
header (what a model folder's shapes are, without loading them); `load_tensors` loads a file
whose header checks out. Every failure is a ValueError naming the file: a pickle or a zip
archive under a .safetensors name, an empty, truncated or damaged file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# bytes per element of each safetensors dtype
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


class TensorFileError(ValueError):
    """A file that is not a complete, readable safetensors file; the message names it."""


def _fail(path: Path, problem: str) -> TensorFileError:
    return TensorFileError(f"{path} {problem}")


def _not_safetensors(path: Path, prefix: bytes, problem: str) -> TensorFileError:
    """The error for a file whose header cannot be read: what it seems to be instead, from its
    first bytes (pickles are often given a .safetensors name), else `problem`."""
    if prefix.startswith(b"PK\x03\x04"):
        return _fail(
            path,
            "is a zip archive (what torch.save writes: a pickle), not a safetensors "
            "file; difflab never unpickles a file it is given",
        )
    if len(prefix) > 1 and prefix[0] == 0x80 and 2 <= prefix[1] <= 5:
        return _fail(path, "is a pickle, not a safetensors file; difflab never unpickles a file it is given")
    return _fail(path, problem)


def read_header(path: str | Path) -> dict[str, dict]:
    """name -> {"dtype", "shape", "data_offsets"} of a safetensors file, checked against the file's
    size: the header parses, every tensor's bytes match its dtype and shape, and the tensors fill
    the rest of the file exactly. Reads only the header."""
    path = Path(path)
    if not path.is_file():
        raise TensorFileError(f"{path} is missing or not a regular file")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if size < 8:
            raise _not_safetensors(path, prefix, f"is empty or truncated: {size} bytes, less than a header")
        length = int.from_bytes(prefix, "little")
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise _not_safetensors(
                path,
                prefix,
                f"is not a safetensors file or is truncated: its first 8 bytes "
                f"announce a {length}-byte header and the file has {size} bytes",
            )
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise _not_safetensors(path, prefix, f"has a damaged safetensors header ({error})") from None
    if not isinstance(header, dict):
        raise _fail(path, "has a damaged safetensors header (not a JSON object)")
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    end = max((_check_entry(path, name, entry) for name, entry in tensors.items()), default=0)
    if 8 + length + end != size:
        state = "truncated" if 8 + length + end > size else "longer than its header says"
        raise _fail(path, f"is {state}: its header describes {8 + length + end} bytes, the file has {size}")
    return tensors


def _check_entry(path: Path, name: str, entry) -> int:
    """The end offset of one header entry, after checking that it is consistent."""
    ok = isinstance(entry, dict) and entry.get("dtype") in DTYPE_SIZES
    shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if ok else (None, None)
    ok = ok and isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
    ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
    if ok:
        numel = 1
        for d in shape:
            numel *= d
        ok = 0 <= offsets[0] <= offsets[1] and offsets[1] - offsets[0] == numel * DTYPE_SIZES[entry["dtype"]]
    if not ok:
        raise _fail(path, f"has a damaged header entry for tensor {name!r}: {entry!r}")
    return offsets[1]


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in a safetensors file, from its checked header."""
    return {name: tuple(entry["shape"]) for name, entry in read_header(path).items()}


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (on the CPU), once its header has been checked."""
    from safetensors.torch import load_file

    read_header(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # safetensors' own error types: reported as what they are, with the file
        raise _fail(Path(path), f"cannot be read ({type(error).__name__}: {error})") from None
