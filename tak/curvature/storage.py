"""Factor files: safetensors + JSON metadata (through ``tak.io``: atomic writes, checksummed reads,
never unpickled), for any factor container whose ``meta["kind"]`` is registered in ``KINDS``.

A container maps layer names to per-layer dataclasses of the classes its kind allows
(``LayerFactors`` and ``DenseFactors`` for KFAC, ``EigenFactors`` and ``DenseFactors`` for EK-FAC). Each field of layer
``L`` is stored by its type:

- a tensor: the tensor ``"L/field"``;
- a compressed ``kfac_kernels`` factor: a type tag and its own fields, tensors ``"L/field/sub"``;
- a JSON scalar (parameter names, sizes), or a tuple of them: inline in the metadata.

The metadata is the container's ``meta`` (kind, conventions, layer shapes, fingerprint, ...) with
``format_version`` set to the version written here, plus ``storage``: the layers in order, each
with its class and the type, dtype and shape of every field.
"""
import dataclasses
import importlib

import torch
from torch import nn

import kfac_kernels as kk

from ..io import architecture_fingerprint, architecture_fingerprints, read, write
from .kfac import FORMAT_VERSION
from .layers import LAYOUTS, find_layers

# kind -> (module, container class, per-layer classes); modules are imported when a file needs them.
KINDS = {
    "kfac": ("tak.curvature.kfac", "KFAC", ("LayerFactors", "DenseFactors")),
    "ekfac": ("tak.curvature.ekfac", "EKFAC", ("EigenFactors", "DenseFactors")),
    "diagonal": ("tak.curvature.diagonal", "DiagonalGGN", ("DiagonalFactors", "DenseDiagonal")),
}
# Compressed factors a file may hold, by type tag (nothing else is ever constructed from a file).
COMPRESSED = {cls.__name__: cls for cls in (kk.BlockDiagonalFactor, kk.LowRankFactor, kk.Int8Factor)}
_JSON = (str, int, float, bool, type(None))


def save(factors, path) -> None:
    """Write ``factors`` (a ``KFAC``, ``EKFAC``, ... with a ``meta`` dict) to ``path`` atomically."""
    kind = factors.meta.get("kind")
    if kind not in KINDS:
        raise ValueError(f"save: meta['kind'] must be one of {sorted(KINDS)}, got {kind!r}")
    tensors, layers = {}, []
    for name, lf in factors.items():
        if "/" in name:
            raise ValueError(f"save: layer name {name!r} contains '/', which separates tensor names in the file")
        if type(lf).__name__ not in KINDS[kind][2]:
            raise TypeError(f"save: layer {name!r} is a {type(lf).__name__}; {kind!r} files hold {KINDS[kind][2]}")
        fields = {f.name: _encode(f"{name}/{f.name}", getattr(lf, f.name), tensors) for f in dataclasses.fields(lf)}
        layers.append({"name": name, "class": type(lf).__name__, "fields": fields})
    write(path, tensors, {**factors.meta, "format_version": FORMAT_VERSION, "storage": {"layers": layers}})


def load(path, model: nn.Module | None = None, device=None, kind: str | None = None):
    """The factor container in ``path``, its tensors on ``device`` (default CPU).

    Refuses (ValueError, saying what differs) a truncated or corrupted file, an unknown or newer
    ``format_version``, a ``kind`` other than the one asked for, missing or mismatched tensors, and,
    with ``model``, factors of another architecture (``tak.io.architecture_fingerprint``; any dtype, and the legacy
    fingerprints of earlier files, ``tak.io.architecture_fingerprints``: the meta then holds today's)."""
    tensors, meta = read(path, device=device or "cpu")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r} is unknown to this tak (it reads versions 1 to "
                         f"{FORMAT_VERSION}); a newer tak wrote it?")
    file_kind = meta.get("kind")
    if file_kind not in KINDS:
        raise ValueError(f"{path}: holds factors of unknown kind {file_kind!r} (known: {sorted(KINDS)})")
    if kind is not None and file_kind != kind:
        raise ValueError(f"{path}: holds {file_kind!r} factors, not {kind!r}")
    if model is not None:
        check_model(meta, model, path)
        meta["fingerprint"] = architecture_fingerprint(model)  # a legacy file's, in today's form (merges compare it)
    storage = meta.pop("storage", None)
    if not isinstance(storage, dict) or not isinstance(storage.get("layers"), list):
        raise ValueError(f"{path}: its metadata has no 'storage' layer list")
    module_name, container_name, layer_classes = KINDS[file_kind]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{path}: holds {file_kind!r} factors, but {module_name} cannot be imported: {e}") from e
    used, factors = set(), {}
    for entry in storage["layers"]:
        name, cls_name, fields = entry["name"], entry["class"], entry["fields"]
        if cls_name not in layer_classes or not hasattr(module, cls_name):
            raise ValueError(f"{path}: layer {name!r} is a {cls_name!r}, not one of the {file_kind!r} classes "
                             f"{[c for c in layer_classes if hasattr(module, c)]}")
        layer_cls = getattr(module, cls_name)
        expected = {f.name for f in dataclasses.fields(layer_cls)}
        required = {f.name for f in dataclasses.fields(layer_cls) if f.default is dataclasses.MISSING}
        if not required <= set(fields) <= expected:  # a field with a default may be absent (older versions)
            raise ValueError(f"{path}: layer {name!r} has fields {sorted(fields)}, {cls_name} needs {sorted(expected)}")
        factors[name] = layer_cls(**{f: _decode(f"{name}/{f}", spec, tensors, used, path)
                                     for f, spec in fields.items()})
        if getattr(factors[name], "layout", "linear") not in LAYOUTS:
            raise ValueError(f"{path}: layer {name!r} has layout {factors[name].layout!r}, not one of {LAYOUTS}")
    container = getattr(module, container_name)
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"{path}: tensors {extra[:8]} are not described by its metadata")
    return container(factors, meta)


