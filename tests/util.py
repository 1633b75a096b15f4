"""Helpers shared by the tests."""
import hashlib

import pytest
import torch


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖ / ‖ref‖ in float64 (0 when both are 0)."""
    x, ref = x.double().cpu(), ref.double().cpu()
    den = ref.norm().item()
    num = (x - ref).norm().item()
    return num / den if den > 0 else num


# Tolerances on rel_err by compute dtype: IEEE fp32, tf32, bf16 and fp16 operands. tf32 keeps 10 mantissa bits, and
# Triton's tf32 products truncate fp32 operands to them (cuBLAS rounds): about 2^-10 per operand, hence 4e-3.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, "tf32": 4e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def legacy_fingerprint(model) -> str:
    """The fingerprint files of earlier versions carry: class name and ``name:shape:dtype;`` per parameter."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    return h.hexdigest()[:16]


def check_hvp(loss, leaves, vs, loss64, backend: str, tol: float, refused: str) -> None:
    """Hessian-vector products of ``loss`` (a scalar of ``leaves``) along ``vs`` equal torch.func's
    forward-over-reverse of the float64 ``loss64`` (of the leaves, in order) within ``tol`` (rel_err) on the
    "torch" backend; any other backend's second backward raises a RuntimeError matching ``refused``."""
    grads = torch.autograd.grad(loss, leaves, create_graph=True)
    second = sum((g * v).sum() for g, v in zip(grads, vs))
    if backend != "torch":
        with pytest.raises(RuntimeError, match=refused):
            torch.autograd.grad(second, leaves)
        return
    hvp = torch.autograd.grad(second, leaves)
    _, hvp_ref = torch.func.jvp(torch.func.grad(loss64, argnums=tuple(range(len(leaves)))),
                                tuple(t.detach().double().cpu() for t in leaves), tuple(v.double().cpu() for v in vs))
    for h, ref in zip(hvp, hvp_ref):
        assert rel_err(h, ref) <= tol
