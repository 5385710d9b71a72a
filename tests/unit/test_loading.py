"""The `loading:` section on real local checkpoints the suite builds: a revision out of a local
hub cache (refs + snapshots, as the hub lays it out), a chat template given inline or as a file,
none at all (a 400, not a silent ChatML), per-request chat_template_kwargs, attention and other
from_pretrained options, and planning pre-quantised checkpoints by their real bytes."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
from pydantic import ValidationError

from serve_app.config import LoadingConfig, ModelConfig
from serve_app.engine.factory import create_engine
from serve_app.errors import InvalidRequestError
from serve_app.generation import ChatMessage, GenerationRequest, SamplingParams

HELLO = [ChatMessage(role="user", content="hi")]


def tiny(tiny_model_dir, **loading):
    return ModelConfig(name="tiny", source=tiny_model_dir, sampling={"temperature": 0}, loading=loading)


def rendered(engine, request):
    return engine.tokenizer.decode(engine.prompt_ids(request))


def test_a_chat_template_inline_or_from_a_file_replaces_the_tokenizers(tiny_model_dir, tmp_path):
    template = "{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}{{ suffix | default('') }}"
    path = tmp_path / "template.jinja"
    path.write_text(template)
    for value in (template, str(path)):
        with create_engine(tiny(tiny_model_dir, chat_template=value)) as engine:
            assert rendered(engine, GenerationRequest(messages=HELLO)) == "[user:hi]"
            asked = GenerationRequest(messages=HELLO, chat_template_kwargs={"suffix": " ok"})
            assert rendered(engine, asked) == "[user:hi] ok"  # per-request kwargs reach the template


def test_chat_template_kwargs_may_not_replace_what_the_service_sets():
    for kwargs in ({"add_generation_prompt": False}, {"tools": None}, {"x": "y" * 5000},
                   {f"k{i}": i for i in range(17)}, {"x": {"nested": 1}}):
        with pytest.raises(ValidationError):
            GenerationRequest(messages=HELLO, chat_template_kwargs=kwargs)


def test_a_model_without_a_chat_template_answers_chat_with_a_400_and_prompts_as_usual(tiny_model_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "chat_template.jinja").unlink()
    settings = json.loads((bare / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(settings))
    with create_engine(ModelConfig(name="bare", source=str(bare), sampling={"temperature": 0})) as engine:
        with pytest.raises(InvalidRequestError, match="no chat template") as raised:
            engine.generate([GenerationRequest(messages=HELLO)])
        assert raised.value.status_code == 400 and raised.value.code == "no_chat_template"
        [out] = engine.generate([GenerationRequest(prompt="hi", sampling=SamplingParams(max_new_tokens=3))])
        assert out.usage.completion_tokens == 3


def test_a_missing_template_file_is_a_load_error(tiny_model_dir):
    from serve_app.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="neither a Jinja template nor a file"):
        create_engine(tiny(tiny_model_dir, chat_template="/no/such/template.jinja"))


def test_attention_and_other_from_pretrained_options_reach_the_model(tiny_model_dir):
    config = tiny(tiny_model_dir, attn_implementation="eager", from_pretrained_kwargs={"low_cpu_mem_usage": True})
    with create_engine(config) as engine:
        assert engine.model.config._attn_implementation == "eager"
        assert engine.generate([GenerationRequest(prompt="hi", sampling=SamplingParams(max_new_tokens=2))])
    with pytest.raises(ValidationError, match="dtype: set by the loading section or the placement plan"):
        LoadingConfig(from_pretrained_kwargs={"dtype": "float16"})


def test_a_revision_is_read_out_of_a_local_hub_cache(tiny_model_dir, tmp_path):
    """Two commits of one repo in the hub's cache layout; `revision` picks the tag's snapshot
    (offline: no hub is reachable here, the real resolution path is)."""
    repo = tmp_path / "hub" / "models--acme--tiny"
    for commit, context in (("a" * 40, 2048), ("b" * 40, 777)):
        snapshot = repo / "snapshots" / commit
        shutil.copytree(tiny_model_dir, snapshot)
        settings = json.loads((snapshot / "config.json").read_text())
        settings["max_position_embeddings"] = context
        (snapshot / "config.json").write_text(json.dumps(settings))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (repo / "refs" / "v2").write_text("b" * 40)
    script = textwrap.dedent("""
        import sys
        from serve_app.config import ModelConfig
        from serve_app.engine.factory import create_engine
        for revision in (None, "v2", "b" * 40):
            config = ModelConfig(name="t", source="acme/tiny", loading={"revision": revision})
            with create_engine(config) as engine:
                print(revision, engine.context_length)
    """)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:3] == ["None 2048", "v2 777", f"{'b' * 40} 777"]


def test_a_pre_quantised_checkpoint_is_planned_by_its_real_bytes(tiny_model_dir):
    from transformers import AutoConfig

    from serve_app.engine.placement import count_parameters, quantized_bits, weight_bytes

    plain = AutoConfig.from_pretrained(tiny_model_dir)
    assert quantized_bits(plain) is None and weight_bytes(plain, "float16") == 2 * count_parameters(plain)
    for quantization, bits in (({"quant_method": "gptq", "bits": 4}, 4), ({"quant_method": "awq", "w_bit": 4}, 4),
                               ({"quant_method": "bitsandbytes", "load_in_8bit": True}, 8),
                               ({"quant_method": "fp8"}, 8)):
        quantised = AutoConfig.from_pretrained(tiny_model_dir)
        quantised.quantization_config = quantization
        assert quantized_bits(quantised) == bits
        assert weight_bytes(quantised, "float16") < weight_bytes(plain, "float16")


def test_the_model_loads_in_a_thread_that_ends_with_the_load_from_any_caller(tiny_model_dir, monkeypatch):
    """A Ray replica builds its engine in a user-code thread that lives on; a load run there left
    that thread an OpenMP team beside the decode loop's, and the replica served ~20% slower."""
    import threading

    from serve_app.engine import loading

    loaders: list[threading.Thread] = []
    real = loading._from_pretrained

    def recording(*args, **kwargs):
        loaders.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "_from_pretrained", recording)
    callers: list[threading.Thread] = []

    def build() -> None:
        callers.append(threading.current_thread())
        create_engine(tiny(tiny_model_dir)).close()

    build()  # the main thread
    caller = threading.Thread(target=build, name="user-code")
    caller.start()
    caller.join()
    assert len(loaders) == 2
    for loader, calling in zip(loaders, callers, strict=True):
        assert loader is not calling and loader.name == loading.LOADER_THREAD and not loader.is_alive()
