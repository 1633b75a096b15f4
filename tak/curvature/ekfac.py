"""EK-FAC: KFAC's Kronecker eigenbasis with eigenvalues fitted to the per-example gradients.

For a linear layer with KFAC factors A = U_A Λ_A U_Aᵀ and B = U_B Λ_B U_Bᵀ (float64 eigh), the
corrected eigenvalues are

    S = 1/(N·M) Σ_{n,m} (U_Bᵀ G_{n,m} U_A)²      (elementwise square; S is d_out × d_in[+1])

with the per-example pseudo-gradient of probe m, G_{n,m} = Σ_t g_{n,t} ã_{n,t}ᵀ over the real tokens of all the
layer's calls in the forward (a layer applied twice, an attention's fused in_proj on a probe and on the tokens).
G is the example's gradient whatever ``tokens`` is: that convention shapes the KFAC factors, so the
eigenbasis, and S corrects its eigenvalues to the true gradients' second moments (George et al. 2018);
M Monte-Carlo probes averaged, or the C unit probes summed (``exact``, 1/N). The layer's GGN block is
≈ (U_B ⊗ U_A) diag(vec S) (U_B ⊗ U_A)ᵀ, so q(τ) = Σ S ⊙ (U_Bᵀ τ U_A)²; with S = λ_B λ_Aᵀ this is KFAC's
form. An embedding's A is diagonal (``tak.curvature.kfac``): its eigenbasis U_A is the identity (None), and
G_n's column v sums the g of the example's tokens with id v. Linear layers get EK-FAC factors; the exact GGN blocks
of the small parameters (LayerNorms, class token: ``DenseFactors`` of the KFAC pass) are kept as they are, so
DELTA's drift penalty reaches them too.

The pass computes rotated products R_n = Σ_t (U_Bᵀ g_t)(U_Aᵀ ã_t)ᵀ: ã is rotated at the forward,
g at the backward, then R_n² is summed over the batch, so no more than one batch of per-example
gradients (chunked over examples) is ever held.
"""
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

import kfac_kernels as kk

from ..io import architecture_fingerprint
from .capture import Capture
from .distributed import all_reduce_sums
from .kfac import (FORMAT_VERSION, KFAC, DenseFactors, Factors, LayerFactors, check_finite, check_fit_arguments,
                   fit_kfac, fit_pass, on_output_path)
from .layers import Layer, find_layers, selects
from .tokens import BatchTokens

@dataclass(frozen=True)
class EigenFactors:
    """One layer's EK-FAC factors: eigenvectors U_B (d_out × d_out) and U_A (d_in[+1] × d_in[+1], None for an
    embedding's: the identity) as columns, corrected eigenvalues S (d_out × d_in[+1]), and the parameters [W | b]
    they belong to."""

    U_B: torch.Tensor
    U_A: torch.Tensor | None
    S: torch.Tensor
    weight: str
    bias: str | None
    layout: str = "linear"

    block = LayerFactors.block  # the task-vector block [W | b], found the same way as for KFAC

    @property
    def columns(self) -> int:
        return self.S.shape[1] if self.U_A is None else self.U_A.shape[0]

    @property
    def block_shape(self) -> tuple[int, int]:
        return self.U_B.shape[0], self.columns

    params = LayerFactors.params


class EKFAC(Factors):
    """Per-layer EK-FAC factors ``e[name].U_B``, ``.U_A``, ``.S`` and the metadata that says how they
    were made (``e.meta``)."""

    def quadratic_form(self, taus: dict, weights=None) -> torch.Tensor:
        """Σ_l w_l Σ S_l ⊙ (U_B,lᵀ τ_l U_A,l)² over the layers found in ``taus`` (keyed by layer name with
        blocks [W | b], or by parameter name), in one ``kfac_kernels.eigen_quadratic_forms`` call, plus
        the exact blocks' w τᵀ G τ in one ``quadratic_forms`` call; differentiable in τ. ``weights``:
        {layer: w} (default 1)."""
        names, blocks = self.blocks(taus)
        weight = self.layer_weights(weights, names)
        eigen = [i for i, n in enumerate(names) if isinstance(self.factors[n], EigenFactors)]
        dense = [i for i in range(len(names)) if i not in eigen]
        total = 0
        if eigen:
            fs = [self.factors[names[i]] for i in eigen]
            total = kk.eigen_quadratic_forms([blocks[i] for i in eigen], [f.U_B for f in fs], [f.U_A for f in fs],
                                             [f.S for f in fs], weights=[weight[i] for i in eigen])
        if dense:
            fs = [self.factors[names[i]] for i in dense]
            total = total + kk.quadratic_forms([blocks[i] for i in dense], [f.B for f in fs], [f.A for f in fs],
                                               weights=[weight[i] for i in dense])
        return total

    def to(self, device=None, dtype=None) -> "EKFAC":
        """A copy with every factor moved/cast."""
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype)

        def moved(f):
            if isinstance(f, EigenFactors):
                return replace(f, U_B=move(f.U_B), U_A=move(f.U_A), S=move(f.S))
            return replace(f, A=move(f.A), B=move(f.B))
        return type(self)({n: moved(f) for n, f in self.factors.items()}, self.meta)