def check_model(meta: dict, model: nn.Module, path="factors") -> None:
    """ValueError unless ``model`` has the architecture the factors in ``meta`` were fitted on (in any dtype); the
    message names both fingerprints, the layers that are missing or of another shape, and what to check."""
    if meta.get("fingerprint") in architecture_fingerprints(model):
        return
    stored = meta.get("layers", {})
    try:
        found = find_layers(model)
    except ValueError:
        found = {}
    diffs = []
    for name, info in stored.items():
        layer = found.get(name)
        if layer is None:
            diffs.append(f"{name!r} is not a linear layer of the model")
            continue
        want = (info.get("d_out"), info.get("d_in"), info.get("bias") is not None, info.get("layout", "linear"))
        have = (layer.d_out, layer.d_in, layer.bias is not None, layer.layout)
        if want != have:
            diffs.append(f"{name!r} is (d_out, d_in, bias, layout) = {want} in the file, {have} in the model")
    params = dict(model.named_parameters())
    for name, info in meta.get("dense", {}).items():
        sizes = [params[p].numel() if p in params else None for p in info.get("params", ())]
        if None in sizes or sum(sizes) != info.get("size"):
            diffs.append(f"dense group {name!r}: parameters {info.get('params')} of total size {info.get('size')} "
                         f"in the file, sizes {sizes} in the model (None: missing)")
    if diffs:
        what = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
    else:
        what = "the factored layers match; the class or other parameters (names or shapes) differ"
    base = f"base model {meta['base_model']!r}, " if meta.get("base_model") else ""
    raise ValueError(f"{path}: factors of another architecture: fingerprint {meta.get('fingerprint')!r} in the file, "
                     f"{architecture_fingerprint(model)!r} for the model; {what}. Check that the model is the one the "
                     f"factors were fitted on ({base}class {meta.get('model')!r}; the model is a "
                     f"{type(model).__name__!r}) and that its layers have their names and shapes")


def _encode(key: str, value, tensors: dict) -> dict:
    """The metadata entry of one field; its tensors go into ``tensors`` under ``key``."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value
        return {"type": "tensor", "dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape)}
    if COMPRESSED.get(type(value).__name__) is type(value):
        return {"type": type(value).__name__,
                "fields": {f.name: _encode(f"{key}/{f.name}", getattr(value, f.name), tensors)
                           for f in dataclasses.fields(value)}}
    if isinstance(value, _JSON):
        return {"type": "json", "value": value}
    if isinstance(value, tuple) and all(isinstance(v, _JSON) for v in value):
        return {"type": "tuple", "value": list(value)}
    raise TypeError(f"save: {key} is a {type(value).__name__}, which factor files cannot hold "
                    f"(tensors, {', '.join(COMPRESSED)}, JSON scalars or tuples of them)")


def _decode(key: str, spec: dict, tensors: dict, used: set, path):
    """Inverse of ``_encode``."""
    kind = spec.get("type")
    if kind == "tensor":
        if key not in tensors:
            raise ValueError(f"{path}: tensor {key!r} is missing")
        t = tensors[key]
        if str(t.dtype).removeprefix("torch.") != spec.get("dtype") or list(t.shape) != spec.get("shape"):
            raise ValueError(f"{path}: tensor {key!r} is {t.dtype} {tuple(t.shape)}, its metadata says "
                             f"{spec.get('dtype')} {tuple(spec.get('shape', ()))}")
        used.add(key)
        return t
    if kind == "json":
        return spec.get("value")
    if kind == "tuple":
        return tuple(spec.get("value", ()))
    if kind in COMPRESSED:
        cls = COMPRESSED[kind]
        fields = spec.get("fields", {})
        expected = {f.name for f in dataclasses.fields(cls)}
        if set(fields) != expected:
            raise ValueError(f"{path}: {key!r} has fields {sorted(fields)}, {kind} needs {sorted(expected)}")
        return cls(**{f: _decode(f"{key}/{f}", s, tensors, used, path) for f, s in fields.items()})
    raise ValueError(f"{path}: {key!r} has unknown type {kind!r}")
