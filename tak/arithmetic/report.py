"""A small markdown report writer for the analyses: sections, tables, images.

::

    r = Report("Task addition, 8 vision tasks")
    r.section("Setup", "ViT-B/32, linearized fine-tuning, β = 0.1.")
    r.table([{"method": "TA", "avg": 71.234, "n": 8}, {"method": "TAK", "avg": 83.9}])
    r.image("figs/xi.png", "Disentanglement error of τ_cars and τ_dtd")
    r.write("out/report.md")

Images are linked relative to the folder the report is written to, so the report and its
figures can be moved together. ``render()`` gives the markdown without writing.
"""
from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io import write_text

__all__ = ["Report", "markdown_table"]


@dataclass(frozen=True)
class _Image:
    path: Path
    caption: str


def _scalar(value: Any) -> Any:
    """Unwrap one-element tensors / numpy arrays into Python numbers (numpy scalars are already
    ``numbers.Real``)."""
    if value is None or isinstance(value, (str, bytes, numbers.Number)):
        return value
    numel = getattr(value, "numel", None)
    if callable(numel):  # torch.Tensor
        return value.item() if numel() == 1 else value
    size = getattr(value, "size", None)
    if isinstance(size, int) and size == 1 and callable(getattr(value, "item", None)):  # numpy array
        return value.item()
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _cell(value: Any, floatfmt: str) -> str:
    value = _scalar(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isnan(value):
            return "nan"
        return format(value, floatfmt)
    text = str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r\n", " ").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                   floatfmt: str = ".1f") -> str:
    """A GitHub-flavoured markdown table of ``rows`` (one dict per row).

    ``columns`` picks and orders the columns; by default every key, in order of first appearance.
    Floats use ``floatfmt``, integers are written as integers, missing or ``None`` cells are
    empty, ``|`` in text is escaped. Columns whose values are all numbers are right-aligned.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("table: no rows given")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"table: row {i} is a {type(row).__name__}, not a dict")
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    columns = list(columns)
    if not columns:
        raise ValueError("table: no columns")
    format(1.0, floatfmt)  # a bad format spec fails here, with its own message
    header = "| " + " | ".join(_cell(str(c), floatfmt) for c in columns) + " |"
    aligns = []
    for c in columns:
        present = [_scalar(r[c]) for r in rows if r.get(c) is not None]
        numeric = bool(present) and all(_is_number(v) for v in present)
        aligns.append("---:" if numeric else "---")
    sep = "|" + "|".join(aligns) + "|"
    body = ["| " + " | ".join(_cell(row.get(c), floatfmt) for c in columns) + " |" for row in rows]
    return "\n".join([header, sep, *body])


def _link_target(path: Path, base: Path) -> str:
    try:
        target = os.path.relpath(path.resolve(), base.resolve())
    except ValueError:  # another drive (Windows): keep it absolute
        target = str(path.resolve())
    target = Path(target).as_posix()
    if any(ch in target for ch in " ()<>"):
        target = f"<{target}>"
    return target


class Report:
    """A markdown document built block by block; every method but ``render``/``write`` returns
    ``self`` so calls chain."""

    def __init__(self, title: str):
        if not str(title).strip():
            raise ValueError("Report: empty title")
        self.title = str(title)
        self._blocks: list[str | _Image] = []

    def section(self, heading: str, text: str = "", *, level: int = 2) -> "Report":
        """A heading (``##`` by default; ``level`` 2–6) and an optional paragraph below it."""
        if not 2 <= level <= 6:
            raise ValueError(f"section: level must be 2..6 (1 is the title), got {level}")
        self._blocks.append("#" * level + " " + " ".join(str(heading).split()))
        if text:
            self.text(text)
        return self

    def text(self, text: str) -> "Report":
        """A paragraph (markdown, written as given)."""
        text = str(text).strip("\n")
        if text:
            self._blocks.append(text)
        return self

    def table(self, rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None,
              floatfmt: str = ".1f", *, caption: str | None = None) -> "Report":
        """A markdown table (see :func:`markdown_table`), with an optional italic caption above."""
        if caption:
            self._blocks.append(f"*{caption}*")
        self._blocks.append(markdown_table(list(rows), columns, floatfmt))
        return self

    def image(self, path, caption: str = "") -> "Report":
        """An image, linked relative to the report's folder when written, with its caption
        (alt text, and an italic line below the image)."""
        self._blocks.append(_Image(Path(path), str(caption)))
        return self

    def render(self, base=None) -> str:
        """The markdown text; image links relative to the folder ``base`` (default: the current
        directory)."""
        base = Path(base) if base is not None else Path.cwd()
        parts = [f"# {self.title}"]
        for block in self._blocks:
            if isinstance(block, _Image):
                alt = block.caption.replace("[", "(").replace("]", ")").replace("\n", " ")
                parts.append(f"![{alt}]({_link_target(block.path, base)})")
                if block.caption:
                    parts.append(f"*{block.caption}*")
            else:
                parts.append(block)
        return "\n\n".join(parts) + "\n"

    def write(self, path) -> Path:
        """Write the report to ``path`` atomically (temporary file in the same folder, then
        ``os.replace``); parent folders are created. Returns the path."""
        path = Path(path)
        return write_text(path, self.render(base=path.parent))
