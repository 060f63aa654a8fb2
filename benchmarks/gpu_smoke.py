"""GPU smoke test: every shipped model samples on CUDA in fp32 and bf16 and matches the CPU.

    python benchmarks/gpu_smoke.py            # needs a CUDA GPU; writes results/gpu_smoke.json

Same seeds, same sampler settings on both devices. TF32 is switched off for the fp32 run, so
the only differences are the order of floating-point sums in the kernels, which a chain of
steps can amplify: the tolerances are on the mean absolute pixel difference (pixels in
[-1, 1]), with the largest single difference reported beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from difflab.pipelines import Pipeline, shipped_models

RESULTS = Path(__file__).resolve().parent / "results"
TOLERANCE = {"float32": 0.01, "bfloat16": 0.06}  # mean |x_cuda - x_cpu|
PROMPT = "a big red circle at the middle centre"


def draw(pipe: Pipeline, n: int, steps: int) -> tuple[torch.Tensor, float]:
    options = {"prompt": PROMPT} if pipe.conditioning == "text" else {}
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    x = pipe.generate(n, steps=steps, seed=0, **options)
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    return x, time.perf_counter() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--out", type=Path, default=RESULTS / "gpu_smoke.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to compare (run this on a GPU machine)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "machine": platform.machine(),
              "n": args.n, "steps": args.steps, "tolerance_mean_abs": TOLERANCE, "models": {}}  # fmt: skip
    ok = True
    for name in shipped_models():
        reference, cpu_seconds = draw(Pipeline.from_pretrained(name, device="cpu"), args.n, args.steps)
        rows = {"cpu_seconds": cpu_seconds}
        for dtype in TOLERANCE:
            x, seconds = draw(Pipeline.from_pretrained(name, device="cuda", dtype=dtype), args.n, args.steps)
            diff = (x - reference).abs()
            passed = bool(torch.isfinite(x).all()) and diff.mean().item() <= TOLERANCE[dtype]
            rows[dtype] = {"mean_abs": diff.mean().item(), "max_abs": diff.max().item(), "seconds": seconds,
                           "passed": passed}  # fmt: skip
            ok &= passed
            print(f"{name:<14}{dtype:<10} mean |diff| {diff.mean():.2e}  max {diff.max():.2e}  {seconds:.2f} s  "
                  f"{'ok' if passed else 'FAILED'}")  # fmt: skip
        result["models"][name] = rows
    result["passed"] = ok
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
