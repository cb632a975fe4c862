"""Training: one core (:mod:`.core`) with the objectives plugged in — the prior (Eq. 1, :mod:`.prior`) and the
decoder UNet (Eq. 2, :mod:`.decoder`). Never imported by the core library."""

from .config import DataConfig, LossConfig, ModelConfig, OptimConfig, TrainConfig, load_config
from .core import LoopSettings, Objective, TrainingRun, run_training
from .prior import PriorObjective, evaluate, train_prior

__all__ = [
    "DataConfig", "LossConfig", "LoopSettings", "ModelConfig", "Objective", "OptimConfig", "PriorObjective",
    "TrainConfig", "TrainingRun", "evaluate", "load_config", "run_training", "train_prior",
]
