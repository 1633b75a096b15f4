"""Text classification by a language model's next token: examples become prompts, and a class is scored by the
LM-head logit of its label word's first token. Shared by T5 (``t5.py``: at the first decoder step) and decoder-only
language models (``causal_lm.py``: after the prompt's last token).

- Formats (options): a text ``x`` becomes ``text_format.format(text=x)``, a pair ``(p, h)`` becomes
  ``pair_format.format(premise=p, hypothesis=h)``; a non-empty ``prefix`` (``"mnli"``, ``"sst2 sentence"``, ...) is
  prepended as ``"{prefix}: "``. A pair longer than ``max_length`` tokens loses the end of its premise, so that the
  hypothesis (and the format's end) is kept whole; so does a text, where ``cuts_texts``.
- Label words: the class name, or ``label_words[class name]``; the class's token is the word's first token (of
  ``" " + word`` where ``spaced_words``: the word as it follows the prompt). Two classes whose label words start with
  the same token are refused. ``label_words`` may name the classes of several tasks (one backbone evaluates every
  task of a merge). Templates are not used.
"""
from torch import nn

from ..data.task import check_format
from .base import Backbone
from .text import DEFAULT_MAX_LENGTH, check_max_length, split_examples


class PromptedBackbone(Backbone):
    """``model`` with its ``tokenizer``, the formats and label words of the module docstring."""

    modalities = ("text", "text-pair")
    cuts_texts = False  # a single text longer than max_length is cut to fit the format (else the tokenizer cuts)
    spaced_words = False  # label words follow a space (decoder-only LMs: the word's token after "Answer:")

    def __init__(self, model: nn.Module, tokenizer, *, name: str, max_length: int = DEFAULT_MAX_LENGTH,
                 prefix: str = "", text_format: str, pair_format: str, label_words: dict[str, str] | None = None,
                 source: dict | None = None):
        check_format(text_format, ("text",), f"backbone {name!r}: text_format")
        check_format(pair_format, ("premise", "hypothesis"), f"backbone {name!r}: pair_format")
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.max_length, self.prefix = check_max_length(max_length, model, name), prefix
        self.text_format, self.pair_format = text_format, pair_format
        self.label_words = dict(label_words or {})
        self.source = source or {"spec": name}

    def format(self, example) -> str:
        """The input text of one example (str or (premise, hypothesis))."""
        first, second = split_examples([example], self.name)
        text = (self.text_format.format(text=first[0]) if second is None
                else self.pair_format.format(premise=first[0], hypothesis=second[0]))
        return f"{self.prefix}: {text}" if self.prefix else text

    def fitted(self, example) -> str:
        """``format(example)``, for a pair (a text, where ``cuts_texts``) over ``max_length`` tokens with its premise
        (its text) cut from the end to fit."""
        text = self.format(example)
        (first,), second = split_examples([example], self.name)
        rebuilt = (lambda cut: (cut, second[0])) if second is not None else (lambda cut: cut)  # noqa: E731
        kept = None
        while (second is not None or self.cuts_texts) and \
                (excess := len(self.tokenizer(text)["input_ids"]) - self.max_length) > 0:
            kept = self.tokenizer(first, add_special_tokens=False)["input_ids"] if kept is None else kept
            if not kept:
                break
            kept = kept[:max(0, len(kept) - excess)]
            text = self.format(rebuilt(self.tokenizer.decode(kept)))
        return text

    def encoded(self, examples: list, **options) -> dict:
        """The tokenizer's padded, truncated tensors of the examples' fitted prompts (``options`` go to it)."""
        split_examples(examples, self.name)  # all str or all pairs
        return self.tokenizer([self.fitted(x) for x in examples], padding=True, truncation=True,
                              max_length=self.max_length, return_tensors="pt", **options)

    def label_tokens(self, task) -> list[int]:
        """The token id of each class's label word (its first token; module docstring)."""
        ids = []
        for c in task.classes:
            word = self.label_words.get(c, c)
            tokens = self.tokenizer(f" {word}" if self.spaced_words else word, add_special_tokens=False)["input_ids"]
            if self.spaced_words:  # a tokenizer may give the space a token of its own (SentencePiece's "▁")
                tokens = [t for t in tokens if self.tokenizer.decode([t]).strip()]
            if not tokens:
                raise ValueError(f"backbone {self.name!r}: label word {word!r} of class {c!r} has no tokens")
            ids.append(int(tokens[0]))
        if len(set(ids)) < len(ids):
            words = {c: self.tokenizer.convert_ids_to_tokens(i) for c, i in zip(task.classes, ids)}
            raise ValueError(f"backbone {self.name!r}, task {task.name!r}: label words must start with distinct "
                             f"tokens, got {words}; pass label_words={{class name: word}}")
        return ids
