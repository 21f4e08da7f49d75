"""benchmarks/RESULTS.md holds one section per benchmark; a run replaces its own section and leaves the others."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "RESULTS.md"


def cpu_name() -> str:
    """The CPU model with the vector extensions our kernels use: what keeps one CPU's section apart from another's."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in lscpu.splitlines() if line.startswith("Flags")), [])
    extensions = [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f in flags]
    if not extensions and "avx2" in flags:
        extensions = ["avx2, no avx512"]
    return f"{model} ({', '.join(extensions)})"


def machine() -> str:
    """`cpu_name()`, cores, memory and versions, for the header of every section."""
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu_name()}, {os.cpu_count()} cores, {memory_gib:.0f} GiB, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def replace_section(heading: str, lines: list[str]) -> None:
    """Drop this CPU's section whose title starts with `heading` (up to the next `## `) and append `lines` in its
    place. Each CPU keeps its own: a section whose `- Machine:` line names another CPU stays."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    start = text.find(heading)
    while start >= 0:
        end = text.find("\n## ", start + 1)
        body = text[start:end] if end >= 0 else text[start:]
        if "- Machine: " not in body or f"- Machine: {cpu_name()}," in body:
            text = text[:start].rstrip() + ("\n\n" + text[end + 1 :] if end >= 0 else "")
            break
        start = text.find(heading, start + 1)
    RESULTS.write_text(text.rstrip() + "\n\n" + "\n".join(lines).rstrip() + "\n")
