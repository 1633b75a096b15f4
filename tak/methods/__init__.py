"""Training methods: the registry (names, paper defaults), what each trains (trainees), the drift
penalties and the per-batch objective."""
from .objective import Objective, along_path_alpha, distillation_loss, make_trainee
from .penalties import CurvaturePenalty, TauJpPenalty, layer_weights, penalized_parameters
from .registry import METHODS, Method, clip_architecture, get_method, hyperparameter_defaults
from .trainees import LinearTrainee, LoRATrainee, NonlinearTrainee, attention_only, trainable_names

__all__ = ["METHODS", "Method", "clip_architecture", "get_method", "hyperparameter_defaults", "Objective",
           "CurvaturePenalty", "TauJpPenalty", "layer_weights", "penalized_parameters", "along_path_alpha",
           "distillation_loss", "make_trainee", "LinearTrainee", "NonlinearTrainee", "LoRATrainee", "attention_only",
           "trainable_names"]
