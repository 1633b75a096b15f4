"""The task registry: a name maps to a factory ``factory(root, seed=0, **options) -> Task`` and a
one-line description. ``tak.data.text`` and ``tak.data.vision`` register the built-in tasks."""
import os
from collections.abc import Callable

from .splits import subsample_task
from .task import Task

_TASKS: dict[str, tuple[Callable[..., Task], str]] = {}


def register_task(name: str, factory: Callable[..., Task], description: str) -> None:
    """Register ``factory(root, seed=0, **options) -> Task`` under ``name``."""
    if name in _TASKS:
        raise ValueError(f"task {name!r} is already registered")
    _TASKS[name] = (factory, description)


def list_tasks() -> dict[str, str]:
    """Every registered task name (sorted) with its one-line description."""
    return {name: _TASKS[name][1] for name in sorted(_TASKS)}


def data_root(root: str | None) -> str:
    """``root``, else ``$TAK_DATA_ROOT``, else ``./data``; tasks that ship their data ignore it."""
    return os.path.expanduser(root or os.environ.get("TAK_DATA_ROOT") or "data")


def get_task(name: str, root: str | None = None, *, max_train: int | None = None, max_test: int | None = None,
             seed: int = 0, **options) -> Task:
    """The task ``name``, its files looked up under ``root`` (see ``data_root``) when it needs any.

    ``seed`` draws the val split from train; ``max_train`` / ``max_test`` keep deterministic
    class-stratified subsamples (train with ``seed``, test with seed 0); other options go to the
    factory."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; valid names: {', '.join(sorted(_TASKS))}")
    task = _TASKS[name][0](data_root(root), seed=seed, **options)
    if max_train is None and max_test is None:
        return task
    return subsample_task(task, max_train, max_test, seed)
