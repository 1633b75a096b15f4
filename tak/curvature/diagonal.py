"""The diagonal of the GGN, for the diagonal-curvature baseline (Porrello et al. 2025; TAK Sec. 5).

For every parameter θ_i, D_i = 1/(N·M) Σ_{n,m} ((J_θ f_n)ᵀ s_m)_i² over examples n and probes s_m
(M Monte-Carlo samples averaged, or the C unit probes summed when ``exact``: then D is the exact
diagonal). A linear layer's D (d_out × d_in[+1]) is Σ_{n,m} G_{n,m}² with the per-example
pseudo-gradient G = Σ_t g ãᵀ — EK-FAC's eigenvalue pass in the identity basis; a LayerNorm's or the
class token's is Σ v² over its per-example gradient vectors v. The penalty is q(τ) = Σ_l w_l Σ D_l ⊙ τ_l².
"""
from dataclasses import dataclass, replace

import torch

import kfac_kernels as kk

from ..io import architecture_fingerprint
from .capture import Capture
from .distributed import all_reduce_sums
from .ekfac import EigenAccumulator
from .kfac import (FORMAT_VERSION, DenseFactors, Factors, LayerFactors, check_finite, check_fit_arguments,
                   fit_pass, on_output_path, select_targets)


@dataclass(frozen=True)
class DiagonalFactors:
    """D (d_out × d_in[+1]) of a linear layer's parameters [W | b]."""

    D: torch.Tensor
    weight: str
    bias: str | None
    layout: str = "linear"

    block = LayerFactors.block
    params = LayerFactors.params

    @property
    def columns(self) -> int:
        return self.D.shape[1]

    @property
    def block_shape(self) -> tuple[int, int]:
        return tuple(self.D.shape)


@dataclass(frozen=True)
class DenseDiagonal:
    """D (Σ sizes × 1) of a LayerNorm's or the class token's parameters, flattened and concatenated."""

    D: torch.Tensor
    params: tuple[str, ...]
    sizes: tuple[int, ...]

    block = DenseFactors.block
    block_shape = DenseFactors.block_shape


class DiagonalGGN(Factors):
    """Per-layer GGN diagonals ``d[name].D`` and the metadata that says how they were made (``d.meta``)."""

    def quadratic_form(self, taus: dict, weights=None) -> torch.Tensor:
        """Σ_l w_l Σ D_l ⊙ τ_l² over the layers found in ``taus`` (see ``KFAC.blocks``); differentiable in τ."""
        names, blocks = self.blocks(taus)
        total = torch.zeros((), dtype=torch.float32, device=blocks[0].device)
        for block, w, name in zip(blocks, self.layer_weights(weights, names), names):
            total = total + w * (self.factors[name].D * block.float().square()).sum()
        return total

    def to(self, device=None, dtype=None) -> "DiagonalGGN":
        return type(self)({n: replace(f, D=f.D.to(device=device, dtype=dtype)) for n, f in self.factors.items()},
                          self.meta)


def fit_diagonal(model, batches, *, output_fn=None, mc_samples: int = 1, exact: bool = False, layers=None,
                 dense: bool = True, probe_chunk: int = 16, seed: int = 0, progress: bool = True) -> DiagonalGGN:
    """The GGN diagonal of ``output_fn(model, batch)`` for the linear layers (and, with ``dense``, the
    norms and class token) that ``layers`` selects, in one pass with the probes and model handling of
    ``fit_kfac``. It has no token convention: D squares each example's whole gradient (summed over tokens)."""
    check_fit_arguments(mc_samples, probe_chunk)
    found, groups = select_targets(model, layers, dense)
    device = next(model.parameters()).device
    acc = EigenAccumulator(found, {n: (None, None) for n in found}, device)
    squares = {n: torch.zeros(g.size, device=device) for n, g in groups.items()}
    reached = set()  # the dense groups an output gradient came to

    def on_dense(group, v):
        reached.add(group.name)
        squares[group.name] += v.detach().float().square().sum(0)

    fit_pass(model, batches, Capture(found, acc.on_input, acc.on_grad, groups, on_dense), acc, output_fn=output_fn,
             mc_samples=mc_samples, exact=exact, probe_chunk=probe_chunk, seed=seed, progress=progress,
             desc="GGN diagonal")
    counts = acc.n.reshape(1).clone()
    all_reduce_sums([counts])
    n = int(counts[0])
    if n == 0:
        raise ValueError("fit_diagonal: batches is empty")
    found, groups, off_path = on_output_path("fit_diagonal", found, groups, acc.reached | reached, device)
    all_reduce_sums([*(acc.S[name] for name in found), *(squares[name] for name in groups)])
    check_finite("fit_diagonal", {**{name: [acc.S[name]] for name in found},
                                  **{name: [squares[name]] for name in groups}})
    scale = n * (1 if exact else mc_samples)
    factors = {name: DiagonalFactors(acc.S[name] / scale, layer.weight, layer.bias, layer.layout)
               for name, layer in found.items()}
    params = dict(model.named_parameters())
    for name, group in groups.items():
        factors[name] = DenseDiagonal((squares[name] / scale).reshape(-1, 1), group.params,
                                      tuple(params[p].numel() for p in group.params))
    meta = {
        "kind": "diagonal", "format_version": FORMAT_VERSION, "library_version": kk.__version__,
        "tokens": "expand",  # the per-example gradient G = Σ_t g ãᵀ, as "expand" sums it
        "exact": exact, "mc_samples": mc_samples, "seed": seed, "n_examples": n,
        "scale": "D = sum(per-example gradient^2 over examples and probes)/(N * probes), probes = mc_samples (1 if exact)",
        "layers": {name: layer.meta() for name, layer in found.items()},
        "dense": {name: {"params": list(g.params), "kind": g.kind, "size": g.size} for name, g in groups.items()},
        "off_path": off_path,
        "model": type(model).__name__, "fingerprint": architecture_fingerprint(model),
    }
    return DiagonalGGN(factors, meta)
