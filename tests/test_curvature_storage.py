"""Factor files (tak.curvature.storage): bitwise round trips, and refusal of what does not fit."""
import copy
import dataclasses
import os
from collections import OrderedDict

import pytest
import torch
from torch import nn

import tak.io
from tak.curvature import KFAC, LayerFactors, compress, fit_kfac, merge_kfac, storage

from .util import legacy_fingerprint


class TokenMean(nn.Module):
    def forward(self, x):
        return x.mean(1)


def model_of(width=7, affine=True):
    """(N, T, 5) -> (N, 3): two linear layers (with and without bias) and a LayerNorm (a dense block)."""
    return nn.Sequential(nn.Linear(5, width), nn.LayerNorm(width, elementwise_affine=affine), nn.Tanh(),
                         nn.Linear(width, 3, bias=False), TokenMean())


def fitted(model, n_batches=2):
    return fit_kfac(model, [torch.randn(6, 4, 5) for _ in range(n_batches)], progress=False)


def assert_same(a, b):
    """Same classes, field values, tensor dtypes and bits, layer order and metadata."""
    assert type(a) is type(b) and list(a) == list(b) and a.meta == b.meta
    for name in a:
        assert_fields_equal(a[name], b[name])


def assert_fields_equal(x, y):
    assert type(x) is type(y)
    if isinstance(x, torch.Tensor):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    elif dataclasses.is_dataclass(x):
        for f in dataclasses.fields(x):
            assert_fields_equal(getattr(x, f.name), getattr(y, f.name))
    else:
        assert x == y


@pytest.fixture
def path(tmp_path):
    return tmp_path / "factors.safetensors"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_is_bitwise(path, dtype):
    model = model_of()
    f = fitted(model).to(dtype=dtype)
    f.meta["task"] = "digits"
    f.save(path)
    g = KFAC.load(path, model=model)
    assert_same(f, g)
    assert {type(lf).__name__ for lf in g.values()} == {"LayerFactors", "DenseFactors"}
    assert isinstance(g["1"].params, tuple) and g["1"].params == ("1.weight", "1.bias")
    taus = {n: torch.randn_like(p, dtype=dtype) for n, p in model.named_parameters()}
    assert torch.equal(f.quadratic_form(taus), g.quadratic_form(taus))


@pytest.mark.parametrize("method,args", [("blockdiag", {"k": 2}), ("eigen", {"rank": 3}), ("int8", {}),
                                         ("prune", {"keep": 0.4})])
def test_round_trip_of_compressed_factors(path, method, args):
    model = model_of()
    which = "A" if method == "eigen" else "both"
    c, _ = compress(fitted(model), method=method, which=which, **args)
    steps = [{"method": method, "which": which, **args}]
    if method == "eigen":  # a second call compresses the other factor: both steps are recorded
        c, _ = compress(c, method="int8", which="B")
        steps.append({"method": "int8", "which": "B"})
    c.save(path)
    g = KFAC.load(path, model=model)
    assert_same(c, g)
    assert c.meta["compression"] == g.meta["compression"] == steps
    taus = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    assert torch.equal(c.quadratic_form(taus), g.quadratic_form(taus))


@pytest.mark.parametrize("kind", ["kfac", "ekfac", "diagonal"])
def test_round_trip_of_an_embeddings_factors(path, kind):
    """An embedding's diagonal A (kept as it is by compression), its identity eigenbasis (EK-FAC's U_A None) and
    its GGN diagonal come back as they were, and so do their forms."""
    import kfac_kernels as kk
    from tak.curvature import fit_diagonal, fit_ekfac

    model = nn.Sequential(nn.Embedding(9, 5), nn.Linear(5, 3), TokenMean())
    batches = [torch.randint(0, 9, (6, 4)) for _ in range(2)]
    f = {"kfac": fit_kfac, "ekfac": fit_ekfac, "diagonal": fit_diagonal}[kind](model, batches, progress=False)
    if kind == "kfac":
        f, report = compress(f, method="int8")
        assert f["0"].A.shape == (9,) and isinstance(f["0"].B, kk.Int8Factor) and isinstance(f["1"].A, kk.Int8Factor)
        assert report["layers"]["0"]["bytes_after"] == 9 * 4 + 5 * 5 + 5 * 4  # A as it was; B int8 + scales
    if kind == "ekfac":
        assert f["0"].U_A is None and f["0"].S.shape == (5, 9)
    f.save(path)
    g = storage.load(path, model=model, kind=kind)
    assert_same(f, g)
    taus = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    assert torch.equal(f.quadratic_form(taus), g.quadratic_form(taus))


