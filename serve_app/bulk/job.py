"""The batch job on Ray Data: read chunks of the input (tasks on the driver's node, so only the
machine that runs the job needs the files), route each item to its model, answer through an
actor pool of engines per model (placed like that model's serving replicas, as many as its
replica bounds), and write result lines as blocks of answers arrive.

    python -m serve_app.bulk.job CONFIG --input IN --output OUT      (`serve-app batch` is the same)

Rerun with the same OUT and the lines already written are skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from serve_app.bulk.files import Source, is_parquet, output_for
from serve_app.bulk.items import Item, TableTemplate
from serve_app.config import AppConfig, ConfigError, ModelConfig, load_config
from serve_app.ops import CliError

READER_CPUS = 0.25
# Calls each engine actor takes at once: the next batch is fetched while one is answered.
BATCHES_PER_ACTOR = 2
_DONE: dict[str, set[str]] = {}  # per worker process: the keys already written, fetched once


def _done_keys(ref: Any) -> set[str]:
    import ray

    key = ref.hex()
    if key not in _DONE:
        _DONE.clear()
        _DONE[key] = ray.get(ref)
    return _DONE[key]


def read_items(chunks: dict[str, Any], source: Source, done: list[Any], models: list[str]) -> dict[str, list[Any]]:
    """A block of chunks -> the items not yet answered, each with the model that answers it (an
    unknown model's item goes to the first, whose intake answers it 404 as HTTP does)."""
    skip = _done_keys(done[0])
    out: dict[str, list[Any]] = {"model": [], "item": []}
    for chunk in _rows(chunks):
        for item in source.items(chunk):
            if item.key not in skip:
                out["model"].append(item.model if item.model in models else models[0])
                out["item"].append(item.dumps())
    return out


def _rows(columns: dict[str, Any]) -> list[dict[str, int]]:
    """A block of chunk descriptors (numpy columns of integers) as plain dicts."""
    names = list(columns)
    rows = zip(*(columns[n] for n in names), strict=True)
    return [{n: int(v) for n, v in zip(names, values, strict=True)} for values in rows]


class EngineActor:
    """One engine, loaded where Ray placed this actor; answers a block of items at a time."""

    def __init__(self, config: dict[str, Any], model: str) -> None:
        from serve_app.bulk.answer import Answerer
        from serve_app.replica import placed_engine

        app = AppConfig.model_validate(config)
        engine, _ = placed_engine(app.model(model))
        self.answerer = Answerer(app, engine)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        answers = self.answerer.answer([Item.loads(text) for text in batch["item"]])
        rows = [a.row() for a in answers]
        return {name: [r[name] for r in rows] for name in ("key", "answer", "status", "valid", "tokens")}


def engine_pool(model: ModelConfig) -> Any:
    """The engine actors: as many as the model's replica bounds (at least one). Each takes
    BATCHES_PER_ACTOR calls, so the next batch is fetched while one is answered; the answering
    itself runs one call at a time (Ray Data's default: with `enable_true_multi_threading` a
    1,000-line bench run stalled at 880 lines; not investigated)."""
    import ray

    bounds, calls = model.autoscaling, BATCHES_PER_ACTOR
    if bounds.min_replicas == bounds.max_replicas:
        return ray.data.ActorPoolStrategy(size=bounds.max_replicas, max_concurrent_calls_per_actor=calls)
    return ray.data.ActorPoolStrategy(min_size=max(1, bounds.min_replicas), max_size=bounds.max_replicas,
                                      max_concurrent_calls_per_actor=calls)


def missing_gpus(config: AppConfig, gpus: float) -> str | None:
    for model in config.models:
        if model.placement.gpus_per_replica > gpus:
            return f"model {model.name} needs {model.placement.gpus_per_replica:g} GPUs per engine; this Ray " \
                f"cluster has {gpus:g}"
    return None


def pipeline(config: AppConfig, source: Source, done: set[str]) -> Any:
    """The dataset of answers (nothing runs until it is iterated)."""
    import ray
    from ray.util.placement_group import NODE_ID_LABEL_KEY

    from serve_app.replica import actor_options

    chunks = source.chunks()
    names = [m.name for m in config.models]
    here = {NODE_ID_LABEL_KEY: ray.get_runtime_context().get_node_id()}
    reader: Any = read_items  # Ray's stub wants a one-argument function; the rest are fn_kwargs
    items = ray.data.from_items(chunks, override_num_blocks=max(1, min(len(chunks), 4096))).map_batches(
        reader, fn_kwargs={"source": source, "done": [ray.put(done)], "models": names}, batch_size=1,
        num_cpus=READER_CPUS, label_selector=here)
    branches = []
    for model in config.models:
        mine = items if len(names) == 1 else items.filter(lambda row, name=model.name: row["model"] == name)
        # Blocks of one batch: an engine call's answers are written when it returns (a block of a
        # whole chunk would hold them until the chunk's last batch is done).
        mine = mine.repartition(target_num_rows_per_block=model.limits.max_batch_size)
        branches.append(mine.map_batches(
            EngineActor, fn_constructor_kwargs={"config": config.model_dump(mode="json", by_alias=True),
                                                "model": model.name},
            batch_size=model.limits.max_batch_size, compute=engine_pool(model), **actor_options(model)))
    return branches[0].union(*branches[1:]) if len(branches) > 1 else branches[0]


@dataclass
class Summary:
    skipped: int
    written: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    valid: int = 0
    constrained: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, batch: dict[str, Any]) -> None:
        self.written += len(batch["key"])
        self.statuses.update(int(s) for s in batch["status"])
        self.valid += sum(1 for v in batch["valid"] if v == 1)
        self.constrained += sum(1 for v in batch["valid"] if v >= 0)
        self.tokens += sum(int(t) for t in batch["tokens"])

    def text(self, interrupted: bool = False) -> str:
        took = time.perf_counter() - self.started
        errors = ", ".join(f"{status} x{n}" for status, n in sorted(self.statuses.items()) if status != 200)
        valid = f"{100 * self.valid / self.constrained:.1f}% valid of {self.constrained} constrained" \
            if self.constrained else "none constrained"
        return (f"batch {'interrupted' if interrupted else 'done'}: {self.written} lines written "
                f"({self.skipped} already done) in {took:.1f} s, {self.written / max(took, 1e-9):.2f} lines/s, "
                f"{self.tokens / max(took, 1e-9):.1f} tokens/s; {self.statuses[200]} answered, {valid}; "
                f"errors: {errors or 'none'}")


