"""One home for the sampling vocabulary and its bounds: the API's request fields, the engine's
`SamplingParams` and the config's `SamplingDefaults` all declare their fields with these types,
so a bound is written once."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

MaxTokens = Annotated[int, Field(ge=1)]
Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(gt=0, le=1)]
TopK = Annotated[int, Field(ge=-1, le=1_000_000)]  # -1 or 0: off (vLLM's convention)
MinP = Annotated[float, Field(ge=0, le=1)]
TopLogprobs = Annotated[int, Field(ge=0, le=20)]  # OpenAI's bound
# OpenAI's logit_bias: token ids (as strings in JSON) to a bias from -100 (banned) to 100 (chosen
# wherever the constraint allows it).
LogitBias = Annotated[dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(ge=-100, le=100)]],
                      Field(max_length=1024)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]  # signed 64-bit, as OpenAI's API
RepetitionPenalty = Annotated[float, Field(gt=0, le=10)]
FrequencyPenalty = Annotated[float, Field(ge=-2, le=2)]
PresencePenalty = Annotated[float, Field(ge=-2, le=2)]
NgramSize = Annotated[int, Field(ge=0, le=32)]
MAX_STOPS = 16  # as OpenAI's API allows 4; vLLM takes any number: 16 bounds the per-token check
StopList = Annotated[list[str], Field(max_length=MAX_STOPS)]
SEED_SPAN = 2**64
# Sampling parameters a request may leave out (the model's defaults apply), besides max tokens.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty",
                   "presence_penalty", "no_repeat_ngram_size", "close_json")


def check_stops(stop: list[str]) -> list[str]:
    if "" in stop:  # it would match before the first character: nothing could be generated
        raise ValueError("stop sequences must not be empty")
    if len(stop) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop sequences")
    return stop


def stops_validator(field: str = "stop") -> classmethod:
    """A pydantic validator for a stop list (or one string) field."""
    def validate(cls: type, stop: str | list[str] | None) -> str | list[str] | None:
        if stop is None:
            return None
        check_stops([stop] if isinstance(stop, str) else stop)
        return stop
    return field_validator(field)(classmethod(validate))


def seed_for_choice(seed: int, index: int) -> int:
    """Choice `index` of `n` samples with seed + index, wrapped within the signed 64-bit range."""
    return (seed + index + SEED_SPAN // 2) % SEED_SPAN - SEED_SPAN // 2