def test_load_moves_to_device(path):
    f = fitted(model_of())
    f.save(path)
    g = storage.load(path, device="cpu", kind="kfac")
    assert all(lf.A.device.type == "cpu" for lf in g.values())


def test_refuses_a_model_of_other_widths(path):
    fitted(model_of(7)).save(path)
    with pytest.raises(ValueError, match=r"fingerprint '[0-9a-f]{16}' in the file, '[0-9a-f]{16}' for the model; "
                                         r"'0' is \(d_out, d_in, bias, layout\) = \(7, 5, True, 'linear'\) in the file, "
                                         r"\(8, 5, True, 'linear'\)"):
        KFAC.load(path, model=model_of(8))


def test_refuses_a_model_without_the_dense_parameters(path):
    fitted(model_of()).save(path)
    with pytest.raises(ValueError, match=r"dense group '1': parameters \['1.weight', '1.bias'\] .* \[None, None\]"):
        KFAC.load(path, model=model_of(affine=False))


def test_refuses_a_dense_group_of_another_size(path):
    """A norm whose parameters exist under the same names but with another total size is named in the refusal."""
    fitted(model_of()).save(path)
    other = model_of()
    other[1].weight = nn.Parameter(torch.ones(8))  # the linear layers still match
    with pytest.raises(ValueError, match=r"dense group '1': parameters \['1.weight', '1.bias'\] of total size 14 in "
                                         r"the file, sizes \[8, 7\] in the model"):
        KFAC.load(path, model=other)


def test_refuses_a_model_differing_elsewhere(path):
    fitted(model_of()).save(path)
    other = model_of()
    other.add_module("extra", nn.Embedding(3, 2))  # not a factored layer
    with pytest.raises(ValueError, match=r"the factored layers match; the class or other parameters \(names or shapes\) "
                                         r"differ\. Check that the model is the one the factors were fitted on \(class "
                                         r"'Sequential'; the model is a 'Sequential'\)"):
        KFAC.load(path, model=other)


def test_fingerprint_ignores_dtype_but_not_names_or_shapes():
    model = model_of()
    fp = tak.io.architecture_fingerprint(model)
    assert len(fp) == 16 and int(fp, 16) >= 0
    for dtype in (torch.bfloat16, torch.float64):
        assert tak.io.architecture_fingerprint(copy.deepcopy(model).to(dtype)) == fp
    assert tak.io.architecture_fingerprint(model_of(8)) != fp  # shapes
    renamed = nn.Sequential(OrderedDict(zip("abcde", model_of())))  # same shapes and dtypes, other names
    assert [p.shape for p in renamed.parameters()] == [p.shape for p in model.parameters()]
    assert tak.io.architecture_fingerprint(renamed) != fp
    assert legacy_fingerprint(model) != fp  # the legacy value differs: files carry one or the other
    in_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert {fp, legacy_fingerprint(model), legacy_fingerprint(in_bf16)} <= tak.io.architecture_fingerprints(model)
    assert legacy_fingerprint(model_of(8)) not in tak.io.architecture_fingerprints(model)


def test_factors_of_fp32_load_and_apply_on_the_model_in_bf16_and_float64(path):
    model = model_of()
    f = fitted(model)
    f.save(path)
    taus = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    ref = f.quadratic_form(taus).item()
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float64, 1e-6)):
        cast = copy.deepcopy(model).to(dtype)
        g = KFAC.load(path, model=cast)
        assert g.meta == f.meta and all(lf.A.dtype == torch.float32 for lf in g.values())
        got = g.quadratic_form({n: t.to(dtype) for n, t in taus.items()}).item()
        assert abs(got - ref) <= tol * abs(ref), (dtype, got, ref)


