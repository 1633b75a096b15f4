"""T5 (``T5ForConditionalGeneration``) as a backbone: text-to-text classification by label words.

- ``model``: the whole T5ForConditionalGeneration (encoder, decoder, tied LM head).
- ``inputs``: each example formatted as text (``prompted``: ``text_format`` default ``"{text}"``, ``pair_format``
  default ``"premise: {premise} hypothesis: {hypothesis}"``, T5's MNLI / RTE style), tokenized with padding and
  truncation (``max_length``, default 128); ``decoder_input_ids`` is the decoder start token (N, 1), so the batch
  is complete for ``model(**batch)``.
- ``features``: the decoder's last hidden state (after its final RMSNorm) at the first decoder position,
  (N, d_model) — the state that predicts the label word (``tak.curvature.outputs``' default for
  encoder-decoders).
- ``head``: the LM-head rows of the label tokens (``prompted``), times T5's decoder-output rescaling
  ``d_model ** -0.5`` when the model applies it (``tak.models.t5.decoder_output_scale``; transformers 5.x:
  ``config.scale_decoder_outputs``,
  which is true unless the checkpoint's config says ``tie_word_embeddings: false``, as T5 v1.1's do;
  transformers 4.x: ``config.tie_word_embeddings``). ``Head(W, normalize=False, scale=1.0)``, so
  ``head(features)`` is the model's own next-token logits at the first decoder step restricted to the label
  tokens.

Every model (the plain model, deep copies, both paths of ``tak.linearize``, ``functional_call``
wrappers) is called with ``output_hidden_states=True`` and reads the decoder's last hidden state,
``decoder_hidden_states[-1]``.
"""

import torch
from torch import nn

from ..curvature.outputs import call
from ..models.t5 import decoder_output_scale
from .base import Head
from .prompted import PromptedBackbone
from .text import DEFAULT_MAX_LENGTH, load_hf

DEFAULT_PAIR_FORMAT = "premise: {premise} hypothesis: {hypothesis}"
DEFAULT_TEXT_FORMAT = "{text}"


class T5Backbone(PromptedBackbone):
    """A T5ForConditionalGeneration and its tokenizer; see the module docstring."""

    def __init__(self, model: nn.Module, tokenizer, *, name: str, max_length: int = DEFAULT_MAX_LENGTH,
                 prefix: str = "", text_format: str = DEFAULT_TEXT_FORMAT, pair_format: str = DEFAULT_PAIR_FORMAT,
                 label_words: dict[str, str] | None = None, source: dict | None = None):
        if not getattr(model.config, "is_encoder_decoder", False):
            raise ValueError(f"backbone {name!r}: {type(model).__name__} is not an encoder-decoder")
        if model.config.decoder_start_token_id is None:
            raise ValueError(f"backbone {name!r}: config.decoder_start_token_id is None")
        super().__init__(model, tokenizer, name=name, max_length=max_length, prefix=prefix, text_format=text_format,
                         pair_format=pair_format, label_words=label_words, source=source)

    def inputs(self, examples: list) -> dict:
        enc = self.encoded(examples)
        ids = enc["input_ids"]
        start = torch.full((ids.shape[0], 1), self.model.config.decoder_start_token_id, dtype=ids.dtype)
        return {"input_ids": ids, "attention_mask": enc["attention_mask"], "decoder_input_ids": start}

    def features(self, model, batch) -> torch.Tensor:
        out = call(model, {**batch, "output_hidden_states": True, "use_cache": False})
        return out["decoder_hidden_states"][-1][:, 0]

    def _build_head(self, task) -> Head:
        weight = self.model.get_output_embeddings().weight
        rows = weight[self.label_tokens(task)].detach().clone() * decoder_output_scale(self.model)
        return Head(rows, normalize=False, scale=1.0)


def load_t5(spec: str, name: str, *, pretrained: str | None = None, tokenizer=None,
            max_length: int = DEFAULT_MAX_LENGTH, prefix: str = "", text_format: str = DEFAULT_TEXT_FORMAT,
            pair_format: str = DEFAULT_PAIR_FORMAT, label_words: dict[str, str] | None = None, dtype=None,
            model_kwargs: dict | None = None) -> T5Backbone:
    """``t5:<name-or-path>``: ``T5ForConditionalGeneration`` / ``AutoTokenizer.from_pretrained(name)``;
    ``pretrained`` is the hub revision; other options as ``T5Backbone``; ``dtype`` converts the model;
    ``model_kwargs`` go to ``from_pretrained``."""
    model, tokenizer, source = load_hf("T5ForConditionalGeneration", spec, name, pretrained=pretrained,
                                       tokenizer=tokenizer, dtype=dtype, model_kwargs=model_kwargs)
    return T5Backbone(model, tokenizer, name=spec, max_length=max_length, prefix=prefix,
                      text_format=text_format, pair_format=pair_format, label_words=label_words, source=source)
