"""loraserve's compiled CPU ops, one extension (`csrc/`) that every layer above shares.

It is compiled on first use with `torch.utils.cpp_extension.load` into `$LORASERVE_CACHE/torch_extensions` (never at
install time, so pip's isolated build never pulls a torch of its own), with the AVX-512 / AVX512_BF16 / AVX512_VNNI
flags this CPU has (AVX2 / FMA without AVX-512), and registers its ops with the dispatcher under `torch.ops.loraserve`
(profiles show them, and they run without the GIL). It needs a C++ compiler and `ninja` (the system one, or the `ninja` PyPI package). Where
either is missing or the build fails, `extension()` returns None once, logged once, and each caller runs its torch
form instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
from pathlib import Path
from collections.abc import Callable
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name("csrc") / name
            for name in ("module.cpp", "lora_cpu.cpp", "int8_cpu.cpp", "norm_cpu.cpp", "gemv_cpu.cpp",
                         "attention_cpu.cpp", "sample_cpu.cpp")]

# None: not tried yet; False: unavailable (reason in _why_not); else the compiled module
_module: ModuleType | bool | None = None
_why_not: str | None = None
_lock = threading.Lock()
_ops: dict[str, Callable | None] = {}

# The element types every compiled op takes (each also checks its own arguments).
OP_DTYPES = (torch.bfloat16, torch.float32)


def _cache_root() -> Path:
    # the rule of loraserve.config.default_cache_dir, without importing config into the kernels
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


def vector_isa() -> str:
    """The vector units the kernels are compiled for here: "avx512", "avx2" or "" (portable scalar loops), from the
    CPU's flags and what torch is allowed to use (ATEN_CPU_CAPABILITY)."""
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _cpu_flags()
    if not flags:  # no /proc/cpuinfo: trust torch's own dispatch
        return "avx512" if capability.startswith("AVX512") else ""
    if capability.startswith("AVX512") and {"avx512f", "avx512bw", "avx512vl", "fma"} <= flags:
        return "avx512"
    if capability.startswith(("AVX2", "AVX512")) and {"avx2", "fma"} <= flags:
        return "avx2"
    return ""


def _isa_cflags() -> list[str]:
    """Compiler flags for the vector units of `vector_isa()`, with the optional AVX-512 extensions this CPU has."""
    isa = vector_isa()
    if isa == "avx512":
        flags = _cpu_flags()
        optional = {"avx512_bf16": "-mavx512bf16", "avx512_vnni": "-mavx512vnni"}
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma",
                *(flag for name, flag in optional.items() if name in flags)]
    return ["-mavx2", "-mfma", "-mf16c"] if isa == "avx2" else []


def _build() -> ModuleType:
    """Compile (or load the cached build of) the extension; raises where it cannot be built."""
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
    cflags = ["-O3", "-DNDEBUG", "-fopenmp", *_isa_cflags()]
    tag = hashlib.sha1(" ".join(cflags).encode()).hexdigest()[:8]
    name = f"loraserve_cpu_{tag}"
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    build_dir = _cache_root() / f"torch{torch.__version__.replace('+', '_')}_{py}" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(name=name, sources=[str(s) for s in _SOURCES], extra_cflags=cflags,
                              extra_ldflags=["-fopenmp"], build_directory=str(build_dir), verbose=False)


def extension() -> ModuleType | None:
    """The compiled extension (its ops then live in `torch.ops.loraserve`), or None where it cannot be built."""
    global _module, _why_not
    if _module is None:
        with _lock:
            if _module is None:
                try:
                    _module = _build()
                except Exception as e:  # no compiler, no ninja, a failed build: the torch forms serve instead
                    _why_not = f"{type(e).__name__}: {e}".strip()
                    logger.warning("compiled CPU ops unavailable, using torch forms: %s", _why_not.splitlines()[0])
                    _module = False
    return _module if isinstance(_module, ModuleType) else None


def compiled_op(name: str) -> Callable | None:
    """`torch.ops.loraserve.<name>` once the extension has loaded, or None where it cannot be built: each caller
    then runs its torch form."""
    op = _ops.get(name)
    if op is None and name not in _ops:
        op = getattr(torch.ops.loraserve, name).default if extension() is not None else None
        _ops[name] = op
    return op


def onednn_uses_amx() -> bool:
    """Whether oneDNN's bf16 GEMMs run on AMX here (the CPU has it and ONEDNN_MAX_CPU_ISA does not rule it out):
    where they do, they win at fewer rows against the compiled kernels."""
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    return "amx_bf16" in _cpu_flags() and (limit == "ALL" or "AMX" in limit)


def why_unavailable() -> str:
    """Why `extension()` returned None (empty once it has loaded)."""
    return "" if extension() is not None else _why_not or "not built"
