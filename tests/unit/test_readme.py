"""The README's examples are run, and its generated table is current."""

import re
from pathlib import Path

from serve_app.engine.schema_support import keyword_table_markdown

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_keyword_table_is_generated_from_code():
    assert keyword_table_markdown() in README.read_text()


def test_readme_engine_example_runs(capsys):
    text = README.read_text()
    section = text[text.index("## Use the engine in-process"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    first_line = capsys.readouterr().out.splitlines()[0]
    assert first_line.startswith("stop True {")
