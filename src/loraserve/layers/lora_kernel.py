"""The fused batched-LoRA op for the CPU: one compiled call per projection adds every segment's delta.

Adapters live in a layer's arena: `a` `[capacity, in]` and `b` `[capacity, out]` (B transposed, scale folded in);
adapter s holds rows `[offset_s, offset_s + rank_s)` of both. For every token t of segment s,

    y[t] += (x[t] @ a[offset_s : offset_s + rank_s].T) @ b[offset_s : offset_s + rank_s]

accumulated in fp32 and rounded into `y` once. A row reads only its own adapter's arena rows, so an `inf` or `nan`
elsewhere in the arena never reaches it.

The op (`csrc/lora_cpu.cpp`) is compiled on first use with `torch.utils.cpp_extension.load` into
`$LORASERVE_CACHE/torch_extensions` (never at install time), with the AVX-512 / AVX512_BF16 flags this CPU has. It
needs a C++ compiler and `ninja` (the system one, or the `ninja` PyPI package). Where either is missing, the build
fails, or the tensors are not on the CPU, `add_lora_` runs `reference_add_lora_`, a per-segment loop in torch, and
`fused_lora_available` says False. `LORASERVE_FUSED_LORA=0` turns the compiled op off.

The op parallelises over (segment, rank block) then (segment, column block) tasks with OpenMP, on
`torch.get_num_threads()` threads; tiny calls run on the calling thread. It is registered with the dispatcher as
`torch.ops.loraserve.add_lora_`, so profiles show it and it runs without the GIL.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("csrc") / "lora_cpu.cpp"
_DTYPES = (torch.bfloat16, torch.float32)

# None: not tried yet; False: unavailable (reason in _why_not); else the compiled module
_module = None
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


def _cache_root() -> Path:
    # the rule of loraserve.config.default_cache_dir, without importing config into the layers
    root = os.environ.get("LORASERVE_CACHE") or str(Path.home() / ".cache" / "loraserve")
    return Path(root) / "torch_extensions"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _isa_cflags() -> list[str]:
    """Compiler flags for the vector units this CPU has (and torch is allowed to use)."""
    capability = torch.backends.cpu.get_cpu_capability()  # honours ATEN_CPU_CAPABILITY
    flags = _cpu_flags()
    if not flags:  # no /proc/cpuinfo: trust torch's own dispatch
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma"] if capability.startswith("AVX512") else []
    if capability.startswith("AVX512") and {"avx512f", "avx512bw", "avx512vl", "fma"} <= flags:
        out = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"]
        if "avx512_bf16" in flags:
            out.append("-mavx512bf16")
        return out
    return []


def _build():
    """Compile (or load the cached build of) the op; raises where it cannot be built."""
    if sys.platform != "linux" and sys.platform != "darwin":
        raise RuntimeError(f"no build recipe for {sys.platform}")
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        try:  # the `ninja` PyPI package, whose binary is not on PATH unless the venv is activated
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
        if not cpp_extension.is_ninja_available():
            raise RuntimeError("ninja is not installed (system ninja, or `pip install ninja`)")
    isa = _isa_cflags()
    cflags = ["-O3", "-DNDEBUG", "-fopenmp", *isa]
    tag = hashlib.sha1(" ".join(cflags).encode()).hexdigest()[:8]
    name = f"loraserve_lora_cpu_{tag}"
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    build_dir = _cache_root() / f"torch{torch.__version__.replace('+', '_')}_{py}" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(name=name, sources=[str(_SOURCE)], extra_cflags=cflags, extra_ldflags=["-fopenmp"],
                              build_directory=str(build_dir), verbose=False)


def _load():
    global _module, _op, _why_not
    with _lock:
        if _op is not None:
            return _op
        if os.environ.get("LORASERVE_FUSED_LORA", "1").strip().lower() in ("0", "false", "no", "off"):
            _why_not = "turned off by LORASERVE_FUSED_LORA"
            _op = False
            return _op
        try:
            _module = _build()
        except Exception as e:  # no compiler, no ninja, a failed build: the torch loop serves instead
            _module = None
            _why_not = f"{type(e).__name__}: {e}".strip()
            logger.warning("fused LoRA CPU op unavailable, using the torch loop: %s", _why_not.splitlines()[0])
        _op = torch.ops.loraserve.add_lora_ if _module is not None else False
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
    return _module.isa() if op is not False and _module is not None else f"unavailable: {_why_not}"


def add_lora_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor,
              seg_starts: torch.Tensor, seg_offsets: torch.Tensor, seg_ranks: torch.Tensor) -> torch.Tensor:
    """`y[rows[seg_starts[s]:seg_starts[s+1]]] += (x[..] @ a[o:o+r].T) @ b[o:o+r]` with `o, r = seg_offsets[s],
    seg_ranks[s]` for every segment s (rank 0: skipped), in place; returns `y`.

    `y` `[T, out]` and `x` `[T, in]` (rows contiguous), `a` `[cap, in]` and `b` `[cap, out]` contiguous, all one dtype
    (bf16 or fp32 for the compiled op); `rows`, `seg_starts` `[S+1]`, `seg_offsets` `[S]`, `seg_ranks` `[S]` int64 on
    the CPU. Each token appears at most once in `rows`.
    """
    op = _op if _op is not None else _load()
    if op is not False and y.device.type == "cpu" and x.dtype in _DTYPES:
        return op(y, x, a, b, rows, seg_starts, seg_offsets, seg_ranks)
    return reference_add_lora_(y, x, a, b, rows, seg_starts, seg_offsets, seg_ranks)
