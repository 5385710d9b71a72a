"""What vLLM is given: its engine configuration for a replica, and each row as its SamplingParams.

A steered row (engine/vllm_steering.py) gives vLLM nothing to decide: greedy sampling over the one
token our processor leaves, its budget, EOS as the stop token, no detokenizing (our policies write
the text). An unsteered row (unconstrained, or tensor parallel > 1) is vLLM's to sample, with the
plan's target as its structured outputs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Final

from serve_app.config import ModelConfig
from serve_app.constraints import ChoiceConstraint, GrammarConstraint, JsonSchemaConstraint, RegexConstraint
from serve_app.engine.placement import GpuInfo
from serve_app.engine.requests import MIN_LOGPROB, PreparedRow
from serve_app.engine.vllm_steering import ROW_KEY, SteeredRows, steering_processor

# What vLLM's structured outputs compile where it samples constrained rows itself.
VLLM_BACKEND: Final = "guidance"


def engine_config(config: ModelConfig, source: str, gpus: Sequence[GpuInfo], context: int,
                  steered: SteeredRows | None) -> Any:
    """vLLM's VllmConfig for this replica; with `steered`, our processor in its sampler, for the
    model runner vLLM chose (V1 on CPU, V2 where Triton is). Steered, no chunked prefill: the V1
    runner runs processors on a partial prefill's sample too (then discards it), which would
    advance a row on logits from the middle of its prompt."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
    if not gpus:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{config.vllm.cpu_kv_cache_gib:g}"
    from vllm import EngineArgs
    from vllm.config import StructuredOutputsConfig

    share = config.placement.gpus_per_replica
    length = config.vllm.max_model_len or context
    whole_prompts: dict[str, Any] = {"enable_chunked_prefill": False, "max_num_batched_tokens": max(length, 2048)}
    args = EngineArgs(
        model=source, tokenizer=config.loading.tokenizer or source,
        revision=config.loading.revision, trust_remote_code=config.loading.trust_remote_code,
        dtype=config.dtype, seed=0, enforce_eager=config.vllm.enforce_eager,
        tensor_parallel_size=max(1, len(gpus)), served_model_name=config.name,
        gpu_memory_utilization=config.vllm.gpu_memory_utilization or (share if gpus and share < 1 else 0.9),
        # Compact JSON, as the cascade's llguidance writes it (weak models fill free whitespace).
        structured_outputs_config=StructuredOutputsConfig(backend=VLLM_BACKEND, disable_any_whitespace=True),
        disable_log_stats=False, max_model_len=length, **(whole_prompts if steered is not None else {}))
    vllm_config = args.create_engine_config()
    if steered is not None:  # read when the runner and the input processor start, not hashed
        vllm_config.model_config.logits_processors = [
            steering_processor(steered, v2=bool(vllm_config.use_v2_model_runner))]
    return vllm_config


def steered_sampling(key: str, budget: int, eos: int) -> Any:
    """A steered row's SamplingParams: its processor decides every token."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=budget, temperature=0.0, stop_token_ids=[eos], ignore_eos=False,
                          detokenize=False, extra_args={ROW_KEY: key})


def sampling(prepared: PreparedRow) -> Any:
    """An unsteered row as vLLM's SamplingParams, the plan's target as its structured outputs."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    structured, row = None, prepared.row
    if prepared.enforcement is not None:
        target = prepared.enforcement.plan.target
        if isinstance(target, JsonSchemaConstraint):
            structured = StructuredOutputsParams(json=target.json_schema, disable_any_whitespace=True)
        elif isinstance(target, RegexConstraint):
            structured = StructuredOutputsParams(regex=target.pattern)
        elif isinstance(target, ChoiceConstraint):
            structured = StructuredOutputsParams(choice=list(target.choices))
        elif isinstance(target, GrammarConstraint):
            structured = StructuredOutputsParams(grammar=target.grammar)
    return SamplingParams(
        max_tokens=row.max_new_tokens, temperature=row.temperature, top_p=row.top_p, top_k=row.top_k,
        min_p=row.min_p, seed=row.seed, stop=row.stop or None, repetition_penalty=row.repetition_penalty,
        frequency_penalty=row.frequency_penalty, presence_penalty=row.presence_penalty,
        logprobs=row.logprobs, structured_outputs=structured, logit_bias=row.logit_bias)


def logprob_entry(token: int, ranked: dict[int, Any], top: int) -> tuple[int, float, list[tuple[int, float]]]:
    """vLLM's {token: Logprob} for one position as the decode loop's (token, logprob, alternatives)."""
    chosen = ranked.get(token)
    alternatives = sorted(((t, float(lp.logprob)) for t, lp in ranked.items()), key=lambda p: -p[1])[:top]
    return token, float(chosen.logprob) if chosen is not None else MIN_LOGPROB, alternatives
