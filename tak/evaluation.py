"""Accuracy of a backbone's network (at θ0, θ0 + τ, or linearized) on a task split, with its frozen head.

Linearized task vectors evaluate for every α from two feature passes: f_lin(x; θ0 + α τ) =
f0 + α (f_lin(x; θ0 + τ) − f0), so an α grid costs no more forwards (``linear_path_features``).
"""
import contextlib

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .curvature.outputs import to_device
from .replay import FrozenPrefix


def loader(backbone, examples, batch_size: int, *, shuffle: bool = False, generator=None) -> DataLoader:
    """Batches (model inputs, labels) of ``examples`` through ``backbone.collate``."""
    if len(examples) == 0:
        raise ValueError("no examples to evaluate (an empty split)")
    return DataLoader(examples, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=backbone.collate)


@torch.no_grad()
def features(backbone, model, examples, *, batch_size: int = 256, device=None, progress: bool = False,
             desc: str = "features", prefix: FrozenPrefix | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) fp32 on CPU, labels (N,)) of ``model`` (anything ``backbone.features`` takes), its inputs
    on ``device`` (None: the backbone's). ``prefix``: records and replays the layers ``model`` shares with earlier
    passes over ``examples`` (``tak.replay``)."""
    device = backbone.device if device is None else device
    feats, labels = [], []
    was_training = getattr(model, "training", None)
    if was_training:
        model.eval()
    try:
        batches = tqdm(loader(backbone, examples, batch_size), desc=desc, disable=not progress, leave=False)
        for i, (batch, y) in enumerate(batches):
            batch = to_device(batch, device)
            with contextlib.nullcontext() if prefix is None else prefix.batch(model, i, batch):
                feats.append(backbone.features(model, batch).float().cpu())
            labels.append(y)
    finally:
        if was_training:
            model.train()
    return torch.cat(feats), torch.cat(labels)


def accuracy_of_features(head, feats: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy in percent of ``head`` on precomputed features."""
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return 100.0 * (head(feats).argmax(-1) == labels).float().mean().item()


def accuracy(backbone, model, task, split: str, **kw) -> float:
    """Accuracy in percent of ``model`` with ``task``'s frozen head on ``task.split(split)``."""
    feats, labels = features(backbone, model, task.split(split), **kw)
    return accuracy_of_features(backbone.head(task), feats, labels)


def linear_path_features(f0: torch.Tensor, f1: torch.Tensor, alpha: float) -> torch.Tensor:
    """f_lin(θ0 + α τ) from f0 = f(θ0) and f1 = f_lin(θ0 + τ)."""
    return f0 + alpha * (f1 - f0)
