"""The README and docs/ stay true to the code: generated blocks are current, every code block
parses (and the README's engine example runs), the README stays short, and its architecture
picture names every module."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tomllib
import yaml

from serve_app.config import config_reference
from serve_app.constraints.keywords import keyword_table_markdown

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
README_LIMIT_BYTES = 16 * 1024


def blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), re.S)


def test_the_keyword_table_is_generated_from_code():
    assert keyword_table_markdown() in (ROOT / "docs" / "json-schema.md").read_text()


def test_the_config_reference_is_generated_from_the_models():
    assert f"```yaml\n{config_reference()}```" in (ROOT / "docs" / "operations.md").read_text()


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_every_code_block_parses(path):
    for code in blocks(path, "python"):
        compile(code, str(path), "exec")
    for text in blocks(path, "yaml"):
        assert isinstance(yaml.safe_load(text), dict)
    for text in blocks(path, "json"):
        json.loads(text)


def test_the_readme_is_short_and_links_every_doc():
    text = README.read_text()
    assert len(text.encode()) < README_LIMIT_BYTES
    for doc in DOCS:
        assert f"(docs/{doc.name})" in text


def test_the_readme_architecture_names_every_module():
    picture = README.read_text().split("## Architecture", 1)[1].split("\n## ", 1)[0]
    modules = [p for p in (ROOT / "serve_app").rglob("*.py") if p.name != "__init__.py"]
    missing = [str(p.relative_to(ROOT)) for p in modules if p.name not in picture and p.stem not in picture]
    assert not missing, missing


@pytest.mark.slow  # it loads SmolLM2
def test_readme_engine_example_runs(capsys):
    text = README.read_text()
    section = text[text.index("## Use the engine in-process"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    first_line = capsys.readouterr().out.splitlines()[0]
    assert first_line.startswith("stop True {")


def test_the_license_file_is_the_one_pyproject_declares():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]["text"]
    assert declared == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_every_grafana_query_names_a_metric_we_emit():
    from prometheus_client.core import Metric

    from serve_app.metrics import CLUSTER_METRICS, RouterMetrics

    families: list[Metric] = list(RouterMetrics().registry.collect())
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    emitted = {f.name + suffix for f in families for suffix in suffixes.get(f.type, ("",))}
    for name, (kind, _, _) in CLUSTER_METRICS.items():  # Ray exports them as ray_<name>
        emitted |= {f"ray_{name}{suffix}" for suffix in suffixes[kind if kind != "counter" else "gauge"]}
    dashboard = json.loads((ROOT / "cluster" / "grafana_dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"\b(?:ray_)?serve_app_[a-z0-9_]+", target["expr"])}
    assert queried and queried <= emitted, sorted(queried - emitted)
    assert {"ray_serve_app_e2e_request_latency_seconds_bucket", "ray_serve_app_request_finished_total",
            "ray_serve_app_prompt_tokens_total", "ray_serve_app_queue_time_seconds_bucket"} <= queried
