"""The feature output f whose Jacobian Gramian the factors approximate, and how batches reach a model.

Defaults (``default_output_fn``):
- open_clip CLIP (has ``encode_image``): the image embedding, unnormalized, (N, D).
- Hugging Face encoder-decoders (T5) without a classification head: the decoder's last hidden state at the first
  decoder position, (N, d) — the state that predicts the label token in text-to-text classification.
- Hugging Face encoders (BERT, MiniLM): the sentence embedding, the mean of the last hidden states
  over real (unpadded) tokens, (N, d).
- Hugging Face two-tower models (``get_image_features``: CLIPModel, SiglipModel): the image embedding of the batch's
  ``pixel_values``, (N, D).
- Hugging Face image models (``main_input_name`` "pixel_values", e.g. CLIP's vision towers): the image embedding
  (``image_embeds``) where the output has one, else the pooled output (``pooler_output``), (N, D).
- Hugging Face models with a task head and no hidden states in their output (``...ForSequenceClassification``, T5's
  too, ``...ForCausalLM``, ``...ForTokenClassification``): the head's ``logits``, (N, C) or (N, T, V) (the probes are
  zero on padding tokens).
- Any other module: ``model(batch)``, (N, C) or (N, T, C).
"""
import torch
from torch import nn


def to_device(batch, device):
    """A batch (tensor, dict or tuple of tensors) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def call(model: nn.Module, batch):
    """``model`` applied to a batch: dicts as keyword arguments, tuples as positional ones."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(*batch)
    return model(batch)


def batch_size(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    values = batch.values() if isinstance(batch, dict) else batch
    return next(batch_size(v) for v in values if isinstance(v, (torch.Tensor, dict, list, tuple)))


def examples(batch, rows: list[int]):
    """The batch's examples ``rows`` (indices, repeats allowed): each tensor with the batch's N rows indexed by
    them (in dicts, tuples, lists)."""
    n = batch_size(batch)

    def take(x):
        if isinstance(x, torch.Tensor):
            return x[rows] if x.dim() and x.shape[0] == n else x
        if isinstance(x, dict):
            return {key: take(v) for key, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(take(v) for v in x)
        return x
    return take(batch)


def token_masks(batch) -> dict[int, torch.Tensor]:
    """{sequence length: (N, T) bool mask of real tokens} from a Hugging Face batch's attention masks.

    A layer's activations find their mask by their length T, so an encoder and a decoder sequence of
    one length must have one mask (ValueError otherwise; no encoder mask means all tokens are real)."""
    if not isinstance(batch, dict):
        return {}
    encoder, decoder = batch.get("attention_mask"), batch.get("decoder_attention_mask")
    inputs = batch.get("input_ids", batch.get("inputs_embeds"))
    decoder_inputs = batch.get("decoder_input_ids", batch.get("decoder_inputs_embeds"))
    if encoder is None and decoder is not None and inputs is not None:
        encoder = torch.ones(inputs.shape[:2], dtype=torch.bool, device=inputs.device)
    if decoder is None and encoder is not None and decoder_inputs is not None:  # every decoder token is real
        decoder = torch.ones(decoder_inputs.shape[:2], dtype=torch.bool, device=decoder_inputs.device)
    masks = {}
    for key, m in (("attention_mask", encoder), ("decoder_attention_mask", decoder)):
        if m is None:
            continue
        m = m.bool()
        if m.shape[1] in masks and not torch.equal(masks[m.shape[1]], m):
            raise ValueError(f"decoder_attention_mask and attention_mask (or the encoder inputs) have the same length "
                             f"{m.shape[1]} but mark different tokens as real: a layer's mask is found by its sequence "
                             "length, so pad the decoder inputs to another length (or pass equal masks)")
        masks.setdefault(m.shape[1], m)
    return masks


def _mean_over_tokens(hidden, mask):
    if mask is None:
        return hidden.mean(1)
    w = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * w).sum(1) / w.sum(1).clamp_min(1)


def image_embedding(model: nn.Module, batch) -> torch.Tensor:
    """A Hugging Face image model's embedding of a batch: ``image_embeds`` where its output has one (CLIP with a
    projection), else ``pooler_output`` (N, D)."""
    out = call(model, batch)
    embeds = getattr(out, "image_embeds", None)
    return out.pooler_output if embeds is None else embeds


def image_features(model: nn.Module, batch) -> torch.Tensor:
    """A Hugging Face two-tower model's image embedding (N, D) of a batch: its ``pixel_values`` (a dict's, with its
    ``interpolate_pos_encoding``, or the batch itself) through ``get_image_features``."""
    images = {k: batch[k] for k in ("pixel_values", "interpolate_pos_encoding") if k in batch} \
        if isinstance(batch, dict) else {"pixel_values": batch}
    out = model.get_image_features(**images)
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5: the output, projected


def default_output_fn(model: nn.Module):
    """``output_fn(model, batch) -> f`` for the kinds of model listed in the module docstring."""
    if callable(getattr(model, "encode_image", None)):
        return lambda m, batch: m.encode_image(batch)
    config = getattr(model, "config", None)
    if config is not None and callable(getattr(model, "get_image_features", None)):
        return image_features
    text_to_text = getattr(config, "is_encoder_decoder", False) and not hasattr(model, "classification_head")
    if config is not None and text_to_text:
        def encoder_decoder(m, batch):
            batch = dict(batch)
            batch.pop("labels", None)  # the first decoder position holds the start token with or without them
            if batch.get("decoder_input_ids") is None and batch.get("decoder_inputs_embeds") is None:
                start = config.decoder_start_token_id
                if start is None:
                    raise ValueError(f"{type(m).__name__}: config.decoder_start_token_id is None; pass "
                                     "decoder_input_ids in the batches or an output_fn")
                device = next(v.device for v in batch.values() if isinstance(v, torch.Tensor))
                batch["decoder_input_ids"] = torch.full((batch_size(batch), 1), start, device=device)
                batch.pop("decoder_attention_mask", None)  # it belonged to the labels
            out = m(**batch, output_hidden_states=True, return_dict=True)
            return out.decoder_hidden_states[-1][:, 0]
        return encoder_decoder
    if config is not None and getattr(model, "main_input_name", None) == "pixel_values":
        return image_embedding
    if config is not None:
        def encoder(m, batch):
            out = m(**batch, return_dict=True)
            if getattr(out, "last_hidden_state", None) is None and getattr(out, "logits", None) is not None:
                return out.logits
            return _mean_over_tokens(out.last_hidden_state, batch.get("attention_mask"))
        return encoder
    return call
