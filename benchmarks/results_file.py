"""benchmarks/RESULTS.md holds one section per benchmark; a run replaces its own section and leaves the others."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "RESULTS.md"


def machine() -> str:
    """The CPU model with the vector extensions our kernels use, cores, memory and versions, for the header of every
    section."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in lscpu.splitlines() if line.startswith("Flags")), [])
    extensions = ", ".join(f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f in flags)
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{model} ({extensions}), {os.cpu_count()} cores, {memory_gib:.0f} GiB, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def replace_section(heading: str, lines: list[str]) -> None:
    """Drop the section whose title starts with `heading` (up to the next `## `) and append `lines` in its place."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    start = text.find(heading)
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start].rstrip() + ("\n\n" + text[end + 1 :] if end >= 0 else "")
    RESULTS.write_text(text.rstrip() + "\n\n" + "\n".join(lines).rstrip() + "\n")
