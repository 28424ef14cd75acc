"""How far a sweep runs from the CPU's own peak: count the matrix-multiply FLOPs it executes, and
time a bare float32 GEMM of exactly the same shapes in the same process.

Used by ``benchmarks/patching.py`` and ``benchmarks/causal_tracing.py``::

    meter = FlopMeter()
    with meter.count():          # one run under a dispatch mode that records every GEMM (slower)
        sweep()
    seconds = timed(sweep)       # the timed run, with no mode active
    print(meter.line(seconds))   # flops <achieved GFLOP/s> peak <GEMM GFLOP/s> (<percent>% of peak)

*Achieved* is the counted GEMM FLOPs (``mm``, ``addmm``, ``bmm``, ``baddbmm``; 2·m·n·k each)
over the timed run's wall time. *Peak* is the same FLOPs over the time the same GEMMs take alone
(each distinct shape timed ``repeats`` times after a warm-up, best time kept; shapes covering the
last 2% of FLOPs are charged at the measured shapes' average rate). Everything that is not a GEMM
(softmax, norms, indexing, Python) counts as time, not FLOPs: that is the point.

Run alone (``python benchmarks/flopmeter.py``), it prints the machine's float32 GEMM rate at a few
square sizes, the torch thread count and CPU capability, and bfloat16 against float32 on shapes of
SmolLM2's and Gemma 3's forward (a bfloat16 path pays only on CPUs with AMX or AVX512-BF16).
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# Under inference mode ``matmul`` reaches the dispatcher whole; outside it, as ``mm``/``bmm``.
_GEMMS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.matmul.default}


def _gemm_shape(func, args) -> tuple[int, int, int, int, torch.dtype]:
    """``(batch, m, k, n, dtype)`` of one GEMM call (a 2-D right operand folds the batch into m)."""
    if func in (aten.addmm.default, aten.baddbmm.default):
        a, b = args[1], args[2]
    else:
        a, b = args[0], args[1]
    a_shape = tuple(a.shape) if a.ndim > 1 else (1, a.shape[0])
    b_shape = tuple(b.shape) if b.ndim > 1 else (b.shape[0], 1)
    m, k, n = a_shape[-2], a_shape[-1], b_shape[-1]
    if len(b_shape) == 2:
        m = m * int(torch.Size(a_shape[:-2]).numel())
        return 1, m, k, n, a.dtype
    batch = torch.broadcast_shapes(a_shape[:-2], b_shape[:-2]).numel()
    return int(batch), m, k, n, a.dtype


class _Recorder(TorchDispatchMode):
    def __init__(self, shapes: Counter) -> None:
        super().__init__()
        self.shapes = shapes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _GEMMS:
            self.shapes[_gemm_shape(func, args)] += 1
        return func(*args, **(kwargs or {}))


def gemm_seconds(batch: int, m: int, k: int, n: int, dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """Best wall time of one ``[batch, m, k] @ [batch, k, n]`` GEMM (``mm`` when ``batch == 1``)."""
    a = torch.randn(batch, m, k).to(dtype)
    b = torch.randn(batch, k, n).to(dtype)
    if batch == 1:
        a, b = a[0], b[0]
        op = torch.mm
    else:
        op = torch.bmm
    with torch.inference_mode():
        op(a, b)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            op(a, b)
            best = min(best, time.perf_counter() - t)
    return best


class FlopMeter:
    """Counts the GEMM FLOPs of the code run under :meth:`count`; see the module docstring."""

    def __init__(self) -> None:
        self.shapes: Counter = Counter()

    @contextmanager
    def count(self) -> Iterator["FlopMeter"]:
        with _Recorder(self.shapes):
            yield self

    @property
    def flops(self) -> float:
        return float(sum(2 * b * m * k * n * c for (b, m, k, n, _), c in self.shapes.items()))

    def peak_seconds(self, coverage: float = 0.98) -> float:
        """Seconds the counted GEMMs take alone (shapes beyond ``coverage`` of FLOPs extrapolated)."""
        total = self.flops
        if total == 0:
            raise ValueError("no GEMM was counted: run the sweep under meter.count() first")
        ranked = sorted(self.shapes.items(), key=lambda kv: -2 * kv[0][0] * kv[0][1] * kv[0][2] * kv[0][3] * kv[1])
        done_flops, done_seconds = 0.0, 0.0
        for (b, m, k, n, dtype), calls in ranked:
            if done_flops >= coverage * total:
                break
            done_seconds += gemm_seconds(b, m, k, n, dtype) * calls
            done_flops += 2.0 * b * m * k * n * calls
        return done_seconds * total / done_flops

    def line(self, seconds: float, peak_seconds: Optional[float] = None) -> str:
        """``flops <achieved GFLOP/s> peak <GEMM GFLOP/s> (<percent>% of peak)`` for a run of ``seconds``;
        ``peak_seconds``: :meth:`peak_seconds` where the caller has measured it already."""
        achieved = self.flops / seconds / 1e9
        peak = self.flops / (peak_seconds if peak_seconds is not None else self.peak_seconds()) / 1e9
        return f"flops {achieved:.1f} peak {peak:.1f} ({100 * achieved / peak:.0f}% of peak)"

    def summary(self) -> str:
        calls = sum(self.shapes.values())
        return f"{self.flops / 1e9:.1f} GFLOP in {calls} GEMM calls of {len(self.shapes)} distinct shapes"


if __name__ == "__main__":
    caps = [line.strip() for line in torch.__config__.show().splitlines() if "CPU capability" in line]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {'; '.join(caps)}")
    for size in (256, 576, 1024, 2048):
        s = gemm_seconds(1, size, size, size)
        print(f"float32 GEMM {size}x{size}x{size}: {2 * size**3 / s / 1e9:.1f} GFLOP/s")
    # bfloat16 against float32 on shapes of SmolLM2's and Gemma 3's forward (rows x d_model x out):
    # whether a bfloat16 path would pay depends on the CPU (AMX, AVX512-BF16, or neither)
    for m, k, n in ((2048, 576, 1536), (512, 576, 49152), (2048, 640, 2048)):
        f32, bf16 = gemm_seconds(1, m, k, n), gemm_seconds(1, m, k, n, torch.bfloat16)
        print(
            f"{m}x{k}x{n}: float32 {2 * m * k * n / f32 / 1e9:.1f} GFLOP/s, bfloat16 "
            f"{2 * m * k * n / bf16 / 1e9:.1f} GFLOP/s ({f32 / bf16:.1f}x)"
        )
