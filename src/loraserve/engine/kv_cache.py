"""Sizes the paged KV pool from a memory budget and gives every attention layer its slice."""

from __future__ import annotations

import math
import mmap

import torch

from loraserve.layers.attention import Attention


def kv_bytes_per_token(layers: list[Attention], dtype: torch.dtype) -> int:
    """Bytes of K and V one token occupies across all layers."""
    element = dtype.itemsize
    return sum(2 * layer.num_kv_heads * layer.head_dim * element for layer in layers)


def num_blocks_for_budget(layers: list[Attention], dtype: torch.dtype, block_size: int, budget_bytes: int) -> int:
    return budget_bytes // (kv_bytes_per_token(layers, dtype) * block_size)


def allocate_kv_cache(
    layers: list[Attention], num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> None:
    """Allocate `[num_blocks, block_size, kv_heads, head_dim]` K and V tensors per layer and bind them."""
    for layer in layers:
        shape = (num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
        layer.bind_cache(_zeroed(shape, dtype, device), _zeroed(shape, dtype, device))


def _zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor; on the CPU in anonymous memory that the OS zero-fills on first touch, so the pool's pages become
    resident as requests fill them and the process's RSS reflects the KV it holds, not the budget it may use."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    pages = mmap.mmap(-1, max(1, count * dtype.itemsize))
    return torch.frombuffer(pages, dtype=dtype, count=count).view(shape)  # the tensor keeps `pages` alive
