"""KFAC factors of a model's Jacobian Gramian, fitted in one forward and one output-only backward per batch.

For a linear layer z = a Wᵀ + b with input a and pseudo-gradient g = (J_z f)ᵀ s at its output
(s ~ N(0, I_C), M samples averaged; or s = e_c, c = 1..C, summed, when ``exact``):

    tokens="expand":  A = 1/(N·T) Σ_{n,t} ã ãᵀ,   B = 1/N Σ_{n,t} g gᵀ
    tokens="reduce":  A = 1/N Σ_n ā āᵀ (ā: token mean), B = 1/N Σ_n ĝ ĝᵀ (ĝ: token sum)

ã = [a, 1] when the layer has a bias (A is (d_in+1)²). An embedding's ã is the one-hot row of each token id, so its A
is diagonal and kept as its diagonal (d_in,): the tokens' frequencies (under "reduce", the diagonal of 1/N Σ_n ā āᵀ,
Σ_n (count_{n,v} / T_n)² / N: the dense vocabulary² matrix is out of reach); position ids the batch shares count for
each example where its token is real. Padding tokens (Hugging Face attention masks) are left out; N counts examples, T
real tokens. The layer's GGN block is ≈ B ⊗ A for the row-major vec of [W | b] (DESIGN.md conventions). Every call of
a layer in a forward adds its rows. A call on an input the batch shares (``tokens``: DeBERTa's relative embeddings)
adds its rows to A once per example, as each example's own fit would, and to B the gradient rows of the batch's sum,
whose second moments are the examples' in expectation over the probes."""
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm import tqdm  # not tqdm.auto: its asyncio variant iterates `batches` twice

import kfac_kernels as kk

from ..io import architecture_fingerprint
from .capture import Capture, fitting_mode
from .dense import DenseGroup, find_dense_groups
from .distributed import all_reduce_sums, rank
from .._selection import check_patterns, selects
from .layers import Layer, as_matrix, find_layers
from .outputs import default_output_fn, examples, to_device
from .tokens import TABLE, BatchTokens, measure_layouts, probes, token_mean, token_sum

FORMAT_VERSION = 2  # 2: layers have a layout (conv, transposed); version-1 files are all linear


@dataclass(frozen=True)
class LayerFactors:
    """B (d_out × d_out) and A (d_in[+1] × d_in[+1]) of one layer, dense or compressed (an embedding's A: its
    diagonal, (d_in,)), and the parameters [W | b] they belong to (W the ``weight`` parameter seen through
    ``layout``, see ``tak.curvature.layers.as_matrix``)."""

    A: object
    B: object
    weight: str
    bias: str | None
    layout: str = "linear"

    @property
    def columns(self) -> int:
        """Columns of the block [W | b]: d_in (+1 with a bias)."""
        return self.A.shape[0]

    @property
    def block_shape(self) -> tuple[int, int]:
        return self.B.shape[0], self.columns

    @property
    def params(self) -> tuple[str, ...]:
        """The names of W (and b)."""
        return tuple(p for p in (self.weight, self.bias) if p is not None)

    def block(self, taus: dict, name: str):
        """This layer's task-vector block [W | b] from ``taus`` (by layer name, or by parameter names; a
        missing W or b counts as zero), or None when ``taus`` has neither."""
        if name in taus and name not in self.params:  # open_clip's proj: the layer is named as its parameter
            return taus[name]
        W, b = taus.get(self.weight), taus.get(self.bias) if self.bias is not None else None
        if W is None and b is None:
            return None
        if W is not None:
            W = as_matrix(W, self.layout)
        if W is None:
            W = b.new_zeros(b.shape[0], self.columns - 1)
        if self.bias is None:
            return W
        return torch.cat([W, (torch.zeros_like(W[:, :1]) if b is None else b[:, None].to(W.dtype))], dim=1)


