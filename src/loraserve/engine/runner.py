"""Runs one scheduled step: pack the chunks, run the model in a forward context, sample the finished chunks."""

from __future__ import annotations

import torch

from loraserve.engine.contracts import RunnerOutput, SampledToken, ScheduledChunk, SchedulerOutput
from loraserve.engine.input_batch import SequenceChunk, build_step_inputs
from loraserve.layers.context import ForwardContext, forward_context
from loraserve.layers.lora_ops import LoRABatch
from loraserve.models.base import CausalLM
from loraserve.sampling.grammar import fill_bitmask
from loraserve.sampling.sampler import Sampler, SamplingRow, prompt_logprobs


class ModelRunner:
    """Owns the model on its device; turns `SchedulerOutput` into sampled tokens."""

    def __init__(self, model: CausalLM, block_size: int, device: torch.device, seed: int = 0) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler(seed)
        # The sampled rows' fp32 logits, reused across steps: a fresh `[rows, vocab]` tensor every step is a fresh
        # mmap past glibc's threshold, and the page faults of touching it cost more than the copy into it.
        self._logits_buffer: torch.Tensor | None = None

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> RunnerOutput:
        chunks = [self._sequence_chunk(chunk) for chunk in step.chunks]
        inputs = build_step_inputs(chunks, self.block_size, self.device)
        slots = [c.request.adapter_slot for c in step.chunks for _ in range(c.num_tokens)]
        inputs.context.lora = LoRABatch.build(slots, self.device)
        with forward_context(inputs.context):
            hidden = self.model(inputs.input_ids, inputs.positions)
        output = RunnerOutput()
        sampling = [i for i, chunk in enumerate(step.chunks) if chunk.completes_sequence]
        if sampling:
            row_slots = [step.chunks[i].request.adapter_slot for i in sampling]
            logits = self._logits(hidden[inputs.last_token_index[sampling]], row_slots,
                                  self._sampling_buffer(len(sampling)))
            rows = [self._sampling_row(step.chunks[i]) for i in sampling]
            allowed = fill_bitmask([step.chunks[i].request.grammar for i in sampling])
            result = self.sampler.sample(logits, rows, allowed)
            for row, i in enumerate(sampling):
                output.sampled[step.chunks[i].request.request_id] = SampledToken(
                    result.token_ids[row], result.logprobs[row], result.top_logprobs[row]
                )
        offsets = (inputs.last_token_index - torch.tensor([c.num_tokens for c in step.chunks]) + 1).tolist()
        for chunk, offset in zip(step.chunks, offsets):
            entries = self._prompt_logprobs(chunk, hidden, offset)
            if entries is not None:
                output.prompt_logprobs[chunk.request.request_id] = entries
        return output

    def _logits(self, hidden: torch.Tensor, row_slots: list[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of `hidden`'s rows in a context of their own: an lm_head LoRA reads the adapter slot of each row it
        projects (one per sampled sequence), not of each token of the step."""
        lora = LoRABatch.build(row_slots, self.device)
        context = ForwardContext(slot_mapping=torch.empty(0, dtype=torch.int64), attention_groups=[], lora=lora)
        with forward_context(context):
            return self.model.compute_logits(hidden, out)

    def _sampling_buffer(self, rows: int) -> torch.Tensor:
        """`[rows, vocab]` fp32 for this step's sampled logits, grown to the most rows a step has sampled. Steps run
        one at a time and nothing keeps a step's logits, so one buffer serves them all."""
        if self._logits_buffer is None or self._logits_buffer.shape[0] < rows:
            vocab = self.model.config.vocab_size
            self._logits_buffer = torch.empty(rows, vocab, dtype=torch.float32, device=self.device)
        return self._logits_buffer[:rows]

    @staticmethod
    def _sequence_chunk(chunk: ScheduledChunk) -> SequenceChunk:
        request = chunk.request
        start = request.num_computed_tokens
        return SequenceChunk(
            token_ids=request.token_ids_between(start, start + chunk.num_tokens),
            start_position=start,
            block_table=request.block_ids,
        )

    @staticmethod
    def _sampling_row(chunk: ScheduledChunk) -> SamplingRow:
        request = chunk.request
        return SamplingRow(request.params, request.prompt_token_ids, request.output_token_ids)

    def _prompt_logprobs(self, chunk: ScheduledChunk, hidden: torch.Tensor, offset: int) -> list | None:
        """Logprobs of the prompt tokens this chunk predicts (position p predicts token p + 1), when asked for.

        Only the first computation of a prompt reports them: a recompute after preemption repeats none.
        """
        request = chunk.request
        top_n = request.params.prompt_logprobs
        start = request.num_computed_tokens
        prompt_len = len(request.prompt_token_ids)
        if top_n is None or request.num_preemptions or start >= prompt_len - 1:
            return None
        stop = min(start + chunk.num_tokens, prompt_len - 1)  # the last prompt position predicts an output token
        logits = self._logits(hidden[offset : offset + stop - start], [request.adapter_slot] * (stop - start))
        return prompt_logprobs(logits, request.prompt_token_ids[start + 1 : stop + 1], top_n)