class EigenAccumulator:
    """Σ_{n,m} (U_Bᵀ G_{n,m} U_A)² per layer (fp32, on the model's device), with row counts. A basis
    that is None is the identity (no rotation): then S holds the squared per-example gradients."""

    def __init__(self, layers: dict[str, Layer], bases: dict[str, tuple], device):
        self.layers, self.bases = layers, bases
        self.S = {n: torch.zeros(l.d_out if bases[n][0] is None else bases[n][0].shape[1],
                                 l.d_in + (l.bias is not None) if bases[n][1] is None else bases[n][1].shape[1],
                                 device=device) for n, l in layers.items()}
        self.rows = {n: torch.zeros((), dtype=torch.float64, device=device) for n in layers}
        self.n = torch.zeros((), dtype=torch.float64, device=device)
        self.device, self.reached = device, set()  # reached: the layers an output gradient came to

    def start(self, batch, layouts: dict) -> None:
        self.batch, self.inputs, self.pending = BatchTokens(batch, layouts), {}, {}

    def on_input(self, layer: Layer, a: torch.Tensor, call: int = 0):
        """Stash U_Aᵀ ã of the layer's ``call``: (N, T, r_A) with padding tokens zeroed, or (N, r_A) (2-D input); for
        an input the batch shares (``tokens``), (1, T, r_A): its products with the batch's summed gradient count as
        one more example's, their cross terms with the examples' own calls left out."""
        calls = self.inputs.setdefault(layer.name, [])
        shared = self.batch.shared(layer.name, a, call)
        a, mask = self.batch.view(a.detach(), layer.name, call)
        rows = a.shape[0] * (a.shape[1] if a.dim() == 3 else 1) if mask is None else mask.sum()
        self.rows[layer.name] += (self.batch.n if shared else 1) * rows
        if layer.layout == "embedding":  # the token ids (N, [T,] 1), padding as -1
            calls.append((shared, a if mask is None else a.masked_fill(~mask.bool().unsqueeze(-1), -1)))
            return
        U_A = self.bases[layer.name][1]
        if U_A is None:
            a = a.float() if layer.bias is None else torch.cat([a.float(), a.new_ones(*a.shape[:-1], 1).float()], -1)
        else:
            a = a.to(U_A.dtype) @ (U_A if layer.bias is None else U_A[:-1])
            if layer.bias is not None:
                a += U_A[-1]  # the ones column of ã
        calls.append((shared, a if mask is None else a * mask.unsqueeze(-1).to(a.dtype)))

    def on_grad(self, layer: Layer, g: torch.Tensor, samples: int = 0, call: int = 0):
        """g: dz (N, [T,] d_out) of one cotangent of the layer's ``call``, or (samples, N, [T,] d_out) of a batch of
        them; (1, T, d_out) each for a shared input. The example's gradient G_n sums those of its own calls (a layer
        applied twice, a probe attending over the tokens): Σ_calls g_nᵀ a_n, one product over their tokens joined,
        once each call's g has come."""
        self.reached.add(layer.name)
        calls, U_B = self.inputs[layer.name], self.bases[layer.name][0]
        views = [self.batch.view(gi, layer.name, call)[0] for gi in (g.detach().unbind(0) if samples else [g.detach()])]
        rotated = [gi.float() if U_B is None else gi.to(U_B.dtype) @ U_B for gi in views]
        own = [i for i, (shared, _) in enumerate(calls) if not shared]
        if call not in own or len(own) == 1:
            a, products = calls[call][1], rotated
        else:
            pending = self.pending.setdefault(layer.name, {})
            pending[call] = rotated
            if len(pending) < len(own):
                return
            tokens = lambda t: t if t.dim() == 3 else t.unsqueeze(1)  # noqa: E731  (N, r) -> (N, 1, r)
            a = torch.cat([tokens(calls[i][1]) for i in own], 1)
            products = [torch.cat([tokens(gi) for gi in parts], 1) for parts in zip(*(pending.pop(i) for i in own))]
        for gi in products:  # S += Σ_n (g_nᵀ a_n)² for the rotated g (N, [T,] r_B) and a (N, [T,] r_A), fused
            if layer.layout == "embedding":
                _add_squared_token_sums_(self.S[layer.name], gi, a)
            else:
                kk.squared_products_update_(self.S[layer.name], gi, a)