@dataclass(frozen=True)
class DenseFactors:
    """The exact GGN block G of a small parameter group (``tak.curvature.dense``), as a Kronecker
    block B = G, A = [[1]] of the flattened, concatenated parameters ``params`` (sizes ``sizes``)."""

    A: object
    B: object
    params: tuple[str, ...]
    sizes: tuple[int, ...]

    @property
    def block_shape(self) -> tuple[int, int]:
        return sum(self.sizes), 1

    def block(self, taus: dict, name: str):
        """The group's task vector as a column (Σ sizes, 1) from ``taus`` (by group or parameter names;
        a missing parameter counts as zero), or None when ``taus`` has none of it."""
        if name in taus:
            return taus[name].reshape(-1, 1)
        present = [taus[p] for p in self.params if p in taus]
        if not present:
            return None
        parts = [taus[p].reshape(-1) if p in taus else present[0].new_zeros(s) for p, s in zip(self.params, self.sizes)]
        return torch.cat(parts).reshape(-1, 1)


class Factors(Mapping):
    """Per-layer curvature factors (a dataclass per layer, by name) and the metadata that says how
    they were made (``.meta``): the container protocol shared by ``KFAC`` and ``EKFAC``."""

    def __init__(self, factors: dict, meta: dict):
        self.factors, self.meta = dict(factors), dict(meta)

    def __getitem__(self, name: str):
        return self.factors[name]

    def __iter__(self):
        return iter(self.factors)

    def __len__(self) -> int:
        return len(self.factors)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} layers, tokens={self.meta.get('tokens')}, N={self.meta.get('n_examples')})"

    def blocks(self, taus: dict) -> tuple[list[str], list[torch.Tensor]]:
        """(names, blocks): the factored layers found in ``taus`` and their task-vector blocks. ``taus``
        is keyed by layer name (blocks [W | b]), or by parameter name as ``tak.linearize(...).task_vector()``
        gives them."""
        if not isinstance(taus, Mapping):
            raise TypeError(f"quadratic_form: taus must be a mapping {{layer or parameter name: tensor}}, got "
                            f"{type(taus).__name__}")
        names, blocks = [], []
        for name, lf in self.factors.items():
            try:
                block = lf.block(taus, name)
            except RuntimeError:  # a W and b that do not fit together
                block = torch.empty(0)
            if block is not None and tuple(block.shape) != lf.block_shape:
                given = {k: tuple(taus[k].shape) for k in (name, *lf.params) if k in taus}
                raise ValueError(f"quadratic_form: layer {name!r} has factors for a block of shape {lf.block_shape}"
                                 f"{_parts(lf)}; taus gives {given}")
            if block is not None:
                names.append(name)
                blocks.append(block)
        if not names:
            first = next(iter(self.factors.values()))
            raise ValueError(f"quadratic_form: taus names none of the {len(self)} factored layers "
                             f"(e.g. {next(iter(self.factors))!r} or its parameter {first.params[0]!r})")
        return names, blocks

    def layer_weights(self, weights, names: list[str]) -> list[float]:
        """[w_l] of the layers ``names`` from ``weights`` {layer name: number} (None: all 1; missing: 1).
        Names of no factored layer are refused (a parameter name is told its layer's), and so are
        weights that require grad: the kernels take constants."""
        if weights is None:
            return [1.0] * len(names)
        if not isinstance(weights, Mapping):
            raise TypeError("quadratic_form: weights must be a mapping {layer name: number}, got "
                            f"{type(weights).__name__}")
        unknown = [k for k in weights if k not in self.factors]
        if unknown:
            owners = {p: n for n, f in self.factors.items() for p in f.params}
            hints = "".join(f"; parameter {k!r} is in layer {owners[k]!r}" for k in unknown if k in owners)
            raise ValueError(f"quadratic_form: weights names {len(unknown)} keys that are not factored layers: "
                             f"{unknown[:5]}{hints} (weights are keyed by layer name, e.g. "
                             f"{next(iter(self.factors))!r})")
        learnable = [k for k, w in weights.items() if isinstance(w, torch.Tensor) and w.requires_grad]
        if learnable:
            raise ValueError(f"quadratic_form: weights must be constants; {learnable[:5]} require grad")
        return [float(weights.get(n, 1.0)) for n in names]

    def save(self, path) -> None:
        """Write safetensors + JSON metadata atomically (see ``tak.curvature.storage``)."""
        from .storage import save
        save(self, path)

    @classmethod
    def load(cls, path, model: nn.Module | None = None, device=None):
        """Read a file written by ``save``; with ``model``, refuse factors of another architecture."""
        from .storage import load
        obj = load(path, model=model, device=device)
        if not isinstance(obj, cls):
            raise ValueError(f"{path}: holds {type(obj).__name__} factors, not {cls.__name__}")
        return obj


