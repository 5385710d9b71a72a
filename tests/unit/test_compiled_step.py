"""The compiled decode step (engine/compiled_step.py, `compile_decode`): on the tiny model it gives
the tokens the eager step gives, in a batch that mixes constrained and free rows, rows that jump
forward, rows that join and leave (some fed the end of their prompt by the steps); it compiles its
one graph during warm-up and never again; where it cannot run or fails, the loop decodes eagerly and
the tokens are the same."""

import logging
from types import SimpleNamespace

import pytest

from serve_app.config import ModelConfig
from serve_app.engine import compiled_step, decode
from serve_app.engine.batch import GrowableLayer
from serve_app.engine.compiled_step import CompiledStep, unsupported_reason
from serve_app.engine.factory import create_engine
from serve_app.generation import GenerationRequest, SamplingParams
from tests.unit.test_jump_forward import requests

# bfloat16: the fused kernels round differently from eager's.
LOGPROB_TOLERANCE = 0.02


def batches() -> list[list[GenerationRequest]]:
    """A mixed batch (constrained, free, jump-forward), one row alone, three rows, then two of their
    prompts again (they join from the prefix cache without a prefill) and a new one."""
    alone = [GenerationRequest(prompt="One row on its own.", sampling=SamplingParams(max_new_tokens=30))]
    three = [GenerationRequest(prompt="Short." * (1 + 7 * i), sampling=SamplingParams(max_new_tokens=20 + 9 * i))
             for i in range(3)]
    again = [GenerationRequest(prompt="Short." * 15, sampling=SamplingParams(max_new_tokens=12)),
             GenerationRequest(prompt="Short." * 8, sampling=SamplingParams(max_new_tokens=25)),
             GenerationRequest(prompt="A new one.", sampling=SamplingParams(max_new_tokens=18))]
    return [requests(), alone, three, again, scored()]


def scored() -> list[GenerationRequest]:
    """Rows whose logprobs are compared: prompts of unlike lengths (most of a short row's columns are
    padding); the longest finishes first, and the cache's front columns, which only it used, are dropped."""
    return [GenerationRequest(prompt="Count: " + "one two " * (1 + 12 * i),
                              sampling=SamplingParams(max_new_tokens=16 - 6 * i, logprobs=0)) for i in range(3)]


def generate(tiny_model_dir: str, compile_decode: bool) -> tuple[list[list[int]], dict]:
    config = ModelConfig(name="tiny", source=tiny_model_dir, compile_decode=compile_decode,
                         sampling={"temperature": 0})
    with create_engine(config) as engine:
        compiled = engine.loop.compiled
        after_warm_up = compiled.compiles if compiled else None
        results = [r for batch in batches() for r in engine.generate(batch)]
        tokens = [r.token_ids for r in results]
        logprobs = [entry.logprob for r in results[-len(scored()):] for entry in r.logprobs or []]
        status = engine.status()
        return tokens, {"after_warm_up": after_warm_up, "compiles": status.decode_compiles,
                        "seconds": status.decode_compile_seconds, "calls": compiled.calls if compiled else 0,
                        "steps": engine.loop.steps, "forced": engine.loop.forced_tokens, "logprobs": logprobs,
                        "folded": status.admitted_without_prefill}


def test_the_compiled_step_gives_the_eager_tokens_and_compiles_only_during_warm_up(tiny_model_dir, monkeypatch):
    firsts: list[int] = []
    buffers = GrowableLayer.buffers

    def recorded(self):
        found = buffers(self)
        firsts.append(found[2])
        return found

    monkeypatch.setattr(GrowableLayer, "buffers", recorded)
    eager, eager_counts = generate(tiny_model_dir, compile_decode=False)
    assert eager_counts["compiles"] is None and not firsts
    widths: list[int] = []
    rows: set[int] = set()
    chosen = decode.step_width

    def counted(lengths, cap, compiled):
        widths.append(chosen(lengths, cap, compiled))
        if widths[-1] == 1:
            rows.add(len(lengths))
        return widths[-1]

    monkeypatch.setattr(decode, "step_width", counted)
    compiled, counts = generate(tiny_model_dir, compile_decode=True)
    assert compiled == eager
    assert eager_counts["folded"] == counts["folded"] == 2  # fed their last prompt token by a step
    assert len(counts["logprobs"]) == 30
    assert counts["logprobs"] == pytest.approx(eager_counts["logprobs"], abs=LOGPROB_TOLERANCE)
    # One graph, compiled during warm-up, ran every one-token step, of one row as of several.
    assert counts["after_warm_up"] == counts["compiles"] == len(compiled_step.WARM_UP_SHAPES) == 1
    assert 1 in rows and max(rows) >= 4
    assert counts["seconds"] > 0
    assert counts["forced"] > 10  # jump-forward appended forced tokens
    # Every one-token step compiled; the wider ones ran eagerly (a few rows left, one of them jumped).
    wide = sum(1 for width in widths if width > 1)
    assert len(widths) == counts["steps"] > 100 and wide >= 1
    assert counts["calls"] == counts["steps"] - wide + len(compiled_step.WARM_UP_SHAPES)
    assert max(firsts) > 0  # columns dropped from the front of the cache were hidden, not attended


def test_a_compiled_step_that_fails_leaves_the_loop_eager_and_the_tokens_the_same(tiny_model_dir, monkeypatch,
                                                                                 caplog):
    eager, _ = generate(tiny_model_dir, compile_decode=False)

    def fails(self, *args):
        raise RuntimeError("compiler bug")

    monkeypatch.setattr(CompiledStep, "warm_up", lambda self: None)
    monkeypatch.setattr(CompiledStep, "step", fails)
    with caplog.at_level(logging.WARNING, logger="serve_app.engine.decode"):
        tokens, counts = generate(tiny_model_dir, compile_decode=True)
    assert tokens == eager
    assert "the compiled decode step failed; decoding eagerly from now on" in caplog.text
    assert counts["compiles"] is None  # the loop let it go


def test_a_warm_up_that_fails_leaves_the_replica_eager(tiny_model_dir, monkeypatch, caplog):
    def fails(self):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(CompiledStep, "warm_up", fails)
    config = ModelConfig(name="tiny", source=tiny_model_dir, compile_decode=True, sampling={"temperature": 0})
    with caplog.at_level(logging.WARNING), create_engine(config) as engine:
        assert engine.loop.compiled is None
        [result] = engine.generate([GenerationRequest(prompt="Hello", sampling=SamplingParams(max_new_tokens=5))])
    assert len(result.token_ids) == 5
    assert "compiling the decode step failed; it stays eager" in caplog.text


@pytest.mark.parametrize(("model", "reason"), [
    (SimpleNamespace(config=SimpleNamespace(model_type="gpt2")), "model type 'gpt2'"),
    (SimpleNamespace(config=SimpleNamespace(model_type="llama"), device=SimpleNamespace(type="cuda")), "not on CPU"),
    (SimpleNamespace(config=SimpleNamespace(model_type="llama"), hf_device_map={"a": 0, "b": 1}), "sharded"),
    (SimpleNamespace(config=SimpleNamespace(model_type="llama")), "Llama's modules"),
])
def test_models_the_compiled_step_cannot_run_are_named_with_the_reason(model, reason):
    assert reason in (unsupported_reason(model) or "")


def test_the_tiny_model_can_run_compiled(tiny_engine):
    assert unsupported_reason(tiny_engine.model) is None