def test_factors_with_a_legacy_fingerprint_load_and_merge_with_new_ones(path):
    model = model_of()
    old = fitted(model)
    old.meta["fingerprint"] = legacy_fingerprint(model)  # as an earlier version wrote it (fp32 model)
    old.save(path)
    new = fitted(model)
    with pytest.raises(ValueError, match="has fingerprint="):  # without a model, the two fingerprints differ
        merge_kfac([storage.load(path), new], [1, 1])
    for cast in (model, copy.deepcopy(model).to(torch.bfloat16)):
        g = KFAC.load(path, model=cast)
        assert g.meta["fingerprint"] == new.meta["fingerprint"] == tak.io.architecture_fingerprint(cast)
    merge_kfac([g, new], [1, 1])
    with pytest.raises(ValueError, match=r"fingerprint '[0-9a-f]{16}' in the file.*'0' is \(d_out, d_in, bias, layout\) "
                                         r"= \(7, 5, True, 'linear'\) in the file, \(8, 5, True, 'linear'\)"):
        KFAC.load(path, model=model_of(8))


def test_refusal_names_the_base_model_and_the_first_differing_layer(path):
    f = fitted(model_of())
    f.meta["base_model"] = "toy-mlp"
    f.save(path)
    with pytest.raises(ValueError, match=r"; '0' is \(d_out, d_in, bias, layout\) = \(7, 5, True, 'linear'\) in the file, "
                                         r"\(8, 5, True, 'linear'\) in the model; '3' is .*Check that the model is the "
                                         r"one the factors were fitted on \(base model 'toy-mlp', class 'Sequential'"):
        KFAC.load(path, model=model_of(8))
    renamed = nn.Sequential(OrderedDict(zip("abcde", model_of())))
    with pytest.raises(ValueError, match=r"'0' is not a linear layer of the model"):
        KFAC.load(path, model=renamed)


def test_refuses_a_truncated_file(path):
    fitted(model_of()).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1 - torch.randint(len(data) // 2, ()).item()])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        KFAC.load(path)


def test_a_folder_or_a_missing_file_is_named_as_such(path):
    with pytest.raises(IsADirectoryError, match="a folder; expected a .safetensors file written by tak"):
        KFAC.load(path.parent)
    with pytest.raises(FileNotFoundError, match="no such file"):
        KFAC.load(path)


def test_refuses_a_flipped_byte(path):
    fitted(model_of()).save(path)
    data = bytearray(path.read_bytes())
    i = len(data) - 1 - torch.randint(64, ()).item()  # tensor data sits at the end
    data[i] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="do not match its checksum"):
        KFAC.load(path)


def test_metadata_that_could_not_be_read_back_is_refused_when_written(path):
    from tak.io import write
    with pytest.raises(ValueError, match="metadata key 'sha256' is reserved for the file's checksum"):
        write(path, {"a": torch.zeros(2)}, {"sha256": "x"})
    with pytest.raises(ValueError, match="metadata must be JSON .*Tensor is not JSON serializable"):
        write(path, {"a": torch.zeros(2)}, {"scale": torch.ones(1)})
    assert not path.exists()


def test_refuses_edited_metadata(path):
    """The checksum covers the metadata too: a convention changed in the header is refused."""
    fitted(model_of()).save(path)
    data = path.read_bytes()
    assert data.count(b'"expand') == 1
    path.write_bytes(data.replace(b'"expand', b'"reduce'))  # tokens: same length, still valid JSON
    with pytest.raises(ValueError, match="do not match its checksum"):
        KFAC.load(path)


def test_refuses_a_renamed_tensor(path):
    """The checksum covers the tensor names: a name edited in the header (same bytes, same order) is refused."""
    g = torch.Generator().manual_seed(0)
    tak.io.write(path, {"alpha_w": torch.randn(3, 5, generator=g), "omega_w": torch.randn(3, 5, generator=g)},
                 {"kind": "test"})
    data = path.read_bytes()
    assert data.count(b'"omega_w"') == 1
    path.write_bytes(data.replace(b'"omega_w"', b'"omega_v"'))  # still valid, still sorted after alpha_w
    with pytest.raises(ValueError, match="do not match its checksum"):
        tak.io.read(path)


