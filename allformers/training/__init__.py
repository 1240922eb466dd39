"""Training, the engine: one Trainer for every objective, data samplers, MFU, loss plots and the
RL trainers (reward model, PPO, DPO). Named experiments live in allformers.recipes."""
from .data import Corpus, DataError, RandomWindows, char_corpus, default_data_root, tiny_shakespeare_path
from .mfu import flops_per_token, measured_peak_flops
from .trainer import TrainConfig, Trainer, TrainingError, build_optimizer, decay_groups, lr_at

__all__ = ["Trainer", "TrainConfig", "TrainingError", "build_optimizer", "decay_groups", "lr_at",
           "RandomWindows", "Corpus", "DataError", "char_corpus", "default_data_root", "tiny_shakespeare_path",
           "flops_per_token", "measured_peak_flops"]
