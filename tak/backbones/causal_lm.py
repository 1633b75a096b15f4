"""Decoder-only language models (``AutoModelForCausalLM``: Llama, Mistral, Qwen2/3, Gemma, Phi-3, GPT-2, Pythia, ...) as
backbones: classification by the next token after a prompt.

- ``model``: the decoder without its LM head (``AutoModelForCausalLM(...).base_model``, e.g. a LlamaModel or
  GPT2Model, which ``tak.linearize`` takes on its fast path); the head's weight stays outside it, frozen.
- ``inputs``: each example formatted as a prompt (``prompted``; ``text_format`` default ``"{text}\\nAnswer:"``,
  ``pair_format`` default ``"{premise}\\nQuestion: {hypothesis}\\nAnswer:"``), a text or premise over ``max_length``
  tokens cut from its end so that the prompt's end stays, right-padded (with the EOS token where the tokenizer has no
  padding token).
- ``features``: the last hidden state (after the final norm) at each prompt's last token, (N, d).
- ``head``: the LM-head rows of the label tokens (the first token of ``" " + word``: the word as it follows the
  prompt), ``Head(W, normalize=False, scale=1 / logits_scaling, softcap=final_logit_softcapping)`` (Granite's
  divisor, Gemma 2's cap; 1 and None elsewhere), so ``head(features)`` is the model's own next-token logits after the
  prompt restricted to the label tokens.
"""
import torch
from torch import nn

from ..curvature.outputs import call
from .base import Head
from .prompted import PromptedBackbone
from .text import DEFAULT_MAX_LENGTH, hidden_states, load_hf

DEFAULT_TEXT_FORMAT = "{text}\nAnswer:"
DEFAULT_PAIR_FORMAT = "{premise}\nQuestion: {hypothesis}\nAnswer:"


class CausalLMBackbone(PromptedBackbone):
    """The decoder ``model`` of a causal LM, its LM head's weight ``head_weight`` (vocab, d) and tokenizer; the LM
    divides its logits by ``logits_scaling`` and caps them to c·tanh(z / c) with ``softcap`` c where given."""

    cuts_texts = spaced_words = True

    def __init__(self, model: nn.Module, head_weight: torch.Tensor, tokenizer, *, name: str,
                 max_length: int = DEFAULT_MAX_LENGTH, prefix: str = "", text_format: str = DEFAULT_TEXT_FORMAT,
                 pair_format: str = DEFAULT_PAIR_FORMAT, label_words: dict[str, str] | None = None,
                 source: dict | None = None, logits_scaling: float = 1.0, softcap: float | None = None):
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(f"backbone {name!r}: the tokenizer has neither a padding nor an EOS token")
            tokenizer.pad_token = tokenizer.eos_token  # padding is masked out: any token does
        super().__init__(model, tokenizer, name=name, max_length=max_length, prefix=prefix, text_format=text_format,
                         pair_format=pair_format, label_words=label_words, source=source)
        self.head_weight, self.logits_scaling, self.softcap = head_weight, float(logits_scaling), softcap

    def inputs(self, examples: list) -> dict:
        enc = self.encoded(examples, padding_side="right")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def features(self, model, batch) -> torch.Tensor:
        hidden = hidden_states(call(model, {**batch, "use_cache": False}))
        last = batch["attention_mask"].sum(1) - 1  # right padding: each prompt's last real token
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]

    def _build_head(self, task) -> Head:
        return Head(self.head_weight[self.label_tokens(task)].detach().clone(), normalize=False,
                    scale=1 / self.logits_scaling, softcap=self.softcap)


def load_causal_lm(spec: str, name: str, *, pretrained: str | None = None, tokenizer=None,
                   max_length: int = DEFAULT_MAX_LENGTH, prefix: str = "", text_format: str = DEFAULT_TEXT_FORMAT,
                   pair_format: str = DEFAULT_PAIR_FORMAT, label_words: dict[str, str] | None = None, dtype=None,
                   model_kwargs: dict | None = None) -> CausalLMBackbone:
    """``lm:<name-or-path>``: ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(name)``; ``pretrained`` is the
    hub revision; other options as ``CausalLMBackbone``; ``dtype`` converts the model; ``model_kwargs`` go to
    ``from_pretrained``."""
    lm, tokenizer, source = load_hf("AutoModelForCausalLM", spec, name, pretrained=pretrained, tokenizer=tokenizer,
                                    dtype=dtype, model_kwargs=model_kwargs)
    return CausalLMBackbone(lm.base_model, lm.get_output_embeddings().weight, tokenizer, name=spec,
                            max_length=max_length, prefix=prefix, text_format=text_format, pair_format=pair_format,
                            label_words=label_words, source=source,
                            logits_scaling=getattr(lm.config, "logits_scaling", 1.0),
                            softcap=getattr(lm.config, "final_logit_softcapping", None))
