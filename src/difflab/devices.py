"""Devices and dtypes by name, as users type them: "auto" is the GPU where there is one."""

from __future__ import annotations

import warnings

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' (or None) -> CUDA if available, else the CPU; other names are checked to exist."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but no CUDA GPU is available; use auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from a name (float32/fp32, bfloat16/bf16, float16/fp16); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not allowed; allowed: {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def cpu_lacks_fast(dtype: torch.dtype) -> bool:
    """True when this CPU has no native instructions for `dtype` (bf16: AVX512-BF16 or AMX;
    fp16: AVX512-FP16 or AMX): oneDNN then declines and convolutions take PyTorch's reference
    path, measured ~60x slower than fp32 on an AVX2-only CPU, so low precision costs, not saves."""
    checks = {
        torch.bfloat16: "_is_mkldnn_bf16_supported",
        torch.float16: "_is_mkldnn_fp16_supported",
    }
    check = getattr(torch.ops.mkldnn, checks[dtype], None) if dtype in checks else None
    return check is not None and not check()


def slow_dtype_reason(device: torch.device, dtype: torch.dtype | None, what: str) -> str | None:
    """Why `what` in `dtype` on `device` would be slow, or None when it would not."""
    if device.type != "cpu" or dtype is None or not cpu_lacks_fast(dtype):
        return None
    name = str(dtype).removeprefix("torch.")
    return f"this CPU has no native {name} instructions: {what} in {name} would run ~60x slower than in float32"


def warn_if_slow(device: str | torch.device, dtype: torch.dtype | None, what: str = "sampling") -> None:
    """The user asked for `dtype` explicitly: keep it, but say what it costs on this CPU."""
    slow = slow_dtype_reason(torch.device(device), dtype, what)
    if slow:
        warnings.warn(f"{slow}; pass dtype float32 on this machine", stacklevel=3)
