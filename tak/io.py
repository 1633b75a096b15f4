"""Files that can be shared and trusted like model weights: safetensors with JSON metadata, written
atomically, read back only when intact. Nothing here ever unpickles.

A file holds named tensors and one JSON metadata object (in the safetensors header, under the key
``tak``), plus a SHA-256 of the tensor bytes and of the metadata that ``read`` checks.
"""
import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

_KEY = "tak"


def architecture_fingerprint(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) of the model class and its parameters' names and shapes: equal for two models
    of one architecture, whatever their weights, dtype or device."""
    return _fingerprint(model, lambda p: "")


def architecture_fingerprints(model: nn.Module) -> set[str]:
    """The fingerprints that a file fitted or trained on ``model``'s architecture may carry: today's
    (``architecture_fingerprint``) and the legacy ones of files written before it left dtypes out, which hashed
    ``name:shape:dtype;`` (dtypes as the model has them, or all floating parameters in one floating dtype)."""
    legacy = [lambda p: f":{p.dtype}"] + [lambda p, d=d: f":{d if p.is_floating_point() else p.dtype}"
                                          for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)]
    return {architecture_fingerprint(model), *(_fingerprint(model, suffix) for suffix in legacy)}


def weights_record(model: nn.Module) -> dict:
    """``{"digest": SHA-256 (16 hex digits) of model's state (parameters and persistent buffers: names, shapes, dtypes,
    bytes), "dtypes": its floating dtypes}``: equal for the same weights in the same dtypes on any device. Records
    are compared only where their dtypes agree: a copy in another precision holds other values."""
    h, dtypes = hashlib.sha256(), set()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        if t.is_floating_point():
            dtypes.add(str(t.dtype).removeprefix("torch."))
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    return {"digest": h.hexdigest()[:16], "dtypes": sorted(dtypes)}


def _fingerprint(model: nn.Module, suffix) -> str:
    """SHA-256 (16 hex digits) of the class name and ``name:shape<suffix(p)>;`` per parameter."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}{suffix(p)};".encode())
    return h.hexdigest()[:16]


def _digest(tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """SHA-256 of the metadata (canonical JSON) and of every tensor's name, shape, dtype and bytes."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@contextlib.contextmanager
def atomic_file(path):
    """``with atomic_file(path) as tmp: <write the file tmp>``: ``tmp`` is a temporary file in ``path``'s
    folder (created if needed), flushed to disk and renamed over ``path`` only when the block succeeds,
    so readers never see half a file; on error it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (``atomic_file``)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write(path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``tensors`` and ``meta`` (JSON; its key "sha256" is the file's own) to ``path`` atomically
    (``atomic_file``)."""
    if "sha256" in meta:
        raise ValueError(f"{path}: metadata key 'sha256' is reserved for the file's checksum")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        meta = json.loads(json.dumps(meta))  # as it reads back (tuples become lists), for the checksum
    except TypeError as e:
        raise ValueError(f"{path}: metadata must be JSON ({e})") from None
    header = {_KEY: json.dumps({**meta, "sha256": _digest(tensors, meta)}, sort_keys=True)}
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata=header)


def read(path, device="cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a file written by ``write``; ValueError if it is truncated, corrupted or not ours."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: a folder; expected a .safetensors file written by tak")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        tensors = load_file(path, device="cpu")
        from safetensors import safe_open
        with safe_open(path, framework="pt") as fh:
            header = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupted?): {e}") from e
    if _KEY not in header:
        raise ValueError(f"{path}: a safetensors file without tak metadata; it was not written by tak")
    try:
        meta = json.loads(header[_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: its tak metadata is not valid JSON: {e}") from e
    if meta.pop("sha256", None) != _digest(tensors, meta):
        raise ValueError(f"{path}: its tensors or metadata do not match its checksum (corrupted file)")
    return {k: v.to(device) for k, v in tensors.items()}, meta
