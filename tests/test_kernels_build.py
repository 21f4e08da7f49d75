"""Where a C++ compiler is present, loraserve's compiled CPU ops must build.

Each kernel test skips where the extension is unavailable (a machine without a compiler runs the torch forms), so a
csrc edit that fails to compile would otherwise show up as skipped tests rather than as a failure.
"""

from __future__ import annotations

import shutil
import sys

import pytest

from loraserve import kernels


@pytest.mark.skipif(shutil.which("c++") is None or sys.platform not in ("linux", "darwin"),
                    reason="no C++ compiler on this machine: the torch forms serve")
def test_compiled_ops_build_where_a_compiler_exists() -> None:
    assert kernels.extension() is not None, kernels.why_unavailable()