def _parts(lf) -> str:
    """What a layer's block [W | b] is made of, for error messages ("" for an exact block's column)."""
    if not hasattr(lf, "weight"):
        return ""
    rows, cols = lf.block_shape
    parts = f": W {(rows, cols - 1)} and b ({rows},)" if lf.bias is not None else f": W {(rows, cols)}"
    return parts + (f", W the {lf.layout} weight as a matrix" if lf.layout != "linear" else "")


class KFAC(Factors):
    """Per-layer Kronecker factors ``f[name].A``, ``f[name].B`` (``LayerFactors``, or ``DenseFactors``
    for the exact blocks) and the metadata that says how they were made (``f.meta``)."""

    def quadratic_form(self, taus: dict, weights=None) -> torch.Tensor:
        """Σ_l w_l vec(τ_l)ᵀ (B_l ⊗ A_l) vec(τ_l) over the layers found in ``taus`` (see ``blocks``), in one
        ``kfac_kernels.quadratic_forms`` call; differentiable in τ. ``weights``: {layer: w} (see ``layer_weights``)."""
        names, blocks = self.blocks(taus)
        return kk.quadratic_forms(blocks, [self.factors[n].B for n in names], [self.factors[n].A for n in names],
                                  weights=self.layer_weights(weights, names))

    def to(self, device=None, dtype=None) -> "KFAC":
        """A copy with dense factors moved/cast (compressed ones are moved)."""
        def move(F):
            if isinstance(F, torch.Tensor):
                return F.to(device=device, dtype=dtype)
            return F.to(device) if device is not None else F
        return type(self)({n: replace(lf, A=move(lf.A), B=move(lf.B)) for n, lf in self.factors.items()}, self.meta)


MAX_FACTOR_ENTRIES = 2 ** 32  # of one dense factor, 16 GiB in fp32: a large vocabulary's LM head has more


class _Accumulator:
    """Sums of ã ãᵀ and g gᵀ per layer (fp32, on the model's device), with their row counts. A layer's B (a dense
    group's G) is made at its first output gradient: a layer the output does not depend on never gets one."""

    def __init__(self, layers: dict[str, Layer], tokens: str, device, dense: dict[str, DenseGroup] | None = None):
        self.layers, self.tokens, self.device = layers, tokens, device
        self.G, self.B = {}, {}
        self.A = {n: torch.zeros(l.d_in, device=device) if l.layout == "embedding" else
                  self.square(n, "A", l.block_shape[1]) for n, l in layers.items()}
        self.rows = {n: torch.zeros((), dtype=torch.float64, device=device) for n in layers}
        self.n = torch.zeros((), dtype=torch.float64, device=device)

    def square(self, name: str, side: str, n: int) -> torch.Tensor:
        """A factor of zeros (n × n) for layer or group ``name``; ValueError past ``MAX_FACTOR_ENTRIES`` entries."""
        if n * n > MAX_FACTOR_ENTRIES:
            raise ValueError(f"layers: {name!r} has a factor too large to hold, its {side} of {n} × {n} "
                             f"({n * n * 4 / 2**30:.0f} GiB in fp32): leave it out (layers=...), or fit on features "
                             "read before it (a causal LM's head: the lm: backbone fits the decoder alone)")
        return torch.zeros(n, n, device=self.device)

    def start(self, batch, layouts: dict) -> None:
        self.batch = BatchTokens(batch, layouts)

    def on_input(self, layer: Layer, a: torch.Tensor, call: int = 0):
        """A shared input's rows count once for each of the N examples that share them (``tokens`` docstring)."""
        copies = self.batch.n if self.batch.shared(layer.name, a, call) else 1
        positions = layer.layout == "embedding" and copies > 1 and self.batch.layouts.get((layer.name, call)) != TABLE
        own = _own_positions(a.detach()[..., 0], self.batch) if positions else None
        if own is not None:
            (a, mask), copies = own, 1
        else:
            a, mask = self.batch.view(a.detach(), layer.name, call)
        reduced = a.dim() == 3 and self.tokens == "reduce"
        if layer.layout == "embedding":
            _add_token_counts_(self.A[layer.name], a[..., 0], mask, copies, reduced)
        else:
            if reduced:
                a, mask = token_mean(a, mask), None
            kk.covariance_update_(self.A[layer.name], a, scale=copies, mask=mask, append_ones=layer.bias is not None)
        if reduced:  # one row per example
            rows = a.shape[0]
        else:
            rows = a.shape[0] * (a.shape[1] if a.dim() == 3 else 1) if mask is None else mask.sum()
        self.rows[layer.name] += copies * rows

    def on_grad(self, layer: Layer, g: torch.Tensor, samples: int = 0, call: int = 0):
        """g: dz (N, [T,] d_out) of one cotangent of the layer's ``call``, or (samples, N, [T,] d_out) of a batch of
        them."""
        views = [self.batch.view(gi, layer.name, call) for gi in (g.detach().unbind(0) if samples else [g.detach()])]
        mask = views[0][1]
        if views[0][0].dim() == 3 and self.tokens == "reduce":
            views, mask = [(token_sum(gi, mask), None) for gi, _ in views], None
        rows = views[0][0] if len(views) == 1 else torch.cat([gi for gi, _ in views])
        if layer.name not in self.B:
            self.B[layer.name] = self.square(layer.name, "B", layer.d_out)
        kk.covariance_update_(self.B[layer.name], rows, mask=None if mask is None else mask.repeat(len(views), 1))

    def on_dense(self, group: DenseGroup, v: torch.Tensor):
        """v: per-example gradient vectors (N, size) of the group (or (samples·N, size))."""
        if group.name not in self.G:
            self.G[group.name] = self.square(group.name, "G", group.size)
        kk.covariance_update_(self.G[group.name], v.detach())


