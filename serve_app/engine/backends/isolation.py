"""Running a backend's compiler where its misbehaviour cannot hurt the replica: in a forked
child that is killed at the timeout (outlines_core), or with the C++ stderr captured, where a
library reports what it approximated (xgrammar)."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

from serve_app.errors import ConstraintError, LimitExceededError

_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Lines written to file descriptor 2 (where C++ libraries log) inside the block; lines that
    other threads wrote meanwhile are passed on to the real stderr afterwards."""
    lines: list[str] = []
    with _STDERR_LOCK, tempfile.TemporaryFile() as scratch:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(scratch.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            scratch.seek(0)
            for line in scratch.read().decode(errors="replace").splitlines():
                lines.append(line)
                if "/project/cpp/" not in line:  # xgrammar's own log lines
                    print(line, file=sys.stderr)


def _index_child(conn: Any, source: str, is_schema: bool, vocabulary: Any, whitespace: str) -> None:
    import pickle

    from outlines_core import Index
    from outlines_core.json_schema import build_regex_from_schema

    try:
        regex = build_regex_from_schema(source, whitespace) if is_schema else source
        conn.send(("ok", pickle.dumps(Index(regex, vocabulary))))
    except Exception as error:  # outlines_core raises plain exceptions for unbuildable input
        conn.send(("error", str(error)))
    finally:
        conn.close()


def build_index_in_child(source: str, is_schema: bool, vocabulary: Any, timeout_s: float, whitespace: str) -> Any:
    """outlines_core's index for `source`, built in a forked child that is killed at the timeout
    (a thread could not be stopped, and the DFA can take minutes and gigabytes)."""
    import multiprocessing
    import pickle

    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_index_child, args=(sender, source, is_schema, vocabulary, whitespace), daemon=True)
    child.start()
    sender.close()
    try:
        if not receiver.poll(timeout_s):
            raise LimitExceededError(f"compiling with outlines_core took longer than limits.compile_timeout_s "
                                     f"({timeout_s:g} s)", param="constraint", code="compile_timeout_s")
        status, payload = receiver.recv()
    except EOFError:
        status, payload = "error", f"the compiler process died (exit code {child.exitcode})"
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receiver.close()
    if status != "ok":
        raise ConstraintError(f"outlines_core cannot compile this constraint: {payload}", param="constraint",
                              code="unsupported")
    return pickle.loads(payload)
