"""Runs a `CausalLM` through the paged KV cache the way the runner does, for logits parity tests against transformers.

`PagedHarness` owns a small KV pool with interleaved (non-contiguous) block tables, so a wrong slot or block lookup
shows up as a logits mismatch. The two scenario functions are what every family's parity test checks:
all prompts prefilled in one flat step, and a chunked prefill followed by batched decode steps.
"""

from __future__ import annotations

import torch
from torch import nn

from loraserve.engine.input_batch import SequenceChunk, build_step_inputs
from loraserve.layers.context import forward_context
from loraserve.models.base import CausalLM


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max|ours - ref| / max|ref|: scale-free, so one tolerance fits every family and logit magnitude."""
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def reference_logits(ref: nn.Module, tokens: list[int]) -> torch.Tensor:
    """transformers' logits `[len(tokens), vocab]` (float32) for one whole sequence, without any cache."""
    with torch.inference_mode():
        return ref(torch.tensor([tokens])).logits[0].float()


class PagedHarness:
    """A KV pool and per-sequence block tables around `model`; tracks how many tokens of each sequence are cached."""

    def __init__(
        self,
        model: CausalLM,
        num_sequences: int,
        block_size: int = 4,
        max_tokens_per_sequence: int = 64,
        dtype: torch.dtype = torch.float32,
        device: torch.device = torch.device("cpu"),
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        blocks_per_sequence = -(-max_tokens_per_sequence // block_size)
        num_blocks = num_sequences * blocks_per_sequence
        for layer in model.attention_layers():
            shape = (num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
            k_cache, v_cache = (torch.zeros(shape, dtype=dtype, device=device) for _ in range(2))
            layer.bind_cache(k_cache, v_cache)
        # Interleaved tables: sequence i owns blocks i, i + n, i + 2n, ... so neighbours' blocks alternate in the pool.
        self.block_tables = [
            [i + j * num_sequences for j in range(blocks_per_sequence)] for i in range(num_sequences)
        ]
        self.max_tokens = blocks_per_sequence * block_size
        self.computed = [0] * num_sequences

    def reset(self) -> None:
        """Forget every sequence (stale cache entries are never read: keys past a sequence's length are masked)."""
        self.computed = [0] * len(self.computed)

    def _step(self, chunks: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Run one step; returns the final hidden states, each chunk's last-token index and the active sequences."""
        if len(chunks) != len(self.computed):
            raise ValueError(f"expected {len(self.computed)} chunk lists (one per sequence), got {len(chunks)}")
        active = [i for i, tokens in enumerate(chunks) if tokens]
        for i in active:
            if self.computed[i] + len(chunks[i]) > self.max_tokens:
                raise ValueError(f"sequence {i} would exceed the harness's {self.max_tokens} tokens")
        step = [SequenceChunk(list(chunks[i]), self.computed[i], self.block_tables[i]) for i in active]
        inputs = build_step_inputs(step, self.block_size, self.device)
        with torch.inference_mode(), forward_context(inputs.context):
            hidden = self.model(inputs.input_ids, inputs.positions)
        for i in active:
            self.computed[i] += len(chunks[i])
        return hidden, inputs.last_token_index, active

    def run(self, chunks: list[list[int]]) -> dict[int, torch.Tensor]:
        """One step in which sequence i computes `chunks[i]` (empty: idle) -> {i: its last token's logits `[vocab]`}."""
        hidden, last, active = self._step(chunks)
        with torch.inference_mode():
            logits = self.model.compute_logits(hidden[last])
        return {i: logits[row] for row, i in enumerate(active)}

    def prefill_all_logits(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """All prompts as fresh sequences in one flat step -> each prompt's logits `[len, vocab]` at every position."""
        self.reset()
        hidden, _, _ = self._step(prompts)
        with torch.inference_mode():
            logits = self.model.compute_logits(hidden)
        return list(logits.split([len(p) for p in prompts]))


def batched_prefill_errors(model: CausalLM, ref: nn.Module, prompts: list[list[int]]) -> dict[str, float]:
    """Relative error of every prompt's logits (all positions) when all prompts prefill together in one step."""
    harness = PagedHarness(model, len(prompts))
    ours = harness.prefill_all_logits(prompts)
    return {f"prefill seq {i}": relative_error(logits, reference_logits(ref, prompt))
            for i, (logits, prompt) in enumerate(zip(ours, prompts))}


def chunked_decode_errors(
    model: CausalLM,
    ref: nn.Module,
    prompts: list[list[int]],
    decode_steps: int = 3,
    first_chunks: list[int] | None = None,
) -> dict[str, float]:
    """Each prompt prefilled in two chunks over two steps, then `decode_steps` steps decoding all sequences together.

    `first_chunks` sets each prompt's first chunk (default: half of it); a prompt taken whole in the first step
    decodes in the second, next to the other prompts' second chunks (a mixed step). After every step each sequence's
    last-token logits are compared with transformers run on the whole sequence so far. Decoding appends the
    reference's greedy token, so both models always see the same tokens.
    """
    firsts = first_chunks or [max(1, len(p) // 2) for p in prompts]
    harness = PagedHarness(model, len(prompts))
    sequences = [list(p) for p in prompts]
    errors: dict[str, float] = {}
    for step in range(2 + decode_steps):
        chunks = []
        for i, (prompt, sequence) in enumerate(zip(prompts, sequences)):
            done = harness.computed[i]
            if done < len(prompt):
                chunks.append(prompt[done : firsts[i] if done == 0 else len(prompt)])
            else:  # decode the token appended when the previous step finished this sequence's last chunk
                chunks.append(sequence[-1:])
        for i, logits in harness.run(chunks).items():
            expected = reference_logits(ref, sequences[i][: harness.computed[i]])[-1]
            errors[f"step {step} seq {i}"] = relative_error(logits, expected)
            if harness.computed[i] == len(sequences[i]):
                sequences[i].append(int(expected.argmax()))
    return errors
