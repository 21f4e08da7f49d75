"""GGUF's 4-bit block formats read straight into int4 group-32 codes, scales and zeros, with no float round trip.

Each format stores, per block of 32 weights, 4-bit codes q and an affine map that fits our w = (q - 8) * scale + zero:

- Q4_0 (fp16 d): w = d * (q - 8), so scale d, zero 0;
- Q4_1 (fp16 d, m): w = d * q + m, so scale d, zero m + 8d;
- Q4_K (super-blocks of 256 = 8 sub-blocks of 32; fp16 d, dmin and 6-bit sc, m per sub-block):
  w = d * sc * q - dmin * m, so scale d * sc, zero 8 * d * sc - dmin * m.

The codes are the file's own; the only change is `Int4Weight.from_codes` rounding scale and zero to bf16 (bound in
its docstring). Block layouts follow gguf's `gguf/quants.py` dequantizers. Q8_0 has no counterpart here: its block-32
scales do not map onto int8's one scale per output channel, so int8 goes through float (dequantize, requantize).
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

from loraserve.quant.int4 import Int4Weight

GROUP = 32  # the block (or Q4_K sub-block) size of every format below
_Q = gguf.GGMLQuantizationType
INT4_TYPES = frozenset({_Q.Q4_0, _Q.Q4_1, _Q.Q4_K})


def ggml_int4_codes(data: np.ndarray, qtype: gguf.GGMLQuantizationType, shape: tuple[int, int]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The raw bytes of a `[N, K]` tensor of `qtype` -> codes `[N, K]` uint8 in 0..15, scales and zeros
    `[N, K/32]` float64 (exact: every product and difference of fp16 values and 6-bit integers fits a float64)."""
    if qtype not in INT4_TYPES:
        raise ValueError(f"{qtype.name} is not a 4-bit block format; supported: {sorted(t.name for t in INT4_TYPES)}")
    n, k = shape
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = np.asarray(data).reshape(-1).view(np.uint8).reshape(-1, type_size)
    if blocks.shape[0] * block != n * k:
        raise ValueError(f"{qtype.name} data holds {blocks.shape[0] * block} weights, not {n} x {k}")
    d = blocks[:, :2].copy().view(np.float16).astype(np.float64)  # [blocks, 1]
    if qtype == _Q.Q4_0:
        codes, scales, zeros = _nibbles(blocks[:, 2:]), d, np.zeros_like(d)
    elif qtype == _Q.Q4_1:
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float64)
        codes, scales, zeros = _nibbles(blocks[:, 4:]), d, m + 8 * d
    else:
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float64)
        sc, m = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:4 + gguf.quants.Q4_K.K_SCALE_SIZE])
        scales = d * sc  # [blocks, 8]
        zeros = 8 * scales - dmin * m
        # 128 bytes of codes per super-block: each 32 bytes hold two sub-blocks, low nibbles first
        codes = _nibbles(blocks[:, 4 + gguf.quants.Q4_K.K_SCALE_SIZE:].reshape(-1, GROUP))
    return codes.reshape(n, k), scales.reshape(n, k // GROUP), zeros.reshape(n, k // GROUP)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """`[rows, b]` bytes -> `[rows, 2b]` codes: the low nibbles hold the first b, the high nibbles the last b."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def int4_from_ggml(data: np.ndarray, qtype: gguf.GGMLQuantizationType, shape: tuple[int, int],
                   device: torch.device) -> Int4Weight:
    """An `Int4Weight` (group 32) holding the file's own codes; see the module docstring."""
    codes, scales, zeros = (torch.from_numpy(np.ascontiguousarray(a)).to(device)
                            for a in ggml_int4_codes(data, qtype, shape))
    return Int4Weight.from_codes(codes, scales, zeros, GROUP)
