"""The evaluation harness (tooling): benchmark suites, judges, a resumable sharded runner and reports.

``lambda-eclipse evaluate SUITE`` runs :func:`~lambda_eclipse.eval.harness.evaluate`; see the README's
"Evaluating on the paper's benchmarks". Importing this package is light (the CLI's parser reads the defaults
below); the names it exports load their modules (and torch) on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

DEFAULT_DINO = "facebook/dino-vits16"  # ViT-S/16 DINO (DreamBooth's DINO metric)
DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # CLIP-I / CLIP-T backbone; not pinned by the paper (FACTS §4d)

_EXPORTS = {
    "EvalSpec": "harness", "evaluate": "harness", "ClipJudge": "metrics", "DinoJudge": "metrics", "Judges": "metrics",
    "load_judges": "metrics", "GenerationConfig": "runner", "SUITES": "suites", "Suite": "suites",
    "build_suite": "suites", "compare_runs": "compare",
}
__all__ = ["DEFAULT_CLIP", "DEFAULT_DINO", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
