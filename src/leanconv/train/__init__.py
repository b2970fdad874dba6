"""Training: the recipe (TrainConfig, from defaults, a YAML/TOML file and
flags), the loop with exact resume and DDP, evaluation, and checkpoints that
rebuild their model."""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import AMP_MODES, SCHEDULES, TrainConfig, load_config_file
from .loop import autocast_context, build_model, evaluate, load_trained_model, model_spec, train
from .schedule import LRSchedule

__all__ = [
    "AMP_MODES", "LRSchedule", "SCHEDULES", "TrainConfig", "autocast_context", "build_model", "evaluate",
    "load_checkpoint", "load_config_file", "load_trained_model", "model_spec", "save_checkpoint", "train",
]
