"""The evaluation harness (tooling): benchmark suites, judges, a resumable sharded runner and reports.

``lambda-eclipse evaluate SUITE`` runs :func:`~lambda_eclipse.eval.harness.evaluate`; see the README's
"Evaluating on the paper's benchmarks".
"""

from .harness import EvalSpec, evaluate
from .metrics import DEFAULT_CLIP, DEFAULT_DINO, ClipJudge, DinoJudge, Judges, load_judges
from .runner import GenerationConfig
from .suites import SUITES, Suite, build_suite

__all__ = ["EvalSpec", "evaluate", "DEFAULT_CLIP", "DEFAULT_DINO", "ClipJudge", "DinoJudge", "Judges", "load_judges",
           "GenerationConfig", "SUITES", "Suite", "build_suite"]
