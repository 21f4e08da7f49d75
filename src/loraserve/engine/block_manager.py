"""The paged KV pool's bookkeeping: which blocks are free, which request holds which."""

from __future__ import annotations

from collections import deque

from loraserve.engine.request import Request


class BlockManager:
    """Hands out fixed-size KV blocks; a request's blocks cover its computed tokens plus the ones being computed."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        total = self.blocks_for(request.num_computed_tokens + num_new_tokens)
        return max(0, total - len(request.block_ids))

    def try_allocate(self, request: Request, num_new_tokens: int) -> bool:
        """Grow `request`'s table to hold `num_new_tokens` more tokens; False (and no change) if the pool is short."""
        needed = self.extra_blocks_needed(request, num_new_tokens)
        if needed > len(self._free):
            return False
        request.block_ids.extend(self._free.popleft() for _ in range(needed))
        return True

    def free(self, request: Request) -> None:
        self._free.extend(request.block_ids)
        request.block_ids = []
