"""Dual models built from tak.nn layers, converted from open_clip and Hugging Face transformers models.

``to_dual(model)`` rebuilds a supported model from dual layers: θ0 are the model's parameters (shared,
never trained), τ start at zero. The result's ``forward`` takes the model's inputs and returns
(primal, tangent) of its output; see ``DualModel`` for modes and task vectors.
"""
import importlib
import sys

from .base import DualModel
from .head import DualHeadModel

# (module of the source class, source class, our module, dual class), checked in order.
_CONVERTERS = [
    ("open_clip.transformer", "VisionTransformer", "clip_vit", "DualVisionTransformer"),
    ("open_clip.timm_model", "TimmModel", "timm_vit", "DualTimmVisionTransformer"),
    ("timm.models.vision_transformer", "VisionTransformer", "timm_vit", "DualTimmVisionTransformer"),
    ("transformers.models.clip.modeling_clip", "CLIPVisionModel", "hf_clip", "DualCLIPVisionModel"),
    ("transformers.models.clip.modeling_clip", "CLIPVisionModelWithProjection", "hf_clip", "DualCLIPVisionModel"),
    ("transformers.models.clip.modeling_clip", "CLIPVisionTransformer", "hf_clip", "DualCLIPVisionModel"),  # < 5
    ("transformers.models.siglip.modeling_siglip", "SiglipVisionModel", "hf_clip", "DualSiglipVisionModel"),
    ("transformers.models.siglip.modeling_siglip", "SiglipVisionTransformer", "hf_clip", "DualSiglipVisionModel"),
    ("transformers.models.vit.modeling_vit", "ViTModel", "hf_vit", "DualHFViTModel"),
    ("transformers.models.dinov2.modeling_dinov2", "Dinov2Model", "hf_vit", "DualHFViTModel"),
    ("transformers.models.dinov2_with_registers.modeling_dinov2_with_registers", "Dinov2WithRegistersModel", "hf_vit",
     "DualHFViTModel"),
    ("transformers.models.bert.modeling_bert", "BertModel", "bert", "DualBertModel"),
    ("transformers.models.roberta.modeling_roberta", "RobertaModel", "bert", "DualBertModel"),
    ("transformers.models.xlm_roberta.modeling_xlm_roberta", "XLMRobertaModel", "bert", "DualBertModel"),
    ("transformers.models.camembert.modeling_camembert", "CamembertModel", "bert", "DualBertModel"),
    ("transformers.models.electra.modeling_electra", "ElectraModel", "bert", "DualBertModel"),
    ("transformers.models.mpnet.modeling_mpnet", "MPNetModel", "bert", "DualBertModel"),
    ("transformers.models.distilbert.modeling_distilbert", "DistilBertModel", "bert", "DualDistilBertModel"),
    ("transformers.models.deberta_v2.modeling_deberta_v2", "DebertaV2Model", "deberta", "DualDebertaV2Model"),
    ("transformers.models.deberta.modeling_deberta", "DebertaModel", "deberta", "DualDebertaModel"),
    ("transformers.models.modernbert.modeling_modernbert", "ModernBertModel", "modernbert", "DualModernBertModel"),
    ("transformers.models.gpt2.modeling_gpt2", "GPT2Model", "gpt2", "DualGPT2Model"),
    ("transformers.models.gpt2.modeling_gpt2", "GPT2LMHeadModel", "gpt2", "DualGPT2Model"),
    *[(f"transformers.models.{family}.modeling_{family}", cls, "llama", "DualLlamaModel")
      for family, name in (("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"), ("qwen3", "Qwen3"),
                           ("gemma", "Gemma"), ("gemma2", "Gemma2"), ("gemma3", "Gemma3"), ("phi3", "Phi3"),
                           ("olmo2", "Olmo2"), ("olmo3", "Olmo3"), ("smollm3", "SmolLM3"), ("granite", "Granite"))
      for cls in ((f"{name}Text" if family == "gemma3" else name) + "Model", f"{name}ForCausalLM")],
    ("transformers.models.gpt_neox.modeling_gpt_neox", "GPTNeoXModel", "gpt_neox", "DualGPTNeoXModel"),
    ("transformers.models.gpt_neox.modeling_gpt_neox", "GPTNeoXForCausalLM", "gpt_neox", "DualGPTNeoXModel"),
    ("transformers.models.t5.modeling_t5", "T5EncoderModel", "t5", "DualT5EncoderModel"),
    ("transformers.models.t5.modeling_t5", "T5Model", "t5", "DualT5Model"),
    ("transformers.models.t5.modeling_t5", "T5ForConditionalGeneration", "t5", "DualT5ForConditionalGeneration"),
    ("transformers.models.mt5.modeling_mt5", "MT5EncoderModel", "t5", "DualT5EncoderModel"),
    ("transformers.models.mt5.modeling_mt5", "MT5Model", "t5", "DualT5Model"),
    ("transformers.models.mt5.modeling_mt5", "MT5ForConditionalGeneration", "t5", "DualT5ForConditionalGeneration"),
]


def _converter(model):
    """The dual model class of ``model``'s class, or None."""
    for module, cls, ours, dual in _CONVERTERS:
        source = sys.modules.get(module)  # not imported: the model cannot be an instance of its classes
        if source is not None and isinstance(model, getattr(source, cls, ())):  # () where this version lacks cls
            return getattr(importlib.import_module(f".{ours}", __name__), dual)
    return None


def to_dual(model, *, trainable=None) -> DualModel:
    """The dual model of ``model``. ``trainable`` selects the parameters that get τ, by source parameter
    name (None: all with requires_grad; a glob pattern or a list of them; a predicate name -> bool).

    A Hugging Face model with a task head (``*ForSequenceClassification``, ...) whose ``base_model`` is supported gets
    a ``DualHeadModel``: the base as its dual model, the head by forward-mode AD. The dual model and its dropout layers
    start in the train/eval modes of ``model`` and of their source modules. Raises NotImplementedError naming the model
    class, or the module, that has no fast path."""
    converter = _converter(model)
    base = getattr(model, "base_model", model)  # a Hugging Face model's backbone under its task head
    if converter is not None:
        dual = converter(model, trainable=trainable)
    elif base is not model and (base_converter := _converter(base)) is not None:
        dual = DualHeadModel(model, base_converter, trainable=trainable)
    else:
        supported = ", ".join(f"{m}.{c}" for m, c, _, _ in _CONVERTERS)
        raise NotImplementedError(f"tak.models.to_dual: no fast path for {type(model).__module__}."
                                  f"{type(model).__qualname__}; supported: {supported}, and Hugging Face models with a "
                                  "task head around one of them (model.base_model)")
    dual.training = model.training  # its dropout layers have their source modules' modes
    return dual


__all__ = ["DualModel", "to_dual"]
