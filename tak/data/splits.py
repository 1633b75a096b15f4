"""Deterministic splits of a task's examples: the validation split drawn from train, class-stratified
subsamples, and the class-partition protocol (TAK Sec. F.7: one dataset split into tasks whose class
sets are disjoint; the merged model is then evaluated on the joint problem, all their classes together).

Examples are ``(input, label)`` sequences. A sequence that loads its inputs lazily (images) may offer
``labels`` (all labels, without loading inputs) and ``subset(indices, labels=None)``; these functions
use them when present, so they never load an image.
"""
import functools
import numbers
import warnings
from collections.abc import Sequence

import numpy as np

from .task import SPLITS, Task


def check_int(value, name: str, minimum: int, optional: bool = False) -> None:
    """Refuse ``value`` (the argument ``name``) unless it is an int ≥ ``minimum`` (or None, when ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy integers too
        raise TypeError(f"{name} must be an int{' or None' if optional else ''}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be ≥ {minimum}{' or None' if optional else ''}, got {value!r}")


def labels_of(examples: Sequence) -> list[int]:
    """The label of every example, in order."""
    labels = getattr(examples, "labels", None)
    return list(labels) if labels is not None else [y for _, y in examples]


def take(examples: Sequence, indices, labels=None) -> Sequence:
    """The examples at ``indices``, relabelled with ``labels`` if given."""
    indices = [int(i) for i in indices]
    if hasattr(examples, "subset"):
        return examples.subset(indices, labels)
    if labels is None:
        return [examples[i] for i in indices]
    return [(examples[i][0], int(y)) for i, y in zip(indices, labels)]


def validation_split(examples: Sequence, fraction: float = 0.1, max_size: int | None = 5000,
                     seed: int = 0) -> tuple[Sequence, Sequence]:
    """Split off ``floor(fraction * len)`` examples (at most ``max_size``), chosen at random with
    ``seed``: returns ``(rest, held_out)``, both in their original order."""
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 <= fraction < 1:
        raise ValueError(f"validation_split: fraction must be a number in [0, 1), got {fraction!r}")
    check_int(max_size, "validation_split: max_size", 0, optional=True)
    check_int(seed, "validation_split: seed", 0)
    n = len(examples)
    size = int(fraction * n) if max_size is None else min(int(fraction * n), max_size)
    held = np.zeros(n, dtype=bool)
    held[np.random.default_rng(seed).permutation(n)[:size]] = True
    return take(examples, np.flatnonzero(~held)), take(examples, np.flatnonzero(held))


def stratified_subsample(examples: Sequence, n: int | None, seed: int = 0) -> Sequence:
    """At most ``n`` examples, each class keeping its share (largest remainders round), chosen at
    random with ``seed`` and kept in their original order; all of them if ``n`` is None or large."""
    check_int(n, "stratified_subsample: n", 0, optional=True)
    if n is None or n >= len(examples):
        return examples
    labels = np.asarray(labels_of(examples))
    classes, counts = np.unique(labels, return_counts=True)
    quota = n * counts / counts.sum()
    sizes = np.floor(quota).astype(int)
    sizes[np.argsort(-(quota - sizes), kind="stable")[: n - sizes.sum()]] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == c), k, replace=False) for c, k in zip(classes, sizes)]
    return take(examples, np.sort(np.concatenate(chosen)))


def task_from_splits(name: str, classes: list[str], modality: str, templates: list[str], load_train, load_test,
                     licence: str = "", seed: int = 0, source: str | None = None) -> Task:
    """A task whose val split is ``validation_split(load_train(), seed=seed)`` and train the rest."""
    train_val = functools.cache(lambda: validation_split(load_train(), seed=seed))
    loaders = {"train": lambda: train_val()[0], "val": lambda: train_val()[1], "test": load_test}
    return Task(name, list(classes), modality, list(templates), loaders, licence, source=source)


def subsample_task(task: Task, max_train: int | None = None, max_test: int | None = None, seed: int = 0) -> Task:
    """``task`` with class-stratified subsamples: train to ``max_train`` (with ``seed``), val to
    ``max_train // 9`` (so it stays at most 10% of train and val together), test to ``max_test`` (with
    seed 0, so every seed is evaluated on the same examples)."""
    check_int(max_train, f"task {task.name!r}: max_train", 1, optional=True)
    check_int(max_test, f"task {task.name!r}: max_test", 1, optional=True)
    sizes = {"train": (max_train, seed), "val": (None if max_train is None else max(1, max_train // 9), seed),
             "test": (max_test, 0)}

    def load(split):
        n, split_seed = sizes[split]
        return stratified_subsample(task.split(split), n, split_seed)

    loaders = {s: functools.partial(load, s) for s in SPLITS}
    return Task(task.name, task.classes, task.modality, task.templates, loaders, task.licence, task.parent, task.source)


def subset_classes(task: Task, classes, name: str) -> Task:
    """The task restricted to ``classes`` (names or label indices, in the order given), relabelled
    ``0..len(classes)-1``; its splits are filtered lazily from ``task``'s, and its parent is ``task``
    (or ``task``'s parent)."""
    classes = list(classes)

    def position(c):
        if isinstance(c, numbers.Integral):  # numpy integers too
            return int(c) if 0 <= c < len(task.classes) else None
        return task.classes.index(c) if c in task.classes else None

    index = [position(c) for c in classes]
    new_label = {old: new for new, old in enumerate(index)}
    if None in new_label or len(new_label) != len(index):
        raise ValueError(f"subset_classes: {classes!r} must be distinct classes of task {task.name!r}, "
                         f"as names or indices 0..{len(task.classes) - 1}; its classes: {task.classes}")

    def load(split):
        examples = task.split(split)
        labels = labels_of(examples)
        keep = [i for i, y in enumerate(labels) if y in new_label]
        return take(examples, keep, [new_label[labels[i]] for i in keep])

    loaders = {s: functools.partial(load, s) for s in SPLITS}
    return Task(name, [task.classes[i] for i in index], task.modality, task.templates, loaders, task.licence,
                task.parent or task.name, task.source)


def partition_classes(task: Task, n_parts: int, seed: int = 0, name: str = "{task}-part{k}of{n}") -> list[Task]:
    """The class-partition protocol: the classes of ``task``, shuffled with ``seed``, cut into
    ``n_parts`` disjoint groups of (nearly) equal size; part ``k`` is the task named ``name`` (formatted
    with ``task``, ``k``, ``n``) with that group's classes (in their original order) relabelled from 0.
    Each split of a part is the same split of ``task`` filtered, so a part's val never holds another
    part's train example. The default names are the ones ``tak.data.get_task`` resolves."""
    check_int(n_parts, "partition_classes: n_parts", 1)
    if not 1 <= n_parts <= len(task.classes):
        raise ValueError(f"partition_classes: n_parts must be in 1..{len(task.classes)} (the classes of "
                         f"{task.name!r}), got {n_parts}")
    groups = np.array_split(np.random.default_rng(seed).permutation(len(task.classes)), n_parts)
    return [subset_classes(task, sorted(int(c) for c in g), name.format(task=task.name, k=k, n=n_parts))
            for k, g in enumerate(groups)]


class Joined(Sequence):
    """Examples of several sequences, relabelled, loading an input only when it is accessed:
    ``index[i] = (j, k)`` is example ``k`` of ``sources[j]``, with label ``labels[i]``."""

    def __init__(self, sources: list[Sequence], index: list[tuple[int, int]], labels: list[int]):
        self.sources, self.index, self.labels = sources, list(index), [int(y) for y in labels]

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.subset(range(len(self))[i])
        j, k = self.index[i]
        return self.sources[j][k][0], self.labels[i]

    def subset(self, indices, labels=None):
        indices = list(indices)
        return Joined(self.sources, [self.index[i] for i in indices],
                      [self.labels[i] for i in indices] if labels is None else labels)


def joint_task(parts: list[Task]) -> Task:
    """The joint problem of tasks of disjoint classes (TAK Sec. F.7): every class of ``parts``, part after
    part (part ``i``'s label ``y`` is ``y + `` the class count of the parts before it), each split the
    parts' splits together. Named ``{parent}-joint`` when the parts share a parent."""
    if not parts:
        raise ValueError("joint_task: no parts")
    names = [c for p in parts for c in p.classes]
    if len(set(names)) != len(names):
        raise ValueError(f"joint_task: the classes of {[p.name for p in parts]} are not disjoint")
    first = parts[0]
    odd = [p.name for p in parts if (p.modality, p.templates) != (first.modality, first.templates)]
    if odd:
        raise ValueError(f"joint_task: {odd} differ from {first.name!r} in modality or prompt templates")
    offsets = np.cumsum([0] + [len(p.classes) for p in parts])

    def load(split):
        splits = [p.split(split) for p in parts]
        return Joined(splits, [(j, i) for j, examples in enumerate(splits) for i in range(len(examples))],
                      [y + int(o) for examples, o in zip(splits, offsets) for y in labels_of(examples)])

    parent = {p.parent for p in parts}
    name = f"{parent.pop()}-joint" if len(parent) == 1 and None not in parent else "+".join(p.name for p in parts)
    sources = {p.source for p in parts}
    return Task(name, names, first.modality, first.templates, {s: functools.partial(load, s) for s in SPLITS},
                "; ".join(dict.fromkeys(p.licence for p in parts)), source=sources.pop() if len(sources) == 1 else None)


def class_partitions(tasks: list[Task]) -> list[list[Task]]:
    """The groups of two or more ``tasks`` that are parts of one parent with disjoint classes (in the
    order of ``tasks``): the joint problems the class-partition protocol evaluates. A group whose
    classes overlap has none (a warning names it)."""
    groups = {}
    for t in tasks:
        if t.parent is not None:
            groups.setdefault(t.parent, []).append(t)
    found = []
    for g in (g for g in groups.values() if len(g) >= 2):
        if sum(len(t.classes) for t in g) == len({c for t in g for c in t.classes}):
            found.append(g)
        else:
            warnings.warn(f"{[t.name for t in g]} are subsets of {g[0].parent!r} whose classes overlap: they have "
                          "no joint problem (the class-partition protocol needs disjoint classes)", stacklevel=2)
    return found
