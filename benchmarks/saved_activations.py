"""What a training step keeps for its backward: bytes of the tensors saved by autograd, by node type, for a
CLIP ViT's plain forward and for ``tak.linearize``'s fast path (f(x; θ0) + J τ), on any device.

    python benchmarks/saved_activations.py [--patch 16] [--layers 1] [--batch 2] [--attention kernel|auto]

The activations saved for the backward are most of a step's peak memory (issue 4: linearized step ≤ 1.3× the
plain step's). Walks the autograd graph of mean(out²) and counts each saved storage once (views share one).
``--attention kernel`` runs the dual attention through ``kfac_kernels.dual_attention``'s Triton kernel, as
on a GPU (on a CPU: under TRITON_INTERPRET=1, slow: keep --layers 1 and a small batch); ``auto`` lets tak
choose (on a CPU that is a PyTorch reference path that keeps fp32 copies of q, k, v, O).
"""
import argparse
import collections
import importlib
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def saved_bytes(loss: torch.Tensor) -> collections.Counter:
    """Bytes of the storages saved for the backward of ``loss``, by the autograd node type saving it first."""
    by_node, seen, stack, visited = collections.Counter(), set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        tensors = [getattr(node, name) for name in dir(node) if name.startswith("_saved_")]
        tensors = [t for v in tensors for t in (v if isinstance(v, (tuple, list)) else [v])]
        tensors += list(getattr(node, "saved_tensors", ()))  # custom autograd Functions
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                by_node[type(node).__name__] += t.untyped_storage().nbytes()
        stack += [f for f, _ in node.next_functions]
    return by_node


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--attention", choices=["kernel", "auto"], default="kernel")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.attention == "kernel" and device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(ROOT))
    from tak._compat import ensure_torchvision_importable
    ensure_torchvision_importable()
    import open_clip

    import kfac_kernels as kk
    import tak

    if args.attention == "kernel":  # tak's attention on the Triton kernel, whatever the device
        attention = importlib.import_module("tak.nn.attention")  # the module (tak.nn.attention is a function)
        reference = attention.dual_attention

        def kernel(q, k, v, dq, dk, dv, mask=None, bias=None, dbias=None, *, scale=None, **_):
            if dq is None and dk is None and dv is None and dbias is None:
                return reference(q, k, v, dq, dk, dv, mask, bias, dbias, scale=scale)
            os.environ["KFAC_KERNELS_BACKEND"] = "triton"
            try:
                return kk.dual_attention(q, k, v, dq, dk, dv, mask=mask, bias=bias, dbias=dbias, scale=scale)
            finally:
                del os.environ["KFAC_KERNELS_BACKEND"]
        attention.dual_attention = kernel

    torch.manual_seed(0)
    model = open_clip.transformer.VisionTransformer(image_size=224, patch_size=args.patch, width=768,
                                                    layers=args.layers, heads=12, mlp_ratio=4.0, output_dim=512)
    model = model.to(device, torch.bfloat16).eval()
    x = torch.randn(args.batch, 3, 224, 224, dtype=torch.bfloat16, device=device)
    rows = {"plain model": saved_bytes((model(x).float() ** 2).mean())}
    rows["tak.linearize (fast path)"] = saved_bytes((tak.linearize(model)(x).float() ** 2).mean())
    print(f"ViT-B/{args.patch}, {args.layers} block(s), batch {args.batch}, bf16, {device}, attention: {args.attention}")
    plain = sum(rows["plain model"].values())
    for name, by_node in rows.items():
        total = sum(by_node.values())
        parts = ", ".join(f"{k} {v / 2**20:.2f}" for k, v in by_node.most_common())
        print(f"{name}: {total / 2**20:.2f} MiB saved ({total / plain:.2f}× the plain model's): {parts}")


if __name__ == "__main__":
    main()
