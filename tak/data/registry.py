"""The task registry: a name maps to a factory ``factory(root, seed=0, **options) -> Task`` and a
one-line description. ``tak.data.text`` and ``tak.data.vision`` register the built-in tasks.

``{name}-part{k}of{n}`` names part ``k`` of the registered task ``name`` cut into ``n`` tasks of
disjoint classes (``partition_classes``, seed 0; TAK Sec. F.7 cuts ImageNet-R into 10 parts, RESISC45
into 9 and EuroSAT into 5); ``expand_parts`` turns ``{name}-part*of{n}`` into all ``n`` of them."""
import os
import re
from collections.abc import Callable

from .splits import check_int, partition_classes, subsample_task
from .task import Task

_NUMBER = r"(?:0|[1-9]\d*)"  # no leading zeros: one name per part
_PART = re.compile(rf"(?P<name>.+)-part(?P<k>{_NUMBER})of(?P<n>{_NUMBER})")
_ALL_PARTS = re.compile(rf"(?P<name>.+)-part\*of(?P<n>{_NUMBER})")

_TASKS: dict[str, tuple[Callable[..., Task], str]] = {}


def register_task(name: str, factory: Callable[..., Task], description: str) -> None:
    """Register ``factory(root, seed=0, **options) -> Task`` under ``name``."""
    if name in _TASKS:
        raise ValueError(f"task {name!r} is already registered")
    if not callable(factory):
        raise TypeError(f"register_task({name!r}): factory must be callable (root, seed=0, **options) -> Task, "
                        f"got {factory!r}")
    _TASKS[name] = (factory, description)


def list_tasks() -> dict[str, str]:
    """Every registered task name (sorted) with its one-line description."""
    return {name: _TASKS[name][1] for name in sorted(_TASKS)}


def expand_parts(names: list[str]) -> list[str]:
    """``names`` with each ``{name}-part*of{n}`` replaced by its ``n`` parts ``{name}-part0of{n}``, ...,
    ``{name}-part{n-1}of{n}`` (a list of tasks written once for the class-partition protocol)."""
    out = []
    for name in names:
        every = _ALL_PARTS.fullmatch(name)
        out += [f"{every['name']}-part{k}of{every['n']}" for k in range(int(every["n"]))] if every else [name]
    return out


def data_root(root: str | None) -> str:
    """``root``, else ``$TAK_DATA_ROOT``, else ``./data``; tasks that ship their data ignore it."""
    return os.path.expanduser(root or os.environ.get("TAK_DATA_ROOT") or "data")


def get_task(name: str, root: str | None = None, *, max_train: int | None = None, max_test: int | None = None,
             seed: int = 0, **options) -> Task:
    """The task ``name``, its files looked up under ``root`` (see ``data_root``) when it needs any.

    ``seed`` draws the val split from train; ``max_train`` / ``max_test`` keep deterministic
    class-stratified subsamples (train with ``seed``, test with seed 0); other options go to the
    factory."""
    if not isinstance(name, str):
        raise TypeError(f"get_task: name must be a task name (str), got {name!r}")
    check_int(seed, "get_task: seed", 0)
    part = _PART.fullmatch(name)
    if part and name not in _TASKS and part["name"] in _TASKS:
        k, n = int(part["k"]), int(part["n"])
        if not 0 <= k < n:
            raise ValueError(f"task {name!r}: part {k} of {n} does not exist (parts are numbered 0..{n - 1})")
        task = partition_classes(get_task(part["name"], root, seed=seed, **options), n)[k]
    elif name in _TASKS:
        task = _TASKS[name][0](data_root(root), seed=seed, **options)
    else:
        raise ValueError(f"unknown task {name!r}; valid names: {', '.join(sorted(_TASKS))}, and "
                         "<name>-part<k>of<n> for part k of a task cut into n tasks of disjoint classes")
    if max_train is None and max_test is None:
        return task
    return subsample_task(task, max_train, max_test, seed)