def _add_squared_token_sums_(S: torch.Tensor, g: torch.Tensor, ids: torch.Tensor) -> None:
    """S (r_B, V) += Σ_n G_n² for an embedding: G_n (r_B, V) has in column v the sum of the rotated g (N, [T,] r_B)
    over the example's tokens of id v (``ids`` (N, [T,] 1), -1 for padding)."""
    ids, g = ids.reshape(g.shape[0], -1), g.reshape(g.shape[0], -1, g.shape[-1])
    real, v = ids >= 0, S.shape[1]
    example = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)[real]
    pairs, index = torch.unique(example * v + ids[real], return_inverse=True)
    G = g.new_zeros(len(pairs), g.shape[-1]).index_add_(0, index, g[real])
    S.index_add_(1, pairs % v, G.float().square().T)


def fit_ekfac(model: nn.Module, batches, *, kfac: KFAC | None = None, output_fn=None, mc_samples: int = 1,
              exact: bool = False, tokens: str = "expand", layers=None, dense: bool = True, probe_chunk: int = 16,
              seed: int = 0, progress: bool = True) -> EKFAC:
    """EK-FAC factors (fp32) of the Jacobian Gramian of ``output_fn(model, batch)`` for the linear
    layers of ``model`` (those ``layers`` selects, see ``find_layers``; with ``kfac``, among its layers)
    and, with ``dense`` and no ``kfac`` given, the exact blocks of the norms, LayerScales and class token.

    The eigenbases come from ``kfac`` (dense factors), or from ``fit_kfac`` on the same ``batches``
    first (then ``batches`` must be re-iterable: a list or a DataLoader, not an iterator). A second
    pass over ``batches`` — one forward, one output-only backward per batch, probes (``seed``) and
    token handling as in ``fit_kfac`` — sums the corrected eigenvalues (module docstring). The model
    runs as in ``fit_kfac`` (``fitting_mode``); its parameters, flags and ``.grad`` are untouched.
    Under ``torch.distributed`` each rank passes its own shard of the batches and gets the factors
    of all of them."""
    check_fit_arguments(mc_samples, probe_chunk, tokens)
    expected_n = None
    if kfac is None:
        if isinstance(batches, Iterator):
            raise TypeError("fit_ekfac: batches is a one-shot iterator, but fitting the KFAC eigenbasis first needs "
                            "a second pass over the same batches; pass a list or a DataLoader, or pass kfac=")
        kfac = fit_kfac(model, batches, output_fn=output_fn, mc_samples=mc_samples, exact=exact, tokens=tokens,
                        layers=layers, dense=dense, probe_chunk=probe_chunk, seed=seed, progress=progress)
        expected_n = kfac.meta["n_examples"]
    found = _layers_of(model, kfac, layers, tokens)
    device = next(model.parameters()).device
    bases = {n: (_eigenvectors(kfac[n].B).to(device), None if layer.layout == "embedding" else
                 _eigenvectors(kfac[n].A).to(device)) for n, layer in found.items()}
    acc = EigenAccumulator(found, bases, device)
    fit_pass(model, batches, Capture(found, acc.on_input, acc.on_grad), acc, output_fn=output_fn,
             mc_samples=mc_samples, exact=exact, probe_chunk=probe_chunk, seed=seed, progress=progress,
             desc="EK-FAC eigenvalues")
    exact_blocks = {n: f for n, f in kfac.items()  # a given kfac's blocks may be of other data: fitted ones only
                    if expected_n is not None and isinstance(f, DenseFactors) and selects(layers, n)}
    return _finish(acc, kfac, exact_blocks, model, expected_n, tokens=tokens, mc_samples=mc_samples, exact=exact,
                   seed=seed)


def _eigenvectors(F) -> torch.Tensor:
    """Eigenvectors (columns, ascending eigenvalues) of a symmetric factor, from a float64 eigh, as contiguous fp32:
    the layout a factor file gives back, so fitted and loaded factors give bit-equal forms (a resumed run's)."""
    return torch.linalg.eigh(F.double()).eigenvectors.float().contiguous()


