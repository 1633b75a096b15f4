"""Token handling shared by the fitting passes: layer tensors as (N, T, d) with their real-token
masks, token means and sums, and the probe cotangents of the feature output.

How a layer's input holds the batch's N examples is measured once per pass, at each of the layer's calls in a
forward (``measure_layouts``): batch-first (N, T, d) or sequence-first (T, N, d) (PyTorch's ``nn.Transformer*``
default), and for 2-D inputs of flattened tokens, (N·T, d) example by example or (T·N, d) token by token. Shapes
alone cannot tell them apart when T = N, nor the two flattenings ever.

An input that holds no example at all is *shared* by the batch: one tensor computed once for all N examples
(DeBERTa's relative position embeddings, normalized and projected by the layers that also see the tokens; the
learned queries of open_clip's attentional pooler). It is measured as one whose shape does not grow with the
examples (a batch of one is measured on its example twice over), and, unmeasured, taken as one where a 3-D input
has a leading 1 for N > 1. Its output gradient is the sum of the N examples' gradients, which cannot be told apart:
the fits count it as one more example whose gradient is that sum; under Monte-Carlo probes, independent across
examples and of mean zero, the sum's second moments are those of the per-example gradients (the cross terms
vanish in expectation). The table those embeddings come from, read whole (``rel_embeddings.weight``), is one too, set
as such by the capture that taps it (``TABLE``): its input is the ids of its K rows, which are no token positions."""
import torch
from torch import nn

from .outputs import batch_size, examples, token_masks

BATCH_FIRST, SEQUENCE_FIRST, SHARED, TABLE = "batch_first", "sequence_first", "shared", "table"


def measure_layouts(model: nn.Module, batch, output_fn, modules: dict[str, nn.Module]) -> tuple[dict, str | None]:
    """{(name, call): BATCH_FIRST, SEQUENCE_FIRST or SHARED} of the ``modules``' inputs at each of their calls in a
    forward, from forwards (no grad) of the batch's first example and of its first two (of the first twice over in a
    batch of one): the dim that grows from 1 to 2 holds the examples, and none does for a shared input; for flattened
    tokens, whether the first example's rows are the first T rows of two or every other row.
    Modules not called, and inputs that do not tell (one token), are left out (``BatchTokens`` goes by
    the shapes); so is everything when the model cannot run on the first examples alone, and the second item says
    why (a warning for the caller to give once the whole batch has run: a batch the model cannot run at all gets
    the model's own error alone), else None."""
    if not modules:
        return {}, None
    firsts = ([0], [0, 1] if batch_size(batch) > 1 else [0, 0])

    def recorder(inputs: dict, name: str):
        def hook(module, args):  # values for 2-D inputs (compared below), shapes for the others
            if args and isinstance(args[0], torch.Tensor):
                x = args[0]
                inputs.setdefault(name, []).append(x.detach().clone() if x.dim() == 2 else
                                                   torch.empty(x.shape, device="meta"))
        return hook

    seen = ({}, {})
    for rows, inputs in zip(firsts, seen):
        handles = [m.register_forward_pre_hook(recorder(inputs, name)) for name, m in modules.items()]
        try:
            with torch.no_grad():
                output_fn(model, examples(batch, rows))
        except Exception as e:  # noqa: BLE001 - an output_fn that needs whole batches: fall back to the shapes
            return {}, (f"could not run the model on the first example(s) of a batch to see how its layers hold "
                        f"tokens ({type(e).__name__}: {e}); inputs of shape (N, N, d) are taken as batch-first")
        finally:
            for h in handles:
                h.remove()
    layouts = {(name, call): _layout(one, two) for name, calls in seen[0].items()
               for call, (one, two) in enumerate(zip(calls, seen[1].get(name, [])))}
    return {key: layout for key, layout in layouts.items() if layout is not None}, None


def _layout(one: torch.Tensor, two: torch.Tensor) -> str | None:
    """The layout of a module's input ``one`` for one example and ``two`` for two, or None if they do not tell."""
    if one.shape == two.shape:
        return SHARED
    if one.dim() >= 3 and one.dim() == two.dim():
        if one.shape[0] == 1 and two.shape[0] == 2:
            return BATCH_FIRST
        return SEQUENCE_FIRST if one.shape[1] == 1 and two.shape[1] == 2 else None
    if one.dim() == two.dim() == 2 and two.shape[0] == 2 * one.shape[0]:
        t = one.shape[0]  # one row per example, or flattened tokens: example 0's rows first, or every other row
        if t == 1:
            return BATCH_FIRST
        by_example, by_token = (two[:t] - one).abs().max(), (two[0::2] - one).abs().max()
        return BATCH_FIRST if by_example <= by_token else SEQUENCE_FIRST
    return None


