"""House rules of the code layout: the core never imports the tooling, and importing it stays light."""

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lambda_eclipse"
CORE = ["prior.py", "conditioning.py", "encoders.py", "decoding.py", "pipeline.py", "atomic.py", "errors.py", "hub.py",
        "outputs.py", "checks.py", "adapters.py", "interpolation.py", "interpolation_io.py", "controls.py", "memory.py", "inputs.py",
        "__init__.py"]
TOOLING = {"features", "dataset", "train", "eval", "miniworld", "app", "cli", "cli_tools", "losses"}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from .features import x / from . import train
                if module:
                    names.add(module.split(".")[0])
                else:
                    names.update(a.name.split(".")[0] for a in node.names)
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


def test_the_import_scan_sees_every_import_form(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("from .features import x\nfrom . import train\nfrom lambda_eclipse.dataset import y\n"
                      "import lambda_eclipse.miniworld.scenes\nfrom .atomic import atomic_path\n")
    assert imported_modules(sample) == {"features", "train", "dataset", "miniworld", "atomic"}


def test_the_core_list_is_the_package_top_level():
    # a new top-level module must be classified: core (listed) or tooling (a TOOLING name)
    top = {p.name for p in SRC.glob("*.py")} | {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    unclassified = {n for n in top if n not in CORE and n.removesuffix(".py") not in TOOLING}
    assert unclassified == set()


def test_one_atomic_write_helper():
    users = [p for p in SRC.rglob("*.py") if "os.replace" in p.read_text()]
    assert [p.name for p in users] == ["atomic.py"]


def test_input_checks_load_no_model_library_and_know_the_schedulers():
    """`check_inputs` lives where a command can refuse bad input before diffusers or transformers load."""
    code = ("import sys; from lambda_eclipse.inputs import check_inputs, SCHEDULER_NAMES; "
            "print([m for m in ('diffusers', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
    from lambda_eclipse.decoding import SCHEDULERS
    from lambda_eclipse.inputs import SCHEDULER_NAMES

    assert set(SCHEDULER_NAMES) == set(SCHEDULERS)