def rewrite(path, edit):
    """Rewrite a valid file after ``edit(tensors, meta)``, with a fresh, valid checksum."""
    tensors, meta = tak.io.read(path)
    edit(tensors, meta)
    tak.io.write(path, tensors, meta)


@pytest.mark.parametrize("version", [storage.FORMAT_VERSION + 1, 0, "1", None, True])
def test_refuses_unknown_format_versions(path, version):
    fitted(model_of()).save(path)
    rewrite(path, lambda t, m: m.update(format_version=version))
    with pytest.raises(ValueError, match=f"format_version {version!r} is unknown"):
        KFAC.load(path)


def test_refuses_the_wrong_kind(path):
    fitted(model_of()).save(path)
    with pytest.raises(ValueError, match="holds 'kfac' factors, not 'ekfac'"):
        storage.load(path, kind="ekfac")
    rewrite(path, lambda t, m: m.update(kind="shampoo"))
    with pytest.raises(ValueError, match="unknown kind 'shampoo'"):
        KFAC.load(path)


def test_refuses_a_layer_with_fields_its_class_does_not_have(path):
    """A layer entry of the metadata with a field its dataclass lacks is refused with a ValueError naming the fields."""
    fitted(model_of()).save(path)

    def add_field(t, m):
        fields = m["storage"]["layers"][0]["fields"]
        fields["scale"] = dict(fields["layout"])
    rewrite(path, add_field)
    with pytest.raises(Exception) as e:
        KFAC.load(path)
    assert e.type is ValueError and "layer '0' has fields" in str(e.value) and "'scale'" in str(e.value)


def test_refuses_missing_extra_and_reshaped_tensors(path):
    fitted(model_of()).save(path)
    rewrite(path, lambda t, m: t.pop("3/B"))
    with pytest.raises(ValueError, match="tensor '3/B' is missing"):
        KFAC.load(path)
    fitted(model_of()).save(path)
    rewrite(path, lambda t, m: t.update(stray=torch.zeros(2)))
    with pytest.raises(ValueError, match=r"tensors \['stray'\] are not described"):
        KFAC.load(path)
    fitted(model_of()).save(path)
    rewrite(path, lambda t, m: t.update({"0/A": t["0/A"][:-1]}))
    with pytest.raises(ValueError, match=r"tensor '0/A' is torch.float32 \(5, 6\), its metadata says float32 \(6, 6\)"):
        KFAC.load(path)


def test_refuses_an_unlisted_layer_class(path):
    fitted(model_of()).save(path)
    rewrite(path, lambda t, m: m["storage"]["layers"][0].update({"class": "Popen"}))
    with pytest.raises(ValueError, match="layer '0' is a 'Popen', not one of the 'kfac' classes"):
        KFAC.load(path)


def test_failed_write_leaves_the_old_file(path, monkeypatch):
    model = model_of()
    old = fitted(model)
    old.save(path)

    def fail_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(tak.io, "save_file", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        fitted(model).save(path)
    assert os.listdir(path.parent) == [path.name]  # no temporary file left behind
    assert_same(old, KFAC.load(path, model=model))


def test_save_refuses_what_it_cannot_store(path):
    A, B = torch.eye(3), torch.eye(2)
    with pytest.raises(ValueError, match="layer name 'a/b' contains '/'"):
        KFAC({"a/b": LayerFactors(A, B, "w", None)}, {"kind": "kfac"}).save(path)
    with pytest.raises(TypeError, match="a/weight is a list"):
        KFAC({"a": LayerFactors(A, B, ["w"], None)}, {"kind": "kfac"}).save(path)
    with pytest.raises(ValueError, match=r"meta\['kind'\] must be one of"):
        KFAC({"a": LayerFactors(A, B, "w", None)}, {}).save(path)
    assert not path.exists()


def test_ekfac_round_trip(path):
    ekfac = pytest.importorskip("tak.curvature.ekfac")
    model = model_of()
    e = ekfac.fit_ekfac(model, [torch.randn(6, 4, 5) for _ in range(2)], progress=False)
    e.save(path)
    g = storage.load(path, model=model, kind="ekfac")
    assert_same(e, g)
    with pytest.raises(ValueError, match="not KFAC|not 'kfac'"):
        KFAC.load(path)
