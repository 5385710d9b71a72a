"""The house rule "the router never imports the engine": the router, api/, relay and metrics
import neither torch nor serve_app.engine, read from their code and from a fresh interpreter."""

import ast
import subprocess
import sys
from pathlib import Path

import serve_app

PACKAGE = Path(serve_app.__file__).parent
# What the ingress side is made of: none of it may reach the engine.
INGRESS = ["router.py", "app.py", "relay.py", "metrics.py", "guard.py", "model_queue.py", "generation.py",
           "status.py", *(f"api/{p.name}" for p in (PACKAGE / "api").glob("*.py"))]


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_ingress_module_imports_the_engine_or_torch():
    offenders = {name: sorted(m for m in imported_modules(PACKAGE / name)
                              if m.startswith(("serve_app.engine", "torch", "transformers", "outlines", "vllm")))
                 for name in INGRESS if (PACKAGE / name).exists()}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_router_never_imports_torch_or_outlines():
    code = ("import sys, serve_app.router, serve_app.app; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'outlines', 'transformers', 'vllm') "
            "or m.startswith('serve_app.engine')]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