def run(config: AppConfig, source: Source, out_path: str) -> int:
    output = output_for(out_path)
    done = output.done_keys()
    summary = Summary(skipped=len(done))
    print(f"batch: {source.path} -> {out_path}; {len(done)} lines already written are skipped", file=sys.stderr,
          flush=True)
    try:
        for batch in pipeline(config, source, done).iter_batches(batch_size=None, batch_format="numpy"):
            output.write(list(batch["answer"]))
            summary.add(batch)
    except KeyboardInterrupt:
        print(summary.text(interrupted=True), file=sys.stderr, flush=True)
        return 130
    finally:
        output.close()  # whatever ended the run, what arrived is on disk (a Parquet part included)
    print(summary.text(), file=sys.stderr, flush=True)
    return 0


# -- the command -----------------------------------------------------------------------------------


def add_batch_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--input", required=required, help="OpenAI batch JSONL (custom_id, method, url, body), or "
                        "a table (JSONL rows or .parquet) with --prompt-column")
    parser.add_argument("--output", required=required, help="result lines: .jsonl, or a .parquet directory of parts; "
                        "a rerun skips what it holds")
    parser.add_argument("--prompt-column", help="a table: the column whose text is each row's user message")
    parser.add_argument("--id-column", help="a table: the column that is each row's custom_id (default: row number)")
    parser.add_argument("--schema", help="a table: a JSON Schema file every answer is generated under (strict)")
    parser.add_argument("--system", help="a table: a system message before each prompt")
    parser.add_argument("--max-tokens", type=int, help="a table: max_tokens per row (default: the model's)")
    parser.add_argument("--served-model", help="a table: which model of the config answers (default: the first)")


def source_of(args: argparse.Namespace, config: AppConfig) -> Source:
    server = config.server
    table = bool(args.prompt_column)
    if not table and (is_parquet(args.input) or args.schema or args.id_column):
        raise CliError("a table input (a .parquet file, --schema, --id-column) needs --prompt-column")
    template = None
    if table:
        model = args.served_model or config.models[0].name
        if model not in {m.name for m in config.models}:
            raise CliError(f"--served-model {model!r} is not a model of the config")
        template = TableTemplate(model, args.prompt_column, args.id_column, _schema(args.schema), args.system,
                                 args.max_tokens)
    if not os.path.isfile(args.input):
        raise CliError(f"--input {args.input}: no such file")
    return Source(args.input, server.max_body_bytes, server.max_json_depth, template)


def _schema(path: str | None) -> dict[str, Any] | None:
    import json

    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            schema = json.load(f)
    except (OSError, ValueError) as error:
        raise CliError(f"--schema {path}: {error}") from None
    if not isinstance(schema, dict):
        raise CliError(f"--schema {path}: a JSON Schema is an object")
    return schema


def run_command(args: argparse.Namespace, config: AppConfig) -> int:
    """`serve-app batch` once its config is read: on a cluster when RAY_ADDRESS names one (a Ray
    job sets it), else on a local Ray started for this run."""
    source = source_of(args, config)
    import ray

    address = os.environ.get("RAY_ADDRESS")
    ray.init(address=address) if address else ray.init(address="local", include_dashboard=False)
    try:
        missing = missing_gpus(config, ray.cluster_resources().get("GPU", 0))
        if missing and not address:  # a local Ray never grows: the engine actors would wait forever
            raise CliError(missing)
        if missing:
            print(f"warning: {missing}; the job waits until the cluster has them", file=sys.stderr, flush=True)
        return run(config, source, args.output)
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.bulk.job")
    parser.add_argument("config")
    add_batch_options(parser)
    args = parser.parse_args(argv)
    try:
        return run_command(args, load_config(args.config))
    except (ConfigError, CliError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