def _own_positions(ids: torch.Tensor, batch: BatchTokens):
    """Token ids the batch shares (position ids (1, T), T5's relative-position buckets (T, T)) as each example's
    own, (N, ·, 1), with the mask (N, ·) of those at real positions only (real along every dim of a token length T
    of the batch); None when a dim of ``ids`` is neither 1 nor such a length."""
    real = torch.ones((batch.n, *ids.shape), dtype=torch.bool, device=ids.device)
    for dim, t in enumerate(ids.shape):
        if t in batch.masks:
            real = real & batch.masks[t].reshape(batch.n, *(t if d == dim else 1 for d in range(ids.dim())))
        elif t != 1:
            return None
    return ids.expand(batch.n, *ids.shape).reshape(batch.n, -1, 1), real.reshape(batch.n, -1)


def _add_token_counts_(A: torch.Tensor, ids: torch.Tensor, mask, copies: int, reduced: bool) -> None:
    """A (V,) += ``copies`` × the diagonal of Σ ã ãᵀ over the one-hot rows ã of the real token ids (N, T) (or
    (N,)): each id's count; when ``reduced``, of the examples' token means ā: Σ_n (count_{n,v} / T_n)²."""
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    if not reduced:  # padding counts zero times (no host sync for the real ones' number)
        A.index_add_(0, ids.reshape(-1), real.reshape(-1).to(A.dtype) * copies)
        return
    n, v = ids.shape[0], A.shape[0]
    example = torch.arange(n, device=ids.device)[:, None].expand_as(ids)[real]
    pairs, counts = torch.unique(example * v + ids[real], return_counts=True)
    means = counts / real.sum(1)[pairs // v]
    A.index_add_(0, pairs % v, copies * means.square().to(A.dtype))


def fit_kfac(model: nn.Module, batches, *, output_fn=None, mc_samples: int = 1, exact: bool = False,
             tokens: str = "expand", layers=None, dense: bool = True, probe_chunk: int = 16, seed: int = 0,
             progress: bool = True) -> KFAC:
    """KFAC factors (fp32) of the Jacobian Gramian of ``output_fn(model, batch)`` for the linear layers
    of ``model`` (all, or those ``layers`` selects; see ``find_layers``) over ``batches`` (tensors, or
    dicts for Hugging Face models). One forward per batch feeds A; one backward that reaches only the
    layer outputs feeds B (M > 1 samples or exact probes: batched backwards of ``probe_chunk``
    cotangents each). With ``dense``, the norms, LayerScales and class token get their exact GGN blocks
    (``DenseFactors``, see ``tak.curvature.dense``) from the same probes. The model runs in eval mode,
    with in-place activations made out of place (``fitting_mode``); its parameters, training flags and
    ``.grad`` are untouched. ``seed`` seeds the Monte-Carlo probes (seed + rank on each rank of a
    ``torch.distributed`` fit, whose factors are those of all ranks' batches)."""
    check_fit_arguments(mc_samples, probe_chunk, tokens)
    found, groups = select_targets(model, layers, dense)
    acc = _Accumulator(found, tokens, next(model.parameters()).device, dense=groups)
    capture = Capture(found, acc.on_input, acc.on_grad, groups, acc.on_dense)
    fit_pass(model, batches, capture, acc, output_fn=output_fn, mc_samples=mc_samples, exact=exact,
             probe_chunk=probe_chunk, seed=seed, progress=progress, desc="KFAC factors")
    return _finish(acc, found, groups, model, tokens=tokens, mc_samples=mc_samples, exact=exact, seed=seed)


def check_fit_arguments(mc_samples: int, probe_chunk: int, tokens: str = "expand") -> None:
    if tokens not in ("expand", "reduce"):
        raise ValueError(f"tokens must be 'expand' or 'reduce', got {tokens!r}")
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}")
    if not isinstance(probe_chunk, int) or probe_chunk < 1:
        raise ValueError(f"probe_chunk must be a positive int, got {probe_chunk!r}")


