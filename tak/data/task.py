"""A classification task: class names, prompt templates for its zero-shot head, and train/val/test splits.

An example is ``(input, label)``: ``input`` is a ``str`` (text), a ``(str, str)`` pair (premise,
hypothesis) or a PIL image; ``label`` an ``int`` indexing ``classes``. Splits load lazily (on first
use) and are plain sequences, so ``torch.utils.data.DataLoader`` takes them as datasets.
"""
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

SPLITS = ("train", "val", "test")
MODALITIES = ("text", "text-pair", "image")


def check_format(fmt: str, fields: tuple[str, ...], who: str) -> None:
    """Refuse a ``str.format`` string ``fmt`` (``who`` names it) unless its replacement fields are ``fields``,
    each once (``""`` is ``{}``)."""
    if not isinstance(fmt, str):
        raise TypeError(f"{who} must be a str, got {fmt!r}")
    want = " and ".join("{" + f + "}" for f in fields)
    try:
        found = sorted(name for _, name, _, _ in string.Formatter().parse(fmt) if name is not None)
    except ValueError as e:
        raise ValueError(f"{who} {fmt!r} is not a format string ({e}); it must contain {want}") from None
    if found != sorted(fields):
        raise ValueError(f"{who} {fmt!r} must contain {want} exactly once and no other replacement field")


@dataclass
class Task:
    """name: registry name; classes: class names (label i is ``classes[i]``); modality: one of
    ``MODALITIES``; templates: prompts with one ``{}`` for a class name (the zero-shot head averages
    their embeddings); loaders: split name -> function returning that split's examples;
    licence: where the data comes from and under which licence (reports quote it); parent: the task
    whose classes this one's are a subset of (``subset_classes``, the class-partition protocol), None
    for a task of its own; source: where its files were read (a folder, with the torchvision class that read it
    if one did), None for data that packages ship: two tasks of one source read the same files."""

    name: str
    classes: list[str]
    modality: str
    templates: list[str]
    loaders: dict[str, Callable[[], Sequence]]
    licence: str = ""
    parent: str | None = None
    source: str | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"Task {self.name!r}: modality must be one of {MODALITIES}, got {self.modality!r}")
        missing = [s for s in SPLITS if s not in self.loaders]
        if missing:
            raise ValueError(f"Task {self.name!r}: no loader for split(s) {missing}")
        if isinstance(self.templates, str):
            raise TypeError(f"Task {self.name!r}: templates must be a list of str, got the str {self.templates!r}")
        for template in self.templates:
            check_format(template, ("",), f"Task {self.name!r}: template")

    def split(self, name: str) -> Sequence:
        """The examples of split ``name`` ("train", "val" or "test"), loaded once."""
        if name not in SPLITS:
            raise ValueError(f"Task {self.name!r}: split must be one of {SPLITS}, got {name!r}")
        if name not in self._cache:
            self._cache[name] = self.loaders[name]()
        return self._cache[name]
