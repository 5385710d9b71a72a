"""`serve-app batch`'s parts without Ray: lines to items, input chunks, the outputs a rerun reads
back, and the answerer on the real tiny engine, whose refusals must be the HTTP intake's own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from serve_app.api import request_models
from serve_app.api.intake import RequestChecker
from serve_app.bulk import files
from serve_app.bulk.answer import Answerer
from serve_app.bulk.files import JsonlOutput, ParquetOutput, Source
from serve_app.bulk.items import Item, TableTemplate, item_key, parse_line
from serve_app.config import AppConfig
from serve_app.errors import ServeAppError

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


def line(custom_id: str, body: dict[str, Any], url: str = "/v1/chat/completions") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def chat(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 24, **extra}


def refusal_of(item: Item) -> tuple[int, dict[str, Any]]:
    assert item.error is not None, item
    return item.error


# -- lines and items ---------------------------------------------------------------------------------


def test_a_malformed_line_gets_the_http_intakes_message() -> None:
    text = '{"custom_id": "x", "method"'
    status, body = refusal_of(parse_line(text, 7, 1 << 20, 64))
    with pytest.raises(ServeAppError) as http:
        RequestChecker(AppConfig(models=[{"name": "tiny", "source": "builtin:tiny-random-llama"}])).parse(
            text.encode(), request_models.ChatCompletionRequest)
    assert (status, body) == (400, http.value.to_dict())
    assert body["error"]["code"] == "invalid_json"


@pytest.mark.parametrize(("text", "status", "param"), [
    ("[1, 2]", 400, None),
    (line("a", chat(), url="/v1/embeddings"), 404, "url"),
    (json.dumps({"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}), 405, "method"),
    (json.dumps({"custom_id": "a", "url": "/v1/completions", "body": "text"}), 400, "body"),
    (json.dumps({"url": "/v1/completions", "body": chat()}), 400, "custom_id"),
    (json.dumps({"custom_id": 5, "url": "/v1/completions", "body": chat()}), 400, "custom_id"),
])
def test_lines_that_are_not_requests_are_answered_without_a_model(text: str, status: int, param: str | None) -> None:
    item = parse_line(text, 3, 1 << 20, 64)
    got, body = refusal_of(item)
    assert (got, body["error"]["param"]) == (status, param)


def test_a_line_over_the_body_limit_is_413_and_keyed_by_its_number() -> None:
    item = parse_line(line("big", chat("x" * 500)), 9, 200, 64)
    assert refusal_of(item)[0] == 413 and item.custom_id is None and item.key == "line:9"


def test_keys_never_confuse_an_id_with_a_line_number() -> None:
    assert item_key("5", 5) != item_key(None, 5)
    assert parse_line(line("5", chat()), 5, 1 << 20, 64).key == "id:5"


def test_an_item_travels_as_json_text() -> None:
    item = parse_line(line("a", chat()), 1, 1 << 20, 64)
    assert Item.loads(item.dumps()) == item
    bad = parse_line("{", 2, 1 << 20, 64)
    assert Item.loads(bad.dumps()) == bad


def test_a_table_row_becomes_a_strict_chat_request() -> None:
    template = TableTemplate("tiny", "doc", "id", PERSON, "Extract the person.", 40)
    item = template.item({"doc": "Ann, 31", "id": 17}, 4)
    assert item.custom_id == "17" and item.url == "/v1/chat/completions"
    assert item.body is not None and item.body["max_tokens"] == 40
    assert item.body["response_format"]["json_schema"] == {"name": "output", "schema": PERSON, "strict": True}
    assert [m["role"] for m in item.body["messages"]] == ["system", "user"]
    assert refusal_of(template.item({"doc": None, "id": 18}, 5))[1]["error"]["param"] == "doc"


# -- input chunks -----------------------------------------------------------------------------------


def test_chunks_cover_every_line_once_with_its_number(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    texts = [line(f"c{i}", chat(str(i))) if i % 50 else "" for i in range(1, 301)]  # every 50th blank
    path.write_text("\n".join(texts))  # no newline after the last line
    source = Source(str(path), 1 << 20, 64)
    chunks = source.chunks()
    assert len(chunks) == -(-300 // files.LINES_PER_CHUNK)
    items = [item for chunk in chunks for item in source.items(chunk)]
    assert [i.line for i in items] == [n for n in range(1, 301) if n % 50]
    assert all(i.custom_id == f"c{i.line}" and i.error is None for i in items)


def test_an_overlong_line_is_413_and_the_next_line_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(line("big", chat("x" * 3_000_000)) + "\n" + line("small", chat()) + "\n")
    source = Source(str(path), 1 << 20, 64)
    items = [item for chunk in source.chunks() for item in source.items(chunk)]
    assert [(i.line, i.error[0] if i.error else 200) for i in items] == [(1, 413), (2, 200)]


def test_parquet_row_groups_are_chunks_numbered_across_groups(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"doc": [f"d{i}" for i in range(10)]}), tmp_path / "t.parquet", row_group_size=4)
    source = Source(str(tmp_path / "t.parquet"), 1 << 20, 64, TableTemplate("tiny", "doc"))
    items = [item for chunk in source.chunks() for item in source.items(chunk)]
    assert [i.line for i in items] == list(range(1, 11))
    assert [i.body["messages"][-1]["content"] for i in items if i.body] == [f"d{i}" for i in range(10)]


# -- outputs read back on a rerun ----------------------------------------------------------------------


def result(custom_id: str | None, n: int = 1) -> str:
    where = {} if custom_id else {"line": n}
    body = {"choices": [{"message": {"content": "{}"}, "valid": True}]}
    return json.dumps({"custom_id": custom_id, **where, "response": {"status_code": 200, "body": body}})


def test_jsonl_output_drops_a_line_cut_short_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text(result("a") + "\n" + result(None, 4) + "\n" + result("b")[:30])
    output = JsonlOutput(str(path))
    assert output.done_keys() == {"id:a", "line:4"}
    assert path.read_text().count("\n") == 2 and path.read_text().endswith("\n")
    output.write([result("b")])
    output.close()
    assert JsonlOutput(str(path)).done_keys() == {"id:a", "line:4", "id:b"}


def test_parquet_output_parts_are_whole_and_read_back(tmp_path: Path) -> None:
    import pandas as pd

    path = tmp_path / "out.parquet"
    output = ParquetOutput(str(path))
    output.write([result("a"), result(None, 2)])
    output.close()
    (path / "part-x.parquet.tmp").write_bytes(b"cut short")  # a crash mid-part
    assert ParquetOutput(str(path)).done_keys() == {"id:a", "line:2"}
    assert not list(path.glob("*.tmp"))
    table = pd.read_parquet(path)
    assert list(table["content"]) == ["{}", "{}"] and list(table["valid"]) == [True, True]


# -- the answerer on the real tiny engine -------------------------------------------------------------


@pytest.fixture(scope="module")
def answerer(tiny_engine: Any, tiny_config: Any) -> Answerer:
    config = AppConfig(models=[tiny_config.model_dump(mode="json")])
    return Answerer(config, tiny_engine)


def http_error(answerer: Answerer, body: dict[str, Any], body_type: type[Any]) -> dict[str, Any]:
    """What the router's intake and the engine answer the same body over HTTP."""
    from serve_app.api.intake import as_sent

    with pytest.raises(ServeAppError) as error:
        intake = answerer.checker.prepare(json.dumps(body).encode(), body_type)
        try:
            [answerer.engine.prepare(row) for row in intake.rows]
        except ServeAppError as refused:
            raise as_sent(refused, intake.body) from None
    return error.value.to_dict()


