"""Prior training (Eq. 1 on interleaved features) and decoder fine-tuning; never imported by the core library."""

from .config import DataConfig, LossConfig, ModelConfig, OptimConfig, TrainConfig, load_config
from .loop import evaluate, train_prior

__all__ = ["DataConfig", "LossConfig", "ModelConfig", "OptimConfig", "TrainConfig", "evaluate", "load_config", "train_prior"]