def fit_pass(model, batches, capture: Capture, acc, *, output_fn, mc_samples, exact, probe_chunk, seed, progress, desc):
    """One pass over ``batches``: per batch, ``acc.start(batch, layouts)``, a forward that feeds
    ``capture``'s input callbacks, and a backward of the probes that feeds its gradient callbacks;
    ``acc.n`` counts the examples. The layouts of the layers' inputs are measured on the first batch
    (``measure_layouts``). Probes are seeded with ``seed`` + rank (independent on each rank)."""
    if isinstance(batches, (torch.Tensor, dict)):
        raise TypeError(f"batches: an iterable of batches, got one {type(batches).__name__}; pass [batch] for one "
                        "batch (iterating a tensor would give single examples without their batch dim)")
    output_fn = output_fn or default_output_fn(model)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed + rank())
    total = len(batches) if hasattr(batches, "__len__") else None
    layouts, measured, unmeasured = {}, False, None
    with fitting_mode(model), torch.enable_grad():
        with capture as cap:
            for batch in tqdm(batches, total=total, desc=desc, disable=not progress, leave=False):
                batch = to_device(batch, device)
                if not measured:
                    with cap.paused():  # the measuring forwards feed no factor
                        found, unmeasured = measure_layouts(model, batch, output_fn, capture.model_fed_modules())
                    layouts.update(found)
                    one = examples(batch, [0])
                    cap.check_in_place(model, one, output_fn, BatchTokens(one, layouts))
                    measured = True
                acc.start(batch, layouts)
                cap.clear(acc.batch)
                f = output_fn(model, batch)
                if unmeasured:  # the whole batch ran: the fallback to the shapes is real
                    warnings.warn(unmeasured, stacklevel=3)
                    unmeasured = None
                if not isinstance(f, torch.Tensor):
                    raise TypeError(f"{desc}: output_fn returned a {type(f).__name__}, not a tensor: pass output_fn= "
                                    "(model, batch) -> the feature tensor whose Jacobian Gramian to approximate")
                if f.requires_grad:  # else f depends on no selected layer: nothing to add
                    cap.probe(f, probes(f, mc_samples, exact, generator, acc.batch.mask_of(f)), probe_chunk)
                acc.n += acc.batch.n


def check_finite(what: str, sums: dict[str, list[torch.Tensor]]) -> None:
    """Refuses sums with NaN or infinite entries (``sums``: layer -> its tensors), naming the layers: some batch gave
    a non-finite input, activation or output there, and every form on such factors would be NaN."""
    finite = torch.stack([torch.stack([t.isfinite().all() for t in ts]).all() for ts in sums.values()]).tolist()
    bad = [name for name, ok in zip(sums, finite) if not ok]  # one host sync
    if bad:
        raise ValueError(f"{what}: the sums of {len(bad)} of {len(sums)} layers have NaN or infinite entries "
                         f"({', '.join(map(repr, bad[:5]))}{', ...' if len(bad) > 5 else ''}): some batch gave a "
                         "non-finite input, activation or output there (in 16-bit: an overflow?); nothing was fitted")


