"""Request bodies of the HTTP APIs -> the engine's `SamplingParams` (validated by the engine, not here)."""

from __future__ import annotations

from loraserve.adapters.merge import MergeSpec
from loraserve.engine.api import AdapterRef
from loraserve.errors import InvalidRequest
from loraserve.sampling.params import SamplingParams
from loraserve.server.lorax.schemas import GenerateParameters
from loraserve.server.response_format import grammar_for


def adapter_from_lorax(parameters: GenerateParameters, token: str | None, default_source: str) -> AdapterRef | None:
    """The request's adapter, with its Hub token (`auth.hub_token`); `default_source` where it names none."""
    source = parameters.adapter_source or default_source
    merge = parameters.merged_adapters
    if merge is not None:
        if parameters.adapter_id:
            raise InvalidRequest("at most one of `adapter_id` or `merged_adapters` may be provided")
        spec = MergeSpec(tuple(merge.ids), tuple(merge.weights), merge.merge_strategy, merge.density,
                         merge.majority_sign_method)
        spec.validate()
        return AdapterRef.merged(spec, source, token)
    if not parameters.adapter_id:
        return None
    return AdapterRef(parameters.adapter_id, source, token)


def sampling_params_from_lorax(parameters: GenerateParameters, reports_tokens: bool) -> SamplingParams:
    """LoRAX semantics: a null field takes LoRAX's default; a null `max_new_tokens` means "up to max_total_tokens".

    `reports_tokens`: the reply lists tokens (a stream, or `details`), so each needs its logprob.
    """
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
        grammar=grammar_for(parameters.response_format),
    )
