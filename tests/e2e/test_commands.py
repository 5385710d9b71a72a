"""The commands the README documents, run as a user runs them: `make bench QUICK=1`, and
`make serve` answering the README's own curl examples."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
START_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_make_bench_quick_prints_its_table_and_writes_its_results(tmp_path):
    done = subprocess.run(["make", "bench", "QUICK=1", f"BENCH_OUT={tmp_path}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "throughput.json").read_text())["results"]
    assert {"P1", "P2_b1", "P2_b8", "P3", "P4", "P6_ms"} <= set(results)
    assert all(value > 0 for key, value in results.items() if key != "P6_ms")
    assert "cached lookup + matcher" in done.stdout  # bench/compile_cache.py ran too
    assert (tmp_path / "throughput_ratios.png").stat().st_size > 0


def readme_curls(port: int) -> list[str]:
    text = README.read_text()
    block = text[text.index("```sh\ncurl"):]
    block = block[:block.index("```", 3)].removeprefix("```sh\n")
    return [c.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for c in re.split(r"\n\n(?=curl)", block.strip())]


@pytest.mark.slow
def test_make_serve_answers_the_readme_curl_examples():
    port = free_port()
    server = subprocess.Popen(["make", "serve", f"PORT={port}"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert server.poll() is None, server.stdout.read() if server.stdout else ""
        answers = [json.loads(subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300,
                                             check=True).stdout) for command in readme_curls(port)]
        assert len(answers) == 2
        person = json.loads(answers[0]["choices"][0]["message"]["content"])
        assert isinstance(person["name"], str) and isinstance(person["age"], int)
        assert answers[1]["text"] in ("yes", "no") and answers[1]["valid"] is True
    finally:
        stop_serving(server)


def stop_serving(server: subprocess.Popen) -> None:
    """Ctrl-C to the server itself (not to its process group, where Ray's own processes would
    die before it shuts them down and leave their workers behind); make exits after it."""
    import psutil

    for child in psutil.Process(server.pid).children(recursive=True):
        if "serve_app.serve" in " ".join(child.cmdline()):
            child.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@pytest.mark.slow
def test_the_peers_bench_runs_against_serve_app_and_writes_its_table(tmp_path):
    """`make bench-peers` needs vLLM's venv, which `make test` never installs; its harness (start,
    workloads over HTTP, validation, table, JSON, PNG) runs here against serve_app alone."""
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "applications:\n  - name: serve_app\n    route_prefix: /\n    import_path: serve_app.app:build_app\n"
        "    args:\n      models:\n        - name: tiny\n          source: builtin:tiny-random-llama\n"
        "          limits: {max_new_tokens: 512}\n")
    done = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "bench/peers.py", "--servers", "serve_app",
                           "--quick", "--config", str(config), "--served-model", "tiny", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| person |" in done.stdout and "| free |" in done.stdout
    results = json.loads((tmp_path / "peers.json").read_text())["servers"]["serve_app"]["workloads"]
    for name, outcome in results.items():
        assert outcome["errors"] == {}, (name, outcome)
        assert outcome["tok_s"] > 0 and outcome["requests"] > 0
        if name != "free":
            assert outcome["valid"] + outcome["cut"] + outcome["invalid"] == outcome["requests"]
            assert outcome["invalid"] == 0  # never a finished answer that breaks its schema
    assert (tmp_path / "peers.png").stat().st_size > 0


@pytest.mark.slow
def test_serve_app_run_model_serves_a_local_directory_without_a_config(tiny_model_dir):
    """`serve-app run --model DIR`: no YAML; progress while it starts, then the usual routes. The
    test waits on the CLI's own "ready" line (it polls /readyz itself), not on its own probe."""
    import threading

    port = free_port()
    server = subprocess.Popen([str(ROOT / ".venv" / "bin" / "serve-app"), "run", "--model", tiny_model_dir,
                               "--port", str(port), "--timeout-s", str(START_TIMEOUT_S)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert server.stdout is not None
        for line in server.stdout:
            lines.append(line)
            if "serve_app is ready" in line:
                ready.set()
        ready.set()  # the CLI exited: the assertions below say why

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(START_TIMEOUT_S) and server.poll() is None, "".join(lines)[-3000:]
        base = f"http://127.0.0.1:{port}"
        assert [m["id"] for m in httpx.get(f"{base}/v1/models", timeout=30).json()["data"]] == ["tiny-random-llama"]
        answer = httpx.post(f"{base}/v1/chat/completions", timeout=300, json={
            "model": "tiny-random-llama", "messages": [{"role": "user", "content": "hi"}],
            "structured_outputs": {"choice": ["yes", "no"]}}).json()
        assert answer["choices"][0]["message"]["content"] in ("yes", "no") and answer["choices"][0]["valid"]
    finally:
        server.send_signal(signal.SIGINT)  # the CLI itself shuts Ray down on Ctrl-C
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        reader.join(timeout=30)
    output = "".join(lines)
    assert "waiting: " in output and "shutting down" in output, output[-3000:]