def select_targets(model, layers, dense: bool) -> tuple[dict[str, Layer], dict[str, DenseGroup]]:
    """The linear layers and (with ``dense``) dense groups that ``layers`` selects (see ``tak._selection``)."""
    found = find_layers(model)
    groups = find_dense_groups(model) if dense else {}
    check_patterns(layers, [*found, *groups], "layers", "linear layer or dense group of the model")
    found = {n: layer for n, layer in found.items() if selects(layers, n)}
    groups = {n: g for n, g in groups.items() if selects(layers, n)}
    if not found and not groups:
        raise ValueError("layers: selects nothing")
    return found, groups


def on_output_path(what: str, layers: dict, groups: dict, reached: set[str], device) -> tuple[dict, dict, list]:
    """(layers, groups, off_path): those of ``layers`` and dense ``groups`` whose output gradient came on some rank
    (``reached``: this rank's), the ones the output depends on, and the names of the others (a CLIP text tower under
    image features, T5's LM head after the decoder state the features read). These get no factors, which would be
    zeros that count their parameters as penalized; the fits name them in ``meta["off_path"]``. ValueError when none
    is left."""
    names = [*layers, *groups]
    flags = torch.tensor([float(n in reached) for n in names], device=device)
    all_reduce_sums([flags])
    kept = {n for n, flag in zip(names, flags.tolist()) if flag > 0}
    if not kept and names:
        raise ValueError(f"{what}: the output depends on none of the {len(names)} selected layers (e.g. "
                         f"{names[0]!r}): no output gradient reached them")
    return ({n: v for n, v in layers.items() if n in kept}, {n: v for n, v in groups.items() if n in kept},
            [n for n in names if n not in kept])


def _finish(acc: _Accumulator, found, groups, model, **how) -> KFAC:
    """Sums over all ranks, normalized as the module docstring says, of the layers and groups the output depends on."""
    counts = torch.stack([acc.n, *acc.rows.values()])
    all_reduce_sums([counts])
    n, rows = int(counts[0]), dict(zip(acc.rows, counts[1:].tolist()))
    if n == 0:
        raise ValueError("fit_kfac: batches is empty")
    found, groups, off_path = on_output_path("fit_kfac", found, groups, {*acc.B, *acc.G}, acc.device)
    for name, layer in found.items():  # reached on another rank only
        if name not in acc.B:
            acc.B[name] = acc.square(name, "B", layer.d_out)
    for name, group in groups.items():
        if name not in acc.G:
            acc.G[name] = acc.square(name, "G", group.size)
    all_reduce_sums([*(acc.A[name] for name in found), *(acc.B[name] for name in found),
                     *(acc.G[name] for name in groups)])
    check_finite("fit_kfac", {**{name: [acc.A[name], acc.B[name]] for name in found},
                              **{name: [acc.G[name]] for name in groups}})
    probes = 1 if how["exact"] else how["mc_samples"]
    factors = {name: LayerFactors(A=acc.A[name] / max(rows[name], 1.0), B=acc.B[name] / (n * probes),
                                  weight=layer.weight, bias=layer.bias, layout=layer.layout)
               for name, layer in found.items()}
    params = dict(model.named_parameters())
    for name, group in groups.items():
        factors[name] = DenseFactors(A=torch.ones(1, 1, device=acc.G[name].device), B=acc.G[name] / (n * probes),
                                     params=group.params, sizes=tuple(params[p].numel() for p in group.params))
    meta = {
        "kind": "kfac", "format_version": FORMAT_VERSION, "library_version": kk.__version__,
        "tokens": how["tokens"], "exact": how["exact"], "mc_samples": how["mc_samples"], "seed": how["seed"],
        "n_examples": n, "n_rows": {k: int(v) for k, v in rows.items() if k in found},
        "scale": "A = sum(a a^T)/rows; B = sum(g g^T)/(N * probes), probes = mc_samples (1 if exact)",
        "layers": {name: layer.meta() for name, layer in found.items()},
        "dense": {name: {"params": list(g.params), "kind": g.kind, "size": g.size} for name, g in groups.items()},
        "off_path": off_path,
        "model": type(model).__name__, "fingerprint": architecture_fingerprint(model),
    }
    return KFAC(factors, meta)
