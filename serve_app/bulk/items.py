"""What a batch is made of: an item per input line (the OpenAI batch file format) or table row,
and one result line per item in the OpenAI batch output format:

    in:  {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
    out: {"id": "batch_req_...", "custom_id": "a", "response": {"status_code": 200, "request_id": ...,
          "body": {...}}, "error": null}

A line that is not such a request (malformed JSON, no body, a url we do not serve) is answered
here, with the status and error body the HTTP API gives the same mistake. A line without a
string custom_id is keyed by its line number (and its result line says `"line": N`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from serve_app.api.body import load_json
from serve_app.errors import InvalidRequestError, PayloadTooLargeError, RouteError, ServeAppError

# The routes a batch line may name (`/v1/generate` is our native API).
URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/generate")
CHAT_URL = "/v1/chat/completions"


@dataclass
class Item:
    line: int  # 1-based, in the input file (or the table's row number)
    custom_id: str | None
    url: str = CHAT_URL
    body: dict[str, Any] | None = None
    # Set where the line itself is the mistake: (status, error body), answered without a model.
    error: tuple[int, dict[str, Any]] | None = None

    @property
    def key(self) -> str:
        return item_key(self.custom_id, self.line)

    @property
    def model(self) -> str | None:
        model = (self.body or {}).get("model")
        return model if isinstance(model, str) else None

    def dumps(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def loads(cls, text: str) -> Item:
        data = json.loads(text)
        error = data.pop("error")
        return cls(**data, error=tuple(error) if error is not None else None)


def item_key(custom_id: Any, line: Any) -> str:
    """The identity a rerun skips by: the custom_id, else the line number (never the same text)."""
    return f"id:{custom_id}" if isinstance(custom_id, str) else f"line:{line}"


def refused(line: int, custom_id: str | None, error: ServeAppError, url: str = CHAT_URL) -> Item:
    return Item(line, custom_id, url, None, (error.status_code, error.to_dict()))


def parse_line(text: str | bytes, line: int, max_body_bytes: int, max_json_depth: int) -> Item:
    """One input line as an item; the HTTP API's checks of a body's bytes and JSON come first."""
    if len(text) > max_body_bytes:
        return refused(line, None, PayloadTooLargeError(f"request body over {max_body_bytes} bytes",
                                                        code="max_body_bytes"))
    try:
        data = load_json(text, max_json_depth + 1)
    except ServeAppError as error:
        return refused(line, None, error)
    if not isinstance(data, dict):
        return refused(line, None, InvalidRequestError("each line must be a JSON object with custom_id, method, "
                                                       "url and body", code="invalid_json"))
    custom_id = data.get("custom_id")
    custom_id = custom_id if isinstance(custom_id, str) else None
    url = data.get("url")
    if data.get("method", "POST") != "POST":
        return refused(line, custom_id, RouteError("method: a batch line is a POST", 405, "method", "405"))
    if url not in URLS:
        return refused(line, custom_id, RouteError(f"url: {str(url)[:200]!r} is not served; give one of "
                                                   f"{', '.join(URLS)}", 404, "url", "404"))
    body = data.get("body")
    if not isinstance(body, dict):
        return refused(line, custom_id, InvalidRequestError("body: the request body must be a JSON object",
                                                            param="body", code="invalid_json"), url)
    if not isinstance(data.get("custom_id"), str):
        return refused(line, None, InvalidRequestError("custom_id: give a string, unique in the file",
                                                       param="custom_id", code="invalid_value"), url)
    return Item(line, custom_id, url, body)


@dataclass(frozen=True)
class TableTemplate:
    """How a table row becomes a chat request: its prompt column as the user message, under an
    optional system message, answered under `schema` (strict) when one is given."""

    model: str
    prompt_column: str
    id_column: str | None = None
    schema: dict[str, Any] | None = None
    system: str | None = None
    max_tokens: int | None = None

    def item(self, row: dict[str, Any], line: int) -> Item:
        custom = row.get(self.id_column) if self.id_column else None
        custom_id = str(custom) if custom is not None else None
        prompt = row.get(self.prompt_column)
        if not isinstance(prompt, str):
            return refused(line, custom_id, InvalidRequestError(
                f"{self.prompt_column}: this row's prompt column is {type(prompt).__name__}, not text",
                param=self.prompt_column, code="invalid_value"))
        return Item(line, custom_id, CHAT_URL, self.body(prompt))

    def body(self, prompt: str) -> dict[str, Any]:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        body: dict[str, Any] = {"model": self.model, "messages": [*messages, {"role": "user", "content": prompt}]}
        if self.schema is not None:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": self.schema, "strict": True}}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return body


def result_line(item: Item, status: int, body: dict[str, Any]) -> dict[str, Any]:
    """One output line in the OpenAI batch output format (`line` where there is no custom_id)."""
    where = {} if item.custom_id is not None else {"line": item.line}
    return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": item.custom_id, **where,
            "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex[:24]}", "body": body},
            "error": None}
