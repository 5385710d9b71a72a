"""A batch's files: the input cut into chunks the job reads in parallel (JSONL byte ranges of
LINES_PER_CHUNK lines, Parquet row groups), and the output, appended as results arrive and read
back on a rerun so that finished lines are skipped.

Memory stays bounded whatever the input's size: the driver keeps one (offset, line) pair per
chunk and the keys already written; a line is read whole only up to the body limit (a longer
one is answered 413 unread, like an HTTP body over `max_body_bytes`).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve_app.bulk.items import Item, TableTemplate, item_key, parse_line, refused
from serve_app.errors import InvalidRequestError, PayloadTooLargeError, ServeAppError

LINES_PER_CHUNK = 128
READ_BLOCK = 1 << 20
# Parquet output is written in parts of at most this many rows, or what arrived in PART_SECONDS.
PART_ROWS = 1024
PART_SECONDS = 20.0


def is_parquet(path: str | Path) -> bool:
    return str(path).rstrip("/").endswith(".parquet")


def _lines(path: str, start: int = 0, end: int | None = None, limit: int = 1 << 62) -> Iterator[tuple[int, bytes]]:
    """(byte offset of the next line, this line's first `limit + 1` bytes) for each line in
    [start, end); a longer line is skipped through in blocks, never held whole."""
    with open(path, "rb") as f:
        f.seek(start)
        offset = start
        while end is None or offset < end:
            head = f.readline(limit + 1)
            if not head:
                return
            offset += len(head)
            rest = head
            while not rest.endswith(b"\n") and len(head) > limit:  # skip the rest of a long line
                rest = f.readline(READ_BLOCK)
                if not rest:
                    break
                offset += len(rest)
            yield offset, head


@dataclass(frozen=True)
class Source:
    """The input: OpenAI batch lines (`template` None) or a table (JSONL rows or Parquet)."""

    path: str
    max_body_bytes: int
    max_json_depth: int
    template: TableTemplate | None = None

    def chunks(self) -> list[dict[str, Any]]:
        if is_parquet(self.path):
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(self.path).metadata
            firsts = [sum(meta.row_group(g).num_rows for g in range(i)) for i in range(meta.num_row_groups)]
            return [{"group": i, "start": 0, "end": 0, "first_line": first + 1} for i, first in enumerate(firsts)]
        chunks, start, line = [], 0, 1
        for count, (offset, _) in enumerate(_lines(self.path, limit=READ_BLOCK), start=1):
            if count % LINES_PER_CHUNK == 0:
                chunks.append({"group": -1, "start": start, "end": offset, "first_line": line})
                start, line = offset, count + 1
        if os.path.getsize(self.path) > start:
            chunks.append({"group": -1, "start": start, "end": os.path.getsize(self.path), "first_line": line})
        return chunks

    def items(self, chunk: dict[str, Any]) -> Iterator[Item]:
        if chunk["group"] >= 0:
            yield from self._table_rows(chunk)
            return
        line = chunk["first_line"]
        for _, text in _lines(self.path, chunk["start"], chunk["end"], self.max_body_bytes):
            if text.strip():  # blank lines are not requests
                yield self._table_line(text, line) if self.template else parse_line(
                    text.rstrip(b"\r\n"), line, self.max_body_bytes, self.max_json_depth)
            line += 1

    def _table_line(self, text: bytes, line: int) -> Item:
        from serve_app.api.body import load_json

        assert self.template is not None
        if len(text) > self.max_body_bytes:
            return refused(line, None, PayloadTooLargeError(f"row over {self.max_body_bytes} bytes",
                                                            code="max_body_bytes"))
        try:
            row = load_json(text, self.max_json_depth)
        except ServeAppError as error:
            return refused(line, None, error)
        if not isinstance(row, dict):
            return refused(line, None, InvalidRequestError("each row must be a JSON object", code="invalid_json"))
        return self.template.item(row, line)

    def _table_rows(self, chunk: dict[str, Any]) -> Iterator[Item]:
        import pyarrow.parquet as pq

        assert self.template is not None, "a Parquet input is a table: give --prompt-column"
        line = chunk["first_line"]
        columns = [c for c in (self.template.prompt_column, self.template.id_column) if c]
        for batch in pq.ParquetFile(self.path).iter_batches(LINES_PER_CHUNK, [chunk["group"]], columns):
            for row in batch.to_pylist():
                yield self.template.item(row, line)
                line += 1


# -- the output ----------------------------------------------------------------------------------


def content_of(body: dict[str, Any]) -> str | None:
    """The answer's text, whatever the route: a choice's message or text, a Response's output text."""
    choices = body.get("choices")
    if isinstance(choices, list) and choices:
        choice = choices[0]
        message = choice.get("message") or {}
        calls = message.get("tool_calls")
        return json.dumps(calls) if calls else message.get("content", choice.get("text"))
    if isinstance(body.get("output"), list):
        return "".join(part.get("text", "") for item in body["output"] if item.get("type") == "message"
                       for part in item.get("content", []))
    text = body.get("text")
    return text if isinstance(text, str) else None


class JsonlOutput:
    """Result lines appended and flushed as each block of answers arrives."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file: Any = None

    def done_keys(self) -> set[str]:
        """Keys already written; a last line cut short by a crash is removed first."""
        if not os.path.exists(self.path):
            return set()
        keys, kept = set(), 0
        for offset, text in _lines(self.path):
            if not text.endswith(b"\n"):
                break
            kept = offset
            line = json.loads(text)
            keys.add(item_key(line.get("custom_id"), line.get("line")))
        if kept < os.path.getsize(self.path):
            os.truncate(self.path, kept)
        return keys

    def write(self, answers: list[str]) -> None:
        if self.file is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self.file.write("".join(f"{a}\n" for a in answers))
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class ParquetOutput:
    """A directory of Parquet parts (each written whole, then renamed into place), one row per
    result with flat columns: custom_id, line, status_code, valid, content and the response body."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        self.since = time.monotonic()

    def done_keys(self) -> set[str]:
        import pyarrow.parquet as pq

        if not self.path.exists():
            return set()
        for partial in self.path.glob("*.tmp"):
            partial.unlink()
        keys: set[str] = set()
        for part in sorted(self.path.glob("*.parquet")):
            table = pq.read_table(part, columns=["custom_id", "line"])
            ids, lines = table["custom_id"].to_pylist(), table["line"].to_pylist()
            keys.update(item_key(c, n) for c, n in zip(ids, lines, strict=True))
        return keys

    def write(self, answers: list[str]) -> None:
        for text in answers:
            line = json.loads(text)
            body = line["response"]["body"]
            valid = [c.get("valid") for c in body.get("choices", [])] or [body.get("valid")]
            self.rows.append({"custom_id": line["custom_id"], "line": line.get("line"),
                              "status_code": line["response"]["status_code"],
                              "valid": valid[0], "content": content_of(body), "response": json.dumps(body)})
        if len(self.rows) >= PART_ROWS or time.monotonic() - self.since >= PART_SECONDS:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.rows:
            self.path.mkdir(parents=True, exist_ok=True)
            name = f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
            pq.write_table(pa.Table.from_pylist(self.rows, schema=part_schema()), self.path / f"{name}.tmp")
            os.replace(self.path / f"{name}.tmp", self.path / name)
        self.rows, self.since = [], time.monotonic()

    def close(self) -> None:
        self.flush()


def part_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("custom_id", pa.string()), ("line", pa.int64()), ("status_code", pa.int32()),
                      ("valid", pa.bool_()), ("content", pa.string()), ("response", pa.string())])


def output_for(path: str) -> JsonlOutput | ParquetOutput:
    return ParquetOutput(path) if is_parquet(path) else JsonlOutput(path)
