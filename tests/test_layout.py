"""House rules of the code layout: the core never imports the tooling, and importing it stays light."""

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lambda_eclipse"
CORE = ["prior.py", "conditioning.py", "encoders.py", "pipeline.py", "errors.py", "__init__.py"]
TOOLING = {"features", "build", "train", "eval", "miniworld", "app", "cli", "losses"}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from .features import x / from . import train
                names.add(module.split(".")[0] if module else "")
                names.update(a.name.split(".")[0] for a in node.names if not module)
            elif module.startswith("lambda_eclipse."):
                names.add(module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("lambda_eclipse."))
    return names


def test_core_does_not_import_tooling():
    for name in CORE:
        assert not imported_modules(SRC / name) & TOOLING, name


def test_importing_the_package_loads_no_tooling():
    code = ("import sys, lambda_eclipse; bad = [m for m in sys.modules if m.split('.')[:2] and m.startswith('lambda_eclipse.')"
            " and m.split('.')[1] in %r]; print(bad)" % sorted(TOOLING))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
