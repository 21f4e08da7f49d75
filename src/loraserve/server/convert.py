"""Request bodies of the HTTP APIs -> what the engine takes: `SamplingParams` (their ranges validated by the engine),
the adapter and the prompt's tokens, with the server's own limits (`limits`) checked on the way."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from loraserve.adapters.merge import MergeSpec
from loraserve.config import ServerConfig
from loraserve.engine.api import AdapterRef
from loraserve.errors import InvalidRequest
from loraserve.sampling.params import SamplingParams
from loraserve.server.limits import check_merged_adapters, check_stop_sequences
from loraserve.server.lorax.schemas import GenerateParameters
from loraserve.server.response_format import grammar_for


def adapter_from_lorax(parameters: GenerateParameters, token: str | None, default_source: str,
                       config: ServerConfig) -> AdapterRef | None:
    """The request's adapter, with its Hub token (`auth.hub_token`); `default_source` where it names none."""
    source = parameters.adapter_source or default_source
    merge = parameters.merged_adapters
    if merge is not None:
        if parameters.adapter_id:
            raise InvalidRequest("at most one of `adapter_id` or `merged_adapters` may be provided")
        check_merged_adapters(merge.ids, config)
        spec = MergeSpec(tuple(merge.ids), tuple(merge.weights), merge.merge_strategy, merge.density,
                         merge.majority_sign_method)
        spec.validate(max_adapters=config.max_merged_adapters)
        return AdapterRef.merged(spec, source, token)
    if not parameters.adapter_id:
        return None
    return AdapterRef(parameters.adapter_id, source, token)


def sampling_params_from_lorax(parameters: GenerateParameters, reports_tokens: bool,
                               config: ServerConfig) -> SamplingParams:
    """LoRAX semantics: a null field takes LoRAX's default; a null `max_new_tokens` means "up to max_total_tokens".

    `reports_tokens`: the reply lists tokens (a stream, or `details`) or ranks them (`best_of`), so each needs its
    logprob.
    """
    check_stop_sequences(parameters.stop or [], config)
    return SamplingParams(
        max_new_tokens=parameters.max_new_tokens,
        temperature=parameters.temperature,
        top_k=parameters.top_k,
        top_p=parameters.top_p,
        typical_p=parameters.typical_p,
        repetition_penalty=parameters.repetition_penalty,
        frequency_penalty=parameters.frequency_penalty,
        presence_penalty=parameters.presence_penalty,
        do_sample=bool(parameters.do_sample),
        seed=parameters.seed,
        stop=list(parameters.stop or []),
        ignore_eos=bool(parameters.ignore_eos_token),
        chosen_logprob=reports_tokens,
        logprobs=parameters.return_k_alternatives,
        prompt_logprobs=0 if parameters.decoder_input_details else None,
        grammar=grammar_for(parameters.response_format, config),
    )


def lorax_prompt(tokenizer: PreTrainedTokenizerBase, inputs: str, truncate: int | None) -> list[int]:
    """The prompt's token ids (blocking: call it off the event loop). With LoRAX's `truncate`, only the last
    `truncate` tokens are kept, counting the special tokens the tokenizer wraps the text in (BOS), which stay, as
    TGI's left truncation keeps them."""
    ids = tokenizer.encode(inputs)
    if truncate is None or len(ids) <= truncate:
        return ids
    text = tokenizer.encode(inputs, add_special_tokens=False)
    start = next((i for i in range(len(ids) - len(text) + 1) if ids[i:i + len(text)] == text), None)
    if start is None:  # a tokenizer that does not just wrap the text: keep the last tokens as they are
        return ids[-truncate:]
    prefix, suffix = ids[:start], ids[start + len(text):]
    kept = truncate - len(prefix) - len(suffix)
    if kept < 1:
        raise InvalidRequest(f"`truncate` must leave room for the prompt's {len(prefix) + len(suffix)} special "
                             f"token(s) and at least one more. Given: {truncate}")
    return prefix + text[-kept:] + suffix