def _layers_of(model: nn.Module, kfac: KFAC, layers, tokens: str) -> dict[str, Layer]:
    """The model's linear layers that ``layers`` selects among ``kfac``'s dense Kronecker factors, checked."""
    if not isinstance(kfac, KFAC):
        raise TypeError("fit_ekfac: kfac must be a KFAC (from fit_kfac, merge_kfac or KFAC.load), "
                        f"got {type(kfac).__name__}")
    if kfac.meta.get("tokens", tokens) != tokens:
        raise ValueError(f"fit_ekfac: kfac was fitted with tokens={kfac.meta['tokens']!r}, this pass uses "
                         f"tokens={tokens!r}; pass the same token convention")
    model_layers = find_layers(model)
    names = [n for n, lf in kfac.items() if isinstance(lf, LayerFactors) and selects(layers, n)]
    if not names:
        raise ValueError(f"fit_ekfac: layers={layers!r} selects none of kfac's {len(kfac)} Kronecker-factored layers")
    found = {}
    for name in names:
        layer, lf = model_layers.get(name), kfac[name]
        if layer is None:
            raise ValueError(f"fit_ekfac: kfac has factors for {name!r}, which is not a linear layer of the model")
        if not (isinstance(lf.A, torch.Tensor) and isinstance(lf.B, torch.Tensor)):
            raise TypeError(f"fit_ekfac: kfac[{name!r}] holds compressed factors; EK-FAC needs dense A and B")
        d_in, d_out = layer.block_shape[1], layer.d_out
        A = (d_in,) if layer.layout == "embedding" else (d_in, d_in)  # an embedding's: its diagonal
        if tuple(lf.A.shape) != A or tuple(lf.B.shape) != (d_out, d_out):
            raise ValueError(f"fit_ekfac: kfac[{name!r}] has A {tuple(lf.A.shape)} and B {tuple(lf.B.shape)}; "
                             f"the model's layer needs A {A} and B ({d_out}, {d_out})")
        found[name] = layer
    return found


def _finish(acc: EigenAccumulator, kfac: KFAC, exact_blocks: dict, model, expected_n: int | None, **how) -> EKFAC:
    """Sums over all ranks, normalized as the module docstring says, with ``exact_blocks`` (``kfac``'s
    dense blocks) added; ``expected_n``: the examples of the KFAC pass over the same batches, if there was one."""
    counts = torch.stack([acc.n, *acc.rows.values()])
    all_reduce_sums([counts])
    n, rows = int(counts[0]), dict(zip(acc.rows, counts[1:].tolist()))
    if n == 0:
        raise ValueError("fit_ekfac: batches yielded no examples in the eigenvalue pass")
    layers, _, off_path = on_output_path("fit_ekfac", acc.layers, {}, acc.reached, acc.device)
    all_reduce_sums([acc.S[name] for name in layers])
    check_finite("fit_ekfac", {name: [acc.S[name]] for name in layers})
    if expected_n is not None and n != expected_n:
        raise ValueError(f"fit_ekfac: batches yielded {expected_n} examples in the KFAC pass and {n} "
                         "in the eigenvalue pass; it must give the same batches each time it is iterated")
    probes = 1 if how["exact"] else how["mc_samples"]
    factors = {name: EigenFactors(U_B=acc.bases[name][0], U_A=acc.bases[name][1], S=acc.S[name] / (n * probes),
                                  weight=layer.weight, bias=layer.bias, layout=layer.layout)
               for name, layer in layers.items()}
    factors.update(exact_blocks)
    meta = {
        "kind": "ekfac", "format_version": FORMAT_VERSION, "library_version": kk.__version__,
        "tokens": how["tokens"], "exact": how["exact"], "mc_samples": how["mc_samples"], "seed": how["seed"],
        "n_examples": n, "n_rows": {k: int(v) for k, v in rows.items() if k in layers},
        "scale": "S = sum((U_B^T G U_A)^2 over examples and probes)/(N * probes), probes = mc_samples (1 if exact), "
                 "G = sum_t g a^T; U_A, U_B: eigenvectors (float64 eigh) of the KFAC factors A, B",
        "layers": {name: layer.meta() for name, layer in layers.items()},
        "dense": {n: kfac.meta.get("dense", {}).get(n) for n in exact_blocks},
        "off_path": sorted({*kfac.meta.get("off_path", ()), *off_path}),
        "model": type(model).__name__, "fingerprint": architecture_fingerprint(model),
        "kfac": {k: kfac.meta.get(k) for k in ("tokens", "exact", "mc_samples", "n_examples", "scale")},
    }
    return EKFAC(factors, meta)
