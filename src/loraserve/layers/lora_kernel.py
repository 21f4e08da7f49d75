"""The fused batched-LoRA op for the CPU: one compiled call per projection adds every segment's delta.

Adapters live in a layer's arena: `a` `[capacity, in]` and `b` `[capacity, out]` (B transposed, scale folded in);
adapter s holds rows `[offset_s, offset_s + rank_s)` of both. For every token t of segment s,

    y[t] += (x[t] @ a[offset_s : offset_s + rank_s].T) @ b[offset_s : offset_s + rank_s]

accumulated in fp32 and rounded into `y` once. A row reads only its own adapter's arena rows, so an `inf` or `nan`
elsewhere in the arena never reaches it.

The op (`kernels/csrc/lora_cpu.cpp`) is part of loraserve's compiled CPU extension (`loraserve.kernels`). Where
that cannot be built or the tensors are not on the CPU, `add_lora_` runs `reference_add_lora_`, a per-segment loop in
torch, and `fused_lora_available` says False. `LORASERVE_FUSED_LORA=0` turns the compiled op off.

The op parallelises over (segment, rank block) then (segment, column block) tasks with OpenMP, on
`torch.get_num_threads()` threads; tiny calls run on the calling thread. It is registered with the dispatcher as
`torch.ops.loraserve.add_lora_`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import torch

from loraserve import kernels

# None: not tried yet; False: unavailable (reason in _why_not); else the op
_op: Callable | None | bool = None
_why_not: str | None = None
_lock = threading.Lock()


def reference_add_lora_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor,
                        seg_starts: torch.Tensor, seg_offsets: torch.Tensor, seg_ranks: torch.Tensor) -> torch.Tensor:
    """The definition, one segment at a time in fp32 (any device): the test oracle and the fallback."""
    starts, offsets, ranks = seg_starts.tolist(), seg_offsets.tolist(), seg_ranks.tolist()
    for s, (offset, rank) in enumerate(zip(offsets, ranks)):
        lo, hi = starts[s], starts[s + 1]
        if rank == 0 or hi == lo:
            continue
        idx = rows[lo:hi]
        delta = (x[idx].float() @ a[offset : offset + rank].float().T) @ b[offset : offset + rank].float()
        y[idx] = (y[idx].float() + delta).to(y.dtype)
    return y


def _load():
    global _op, _why_not
    with _lock:
        if _op is not None:
            return _op
        if os.environ.get("LORASERVE_FUSED_LORA", "1").strip().lower() in ("0", "false", "no", "off"):
            _why_not = "turned off by LORASERVE_FUSED_LORA"
            _op = False
        elif kernels.extension() is None:
            _why_not = kernels.why_unavailable()
            _op = False
        else:
            _op = torch.ops.loraserve.add_lora_
        return _op


def fused_lora_available(device: torch.device | str = "cpu") -> bool:
    """True where `add_lora_` runs the compiled op for tensors on `device` (the CPU, once the op has loaded)."""
    if torch.device(device).type != "cpu":
        return False
    op = _op if _op is not None else _load()
    return op is not False


def fused_lora_info() -> str:
    """Which kernels the compiled op holds (`avx512_bf16`, `avx512`, `scalar`), or why it is unavailable."""
    op = _op if _op is not None else _load()
    module = kernels.extension()
    return module.lora_isa() if op is not False and module is not None else f"unavailable: {_why_not}"


def add_lora_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor,
              seg_starts: torch.Tensor, seg_offsets: torch.Tensor, seg_ranks: torch.Tensor) -> torch.Tensor:
    """`y[rows[seg_starts[s]:seg_starts[s+1]]] += (x[..] @ a[o:o+r].T) @ b[o:o+r]` with `o, r = seg_offsets[s],
    seg_ranks[s]` for every segment s (rank 0: skipped), in place; returns `y`.

    `y` `[T, out]` and `x` `[T, in]` (rows contiguous), `a` `[cap, in]` and `b` `[cap, out]` contiguous, all one dtype
    (bf16 or fp32 for the compiled op); `rows`, `seg_starts` `[S+1]`, `seg_offsets` `[S]`, `seg_ranks` `[S]` int64 on
    the CPU. Each token appears at most once in `rows`.
    """
    op = _op if _op is not None else _load()
    if op is not False and y.device.type == "cpu" and x.dtype in kernels.OP_DTYPES:
        return op(y, x, a, b, rows, seg_starts, seg_offsets, seg_ranks)
    return reference_add_lora_(y, x, a, b, rows, seg_starts, seg_offsets, seg_ranks)
