"""`serve-app batch` as users run it: the real CLI in a subprocess (its own local Ray cluster,
Ray Data, engine actors on the tiny model), checked against the served app over real HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.integration.conftest import MAIN_APP

SERVE_APP = str(Path(sys.executable).parent / "serve-app")
JOB_TIMEOUT_S = 600
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"]}
# The served app's "tiny" (one replica here) and "tiny-small" (a 256-byte schema limit): two
# models, so lines are routed to two engine pools.
MODELS = [{**m, "autoscaling": {"min_replicas": 1, "max_replicas": 1}} for m in MAIN_APP["models"]
          if m["name"] in ("tiny", "tiny-small")]


def write_config(tmp_path: Path) -> str:
    path = tmp_path / "batch.yaml"
    server = {k: v for k, v in MAIN_APP["server"].items() if k != "api_keys"}
    path.write_text(yaml.safe_dump({"server": server, "models": MODELS}))
    return str(path)


def batch_line(custom_id: str, url: str, body: dict[str, Any]) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def chat(content: str, model: str = "tiny", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 48, **extra}


MIXED = {
    "json": ("/v1/chat/completions", chat("a person", response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})),
    "regex": ("/v1/completions", {"model": "tiny", "prompt": "code:", "max_tokens": 8,
                                  "structured_outputs": {"regex": "[A-Z]{2}-[0-9]{3}"}}),
    "choice": ("/v1/generate", {"model": "tiny-small", "prompt": "ok?", "constraint": {
        "type": "choice", "choices": ["yes", "no", "maybe"]}}),
    "grammar": ("/v1/generate", {"model": "tiny", "prompt": "go", "max_tokens": 16, "constraint": {
        "type": "grammar", "grammar": 'start: "(" item ("," item)? ")"\nitem: "a" | "b"'}}),
    "responses": ("/v1/responses", {"model": "tiny", "input": "a person", "max_output_tokens": 48, "text": {
        "format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}}),
    "refused": ("/v1/chat/completions", chat("x", response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}}}})),
    "too-big-schema": ("/v1/chat/completions", chat("x", "tiny-small", response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(20)}}}})),
    "unknown-model": ("/v1/chat/completions", chat("x", "nope")),
    "bad-value": ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": -1}),
}
BROKEN = '{"custom_id": "broken", "method": "POST", "url": "/v1/chat/completions", "body": {"model": '


def run_batch(*args: str, timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SERVE_APP, "batch", *args], capture_output=True, text=True, timeout=timeout)


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(text) for text in path.read_text().splitlines()]


def test_a_mixed_file_gets_one_line_each_with_the_http_apis_answers(
        client: httpx.Client, tmp_path: Path) -> None:
    requests = tmp_path / "requests.jsonl"
    texts = [batch_line(name, url, body) for name, (url, body) in MIXED.items()]
    requests.write_text("\n".join([*texts[:4], BROKEN, "", *texts[4:]]) + "\n")
    out = tmp_path / "results.jsonl"
    done = run_batch(write_config(tmp_path), "--input", str(requests), "--output", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = read_lines(out)
    assert sorted(str(line["custom_id"]) for line in lines) == sorted([*MIXED, "None"])
    by_id = {line["custom_id"]: line["response"] for line in lines}
    for name in ("json", "regex", "choice", "grammar"):
        body = by_id[name]["body"]
        assert by_id[name]["status_code"] == 200, body
        assert body.get("valid", body.get("choices", [{}])[0].get("valid")) is True, (name, body)
    assert by_id["responses"]["body"]["status"] == "completed"
    for name in ("refused", "too-big-schema", "unknown-model", "bad-value"):
        url, body = MIXED[name]
        http = client.post(url, json=body)
        expected = http.json()
        if name == "unknown-model":  # the served app has two more models to list
            expected["error"]["message"] = expected["error"]["message"].replace(", thinker, guarded", "")
        assert (by_id[name]["status_code"], by_id[name]["body"]) == (http.status_code, expected), name
    http = client.post("/v1/chat/completions", content=BROKEN, headers={"content-type": "application/json"})
    broken = by_id[None]
    assert (broken["status_code"], broken["body"]) == (http.status_code, http.json())
    assert [line.get("line") for line in lines if line["custom_id"] is None] == [5]
    assert "10 lines written (0 already done)" in done.stderr


def kill_tree(process: subprocess.Popen[str]) -> None:
    """A crash: SIGKILL to the job and every process it started (its local Ray included)."""
    tree = [process, *psutil.Process(process.pid).children(recursive=True)]
    os.killpg(process.pid, signal.SIGKILL)
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            proc.kill()
    process.wait(timeout=60)


def test_a_killed_job_rerun_finishes_the_rest_without_redoing_lines(tmp_path: Path) -> None:
    count = 200
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(batch_line(f"r{i}", "/v1/completions", {
        "model": "tiny", "prompt": f"row {i}", "max_tokens": 24, "structured_outputs": {"regex": "[a-z]{20}"}})
        + "\n" for i in range(count)))
    out, config = tmp_path / "results.jsonl", write_config(tmp_path)
    job = subprocess.Popen([SERVE_APP, "batch", config, "--input", str(requests), "--output", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (out.exists() and out.read_text().count("\n") >= 1) and job.poll() is None:
        assert time.monotonic() < deadline, "no line written"
        time.sleep(0.05)
    kill_tree(job)
    first_run = out.read_text()
    written = first_run.count("\n")
    assert 1 <= written < count, written
    again = run_batch(config, "--input", str(requests), "--output", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{count - written} lines written ({written} already done)" in again.stderr
    final = out.read_text()
    assert final.startswith(first_run[:first_run.rindex("\n") + 1])  # what was written stays as it was
    ids = [line["custom_id"] for line in read_lines(out)]
    assert sorted(ids) == sorted(f"r{i}" for i in range(count))  # each line once


def test_a_parquet_table_with_a_schema_gives_a_parquet_of_valid_answers(tmp_path: Path) -> None:
    import jsonschema
    import pandas as pd

    docs = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"doc": [f"Person {i} is {20 + i}." for i in range(12)] + [None],
                             "id": [f"d{i}" for i in range(13)]}), docs, row_group_size=5)
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    out = tmp_path / "people.parquet"
    done = run_batch(write_config(tmp_path), "--input", str(docs), "--prompt-column", "doc", "--id-column", "id",
                     "--schema", str(schema), "--max-tokens", "48", "--output", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_parquet(out).set_index("custom_id")
    assert sorted(table.index) == sorted(f"d{i}" for i in range(13))
    assert table.loc["d12", "status_code"] == 400  # the row with no text
    answered = table.drop(index="d12")
    assert set(answered["status_code"]) == {200} and answered["valid"].all()
    for content in answered["content"]:
        jsonschema.validate(json.loads(content), PERSON)


@pytest.mark.parametrize("args", [["--prompt-column", "doc"], ["--schema", "x.json"]])
def test_table_options_are_checked_before_ray_starts(tmp_path: Path, args: list[str]) -> None:
    started = time.monotonic()
    done = run_batch(write_config(tmp_path), "--input", str(tmp_path / "missing.jsonl"), "--output",
                     str(tmp_path / "o.jsonl"), *args, timeout=60)
    assert done.returncode != 0 and "error" in done.stderr
    assert time.monotonic() - started < 60
