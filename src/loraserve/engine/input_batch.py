"""Packs one step's sequence chunks into flat tensors and the attention metadata the layers read."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraserve.layers.context import AttentionGroup, ForwardContext


@dataclass
class SequenceChunk:
    """One sequence's share of a step: new tokens to compute on top of what its cache already holds."""

    token_ids: list[int]  # the tokens computed this step
    start_position: int  # tokens of this sequence already in the KV cache
    block_table: list[int]  # KV blocks of the sequence, covering at least start_position + len(token_ids)


@dataclass
class StepInputs:
    """Flat model inputs for one step."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    context: ForwardContext
    last_token_index: torch.Tensor  # [num_chunks] int64: flat index of each chunk's last token


def build_step_inputs(chunks: list[SequenceChunk], block_size: int, device: torch.device) -> StepInputs:
    """Flatten `chunks` (in order) and group them for attention: all decodes together, each prefill alone."""
    if not chunks:
        raise ValueError("a step needs at least one sequence chunk")
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    offsets: list[int] = []
    for chunk in chunks:
        offsets.append(len(input_ids))
        input_ids.extend(chunk.token_ids)
        for position in range(chunk.start_position, chunk.start_position + len(chunk.token_ids)):
            positions.append(position)
            slots.append(chunk.block_table[position // block_size] * block_size + position % block_size)
    decodes = [i for i, chunk in enumerate(chunks) if len(chunk.token_ids) == 1]
    prefills = [[i] for i, chunk in enumerate(chunks) if len(chunk.token_ids) > 1]
    members = ([decodes] if decodes else []) + prefills
    groups = [_attention_group([chunks[i] for i in m], [offsets[i] for i in m], block_size, device) for m in members]
    last = [offset + len(chunk.token_ids) - 1 for offset, chunk in zip(offsets, chunks)]
    context = ForwardContext(slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device), attention_groups=groups)
    return StepInputs(
        input_ids=torch.tensor(input_ids, dtype=torch.int64, device=device),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        context=context,
        last_token_index=torch.tensor(last, dtype=torch.int64, device=device),
    )


def _attention_group(
    chunks: list[SequenceChunk], offsets: list[int], block_size: int, device: torch.device
) -> AttentionGroup:
    query_lens = torch.tensor([len(c.token_ids) for c in chunks], dtype=torch.int64)
    starts = torch.tensor([c.start_position for c in chunks], dtype=torch.int64)
    kv_lens = starts + query_lens
    max_q, max_kv = int(query_lens.max()), int(kv_lens.max())
    max_blocks = (max_kv + block_size - 1) // block_size
    tables = torch.zeros(len(chunks), max_blocks, dtype=torch.int64)
    for row, chunk in enumerate(chunks):
        needed = chunk.block_table[:max_blocks]
        tables[row, : len(needed)] = torch.tensor(needed, dtype=torch.int64)
    q_offsets = torch.arange(max_q)
    query_valid = q_offsets[None, :] < query_lens[:, None]
    query_index = torch.where(query_valid, torch.tensor(offsets)[:, None] + q_offsets[None, :], 0)
    key_positions = torch.arange(max_kv)
    kv_slots = tables[:, key_positions // block_size] * block_size + key_positions % block_size
    kv_slots = torch.where(key_positions[None, :] < kv_lens[:, None], kv_slots, 0)
    return AttentionGroup(
        query_index=query_index.to(device),
        query_valid=query_valid.to(device),
        kv_slots=kv_slots.to(device),
        query_positions=(starts[:, None] + q_offsets[None, :]).to(device),
        kv_lens=kv_lens.to(device),
    )
