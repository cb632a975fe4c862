"""λ-ECLIPSE: zero-shot single- and multi-subject personalized text-to-image generation in the CLIP latent space.

The core library is the prior (:class:`LambdaEclipsePrior`), the λ binding (:mod:`lambda_eclipse.conditioning`),
the CLIP encoders (:mod:`lambda_eclipse.encoders`) and the pipeline (:class:`LambdaEclipsePipeline`). Tooling
(feature store, dataset builder, training, evaluation, miniature world, demo) lives in sub-packages that the core
never imports.

The public names are resolved lazily (PEP 562): ``import lambda_eclipse`` (and so ``lambda-eclipse --help``) loads
neither torch nor diffusers; the first use of, say, ``LambdaEclipsePipeline`` imports its module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import UserError  # dependency-free, so it is imported eagerly

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "LambdaEclipsePipeline": "pipeline",
    "LambdaEclipsePipelineOutput": "pipeline",
    "LambdaEclipsePriorOutput": "pipeline",
    "LambdaEclipsePrior": "prior",
    "bind_subjects": "conditioning",
    "interleave_prompts": "conditioning",
    "locate_subject_tokens": "conditioning",
    "subject_token_index": "conditioning",
}
# Core submodules stay reachable as attributes (``lambda_eclipse.encoders``) as when this file imported them.
_SUBMODULES = {"atomic", "conditioning", "encoders", "errors", "hub", "pipeline", "prior"}

__all__ = [
    "LambdaEclipsePipeline",
    "LambdaEclipsePipelineOutput",
    "LambdaEclipsePrior",
    "LambdaEclipsePriorOutput",
    "UserError",
    "bind_subjects",
    "interleave_prompts",
    "locate_subject_tokens",
    "subject_token_index",
]

if TYPE_CHECKING:  # for type checkers and IDEs only; at run time __getattr__ imports on first use
    from .conditioning import bind_subjects, interleave_prompts, locate_subject_tokens, subject_token_index
    from .pipeline import LambdaEclipsePipeline, LambdaEclipsePipelineOutput, LambdaEclipsePriorOutput
    from .prior import LambdaEclipsePrior


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # cache: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)