def test_answers_and_refusals_match_the_http_route(answerer: Answerer) -> None:
    refused_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}}}}
    bodies = {
        "person": chat(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}),
        "regex": {"model": "tiny", "prompt": "x", "max_tokens": 8, "structured_outputs": {"regex": "[ab]{3}"}},
        "choice": {"model": "tiny", "prompt": "x", "constraint": {"type": "choice", "choices": ["yes", "no"]}},
        "grammar": {"model": "tiny", "prompt": "x", "max_tokens": 8,
                    "constraint": {"type": "grammar", "grammar": 'start: "a" | "b" "c"'}},
        "response": {"model": "tiny", "input": "x", "max_output_tokens": 16},
        "refused": chat(response_format=refused_schema),
        "unknown": {**chat(), "model": "nope"},
        "too-long": chat("word " * 5000),
        "bad-param": chat(temperature=7),
    }
    urls = {"regex": "/v1/completions", "choice": "/v1/generate", "grammar": "/v1/generate",
            "response": "/v1/responses"}
    items = [parse_line(line(k, b, urls.get(k, "/v1/chat/completions")), i, 1 << 22, 64)
             for i, (k, b) in enumerate(bodies.items(), start=1)]
    answers = {a.key: a for a in answerer.answer(items)}
    for name in ("person", "regex", "choice", "grammar"):
        assert (answers[f"id:{name}"].status, answers[f"id:{name}"].valid) == (200, True), answers[f"id:{name}"]
    assert answers["id:response"].line["response"]["body"]["object"] == "response"
    for name in ("refused", "unknown", "too-long", "bad-param"):
        got = answers[f"id:{name}"].line["response"]
        assert got["body"] == http_error(answerer, bodies[name], request_models.ChatCompletionRequest), name
        assert got["status_code"] in (400, 404)


def test_a_model_that_needs_more_gpus_than_the_cluster_has_is_named() -> None:
    from serve_app.bulk.job import missing_gpus

    config = AppConfig(models=[{"name": "cpu", "source": "builtin:tiny-random-llama"},
                               {"name": "two", "source": "builtin:tiny-random-llama",
                                "placement": {"gpus_per_replica": 2}}])
    assert missing_gpus(config, 2) is None
    assert missing_gpus(config, 1) == "model two needs 2 GPUs per engine; this Ray cluster has 1"


def test_submit_batch_passes_the_options_on_and_wants_an_absolute_output() -> None:
    from serve_app.cli import batch_argv, parser
    from serve_app.ops import CliError
    from serve_app.ops.jobs import job_request

    args = parser().parse_args(["submit", "configs/local.yaml", "--batch", "--input", "in.parquet", "--prompt-column",
                                "text", "--schema", "p.json", "--output", "/data/out.parquet"])
    argv = batch_argv(args)
    assert argv == ["--input", "in.parquet", "--output", "/data/out.parquet", "--prompt-column", "text", "--schema",
                    "p.json"]
    entrypoint, _ = job_request("configs/local.yaml", ".", argv)
    assert entrypoint == ("python -m serve_app.bulk.job configs/local.yaml --input in.parquet --output "
                          "/data/out.parquet --prompt-column text --schema p.json")
    with pytest.raises(CliError, match="absolute"):
        batch_argv(parser().parse_args(["submit", "local", "--batch", "--input", "a", "--output", "b.jsonl"]))
