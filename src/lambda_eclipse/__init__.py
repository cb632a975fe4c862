"""λ-ECLIPSE: zero-shot single- and multi-subject personalized text-to-image generation in the CLIP latent space.

The core library is the prior (:class:`LambdaEclipsePrior`), the λ binding (:mod:`lambda_eclipse.conditioning`),
the CLIP encoders (:mod:`lambda_eclipse.encoders`) and the pipeline (:class:`LambdaEclipsePipeline`). Tooling
(feature store, dataset builder, training, evaluation, miniature world, demo) lives in sub-packages that the core
never imports.
"""

from .conditioning import bind_subjects, interleave_prompts, locate_subject_tokens, subject_token_index
from .errors import UserError
from .pipeline import LambdaEclipsePipeline, LambdaEclipsePipelineOutput, LambdaEclipsePriorOutput
from .prior import LambdaEclipsePrior

__version__ = "0.1.0"

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