class BatchTokens:
    """What a pass knows of the current batch: N, the (N, T) real-token masks by length T, and the
    measured layouts of the layers' inputs at each call (``measure_layouts``)."""

    def __init__(self, batch, layouts: dict | None = None):
        self.n = batch_size(batch)
        self.masks = token_masks(batch)
        self.layouts = layouts or {}

    def sequence_first(self, name: str, x: torch.Tensor, call: int = 0) -> bool:
        """Whether layer ``name``'s tensor x (≥ 3-D) at its ``call`` holds the examples in dim 1: as measured, else
        when dim 0 is not N and dim 1 is."""
        if (name, call) in self.layouts:
            return self.layouts[name, call] == SEQUENCE_FIRST
        return x.shape[0] != self.n and x.shape[1] == self.n

    def shared(self, name: str, x: torch.Tensor, call: int = 0) -> bool:
        """Whether layer ``name``'s tensor x at its ``call`` is shared by the batch's examples (module docstring): as
        measured, else, for N > 1, when x is ≥ 3-D with a leading 1 that is not a sequence-first layout's (one
        example's inputs all have a leading 1)."""
        if self.layouts.get((name, call)) in (SHARED, TABLE):
            return True
        return self.n > 1 and x.dim() >= 3 and x.shape[0] == 1 and not self.sequence_first(name, x, call)

    def view(self, x: torch.Tensor, name: str, call: int = 0):
        """(layer ``name``'s input or output gradient x at its ``call`` as (N, T, d), its real-token mask or None),
        or (x, None) for a 2-D x (N, d); a shared x as (1, T, d) of T rows, all real. Sequence-first layouts are
        transposed, flattened tokens unflattened."""
        if self.shared(name, x, call):
            return x.reshape(1, -1, x.shape[-1]), None
        if x.dim() == 2:
            if x.shape[0] == self.n:
                return x, None
            if x.shape[0] % self.n:
                raise ValueError(f"layer {name!r}: a 2-D input of {x.shape[0]} rows for a batch of {self.n} examples "
                                 "is neither one row per example nor flattened tokens of each")
            t = x.shape[0] // self.n
            flat_by_token = self.layouts.get((name, call)) == SEQUENCE_FIRST
            x = x.reshape(t, self.n, -1).transpose(0, 1) if flat_by_token else x.reshape(self.n, t, -1)
            return x, self.masks.get(t)
        if x.dim() != 3:
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        if self.sequence_first(name, x, call):
            x = x.transpose(0, 1)
        return x, self.masks.get(x.shape[1])

    def mask_of(self, f: torch.Tensor):
        """The real-token mask (N, T) of a batch-first sequence output f (N, T, C): the batch's mask of f's length
        (an encoder-decoder's decoder mask for decoder states), or None."""
        return self.masks.get(f.shape[1]) if f.dim() == 3 and f.shape[0] == self.n else None


def token_mean(x: torch.Tensor, mask) -> torch.Tensor:
    """Mean over the real tokens: (N, T, d) -> (N, d)."""
    if mask is None:
        return x.mean(1)
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1)


def token_sum(x: torch.Tensor, mask) -> torch.Tensor:
    """Sum over the real tokens: (N, T, d) -> (N, d)."""
    return x.sum(1) if mask is None else (x * mask.to(x.dtype).unsqueeze(-1)).sum(1)


def probes(f: torch.Tensor, mc_samples: int, exact: bool, generator: torch.Generator, mask=None) -> torch.Tensor:
    """Cotangents s for the feature output f: M Gaussian samples (M, *f.shape), zero on padding
    tokens of a sequence output; or, when ``exact``, the C unit vectors (C, N, C) of f (N, C)."""
    if exact:
        if f.dim() != 2:
            raise ValueError(f"exact=True needs a feature output f of shape (N, C), got {tuple(f.shape)}; "
                             "use Monte-Carlo probes (mc_samples) for sequence outputs")
        C = f.shape[1]
        return torch.eye(C, dtype=f.dtype, device=f.device).unsqueeze(1).expand(C, f.shape[0], C)
    S = torch.randn((mc_samples, *f.shape), generator=generator, dtype=torch.float32).to(device=f.device, dtype=f.dtype)
    if mask is not None and f.dim() == 3 and mask.shape[1] == f.shape[1]:
        S = S * mask.unsqueeze(-1).to(S.dtype)
    return S
