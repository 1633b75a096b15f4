"""Factors shared in place of data (TAK Sec. 3): ``tak fit`` writes a task's factor file, and a run given it
(``factor_files``) trains the task vector that one with the task's data does; files that do not fit the run
are refused, naming why."""
import contextlib
import hashlib
import io
import shutil
import warnings

import pytest
import torch

import tak
from tak.cli import main
from tak.curvature import KFAC, merge_kfac, pool_kfac
from tak.io import read, write
from tak.methods import trainable_names
from tak.training import fit, loop
from tak.training.factors import task_factors

from .test_training import TRAINABLE, minilm, tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def same_task_vector(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method, kind", [("tak", "kfac"), ("diag_ggn", "diagonal"), ("delta", "ekfac")])
def test_a_factor_file_trains_the_task_vector_its_data_does(tmp_path, method, kind):
    """tak / diag_ggn: the other task's data → its file, fitted for all layers (the run cuts it to the trained
    ones, the last of them weighted 0.1); delta: the reference set → its EK-FAC file."""
    other = {} if kind == "ekfac" else {"task": "20news-part0", "trainable": None}  # ekfac: tiny's subjectivity
    path = fit(tiny(tmp_path, **other), kind, tmp_path / f"other.{kind}.safetensors")
    meta = read(path)[1]
    assert meta["kind"] == kind and meta["base_model"] == "minilm" and meta["train_examples"] == 40  # max_train
    assert "path" not in meta["source"] and meta["fit"] == {"factor_examples": 4, "mc_samples": 1, "seed": 0,
                                                            "max_train": 40, "max_length": 16, "backbone_options": {}}
    weight = {} if kind == "ekfac" else {"last_layer_weight": 0.1}
    with_data = tak.train(tiny(tmp_path / "data", method, **weight))
    without = {"reference": []} if kind == "ekfac" else {"tasks": ["rotten_tomatoes"]}
    with_file = tak.train(tiny(tmp_path / "file", method, factor_files=[str(path)], **without, **weight))
    assert same_task_vector(with_data.task_vector.tensors, with_file.task_vector.tensors)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert with_file.task_vector.meta["factor_files"] == [{"path": str(path.resolve()), "sha256": digest}]
    assert "factor_files" not in with_data.task_vector.meta
    if method == "tak":  # the file is what the penalty reads: another task's gives another τ
        elsewhere = fit(tiny(tmp_path, task="subjectivity"), kind, tmp_path / "subjectivity.kfac.safetensors")
        other_file = tak.train(tiny(tmp_path / "other", method, factor_files=[str(elsewhere)], tasks=["rotten_tomatoes"],
                                    **weight))
        assert not same_task_vector(with_file.task_vector.tensors, other_file.task_vector.tensors)


def test_universal_factors_from_a_file_train_the_task_vector_of_the_reference_data(tmp_path):
    """TAK Sec. F.4: the reference set's KFAC, its tasks pooled (B and A λ-averaged: one fit's scale, not Eq. 8's
    sum of B), in one shared file."""
    reference = ["subjectivity", "20news-part1"]
    config = tiny(tmp_path / "data", "tak", universal=True, reference=reference)
    path = fit(config, "kfac", tmp_path / "universal.kfac.safetensors")
    assert read(path)[1]["train_examples"] == 80 and read(path)[1]["task"] == "subjectivity+20news-part1"
    backbone, cpu = minilm(config), torch.device("cpu")
    layers = loop.trained_layers(backbone.model, trainable_names(backbone.model, TRAINABLE))
    parts = [task_factors("kfac", backbone, [loop._task(t, config)], **loop._fit_options(config, cpu, layers, None))
             for t in reference]
    pooled = loop.build_objective(config, backbone, loop._task(config.task, config), cpu).penalty.factors
    expected = pool_kfac(parts, [40, 40])
    assert list(pooled) == list(expected)
    for name in expected:
        assert torch.equal(pooled[name].A, expected[name].A) and torch.equal(pooled[name].B, expected[name].B)
        assert torch.allclose(2 * pooled[name].B, parts[0][name].B + parts[1][name].B, rtol=1e-5, atol=0)
    with_data = tak.train(config)
    with_file = tak.train(tiny(tmp_path / "file", "tak", universal=True, reference=[], factor_files=[str(path)]))
    assert same_task_vector(with_data.task_vector.tensors, with_file.task_vector.tensors)


def test_files_and_data_merge_with_their_training_set_sizes(tmp_path):
    """TAK Eq. 8 over a task fitted from its data (40 examples) and a file's (train_examples 20): λ = 2/3, 1/3."""
    small = fit(tiny(tmp_path, task="subjectivity", max_train=20), "kfac", tmp_path / "small.kfac.safetensors")
    config = tiny(tmp_path / "runs", "tak", tasks=["rotten_tomatoes", "20news-part0"], factor_files=[str(small)])
    backbone, cpu = minilm(config), torch.device("cpu")
    merged = loop.build_objective(config, backbone, loop._task(config.task, config), cpu).penalty.factors
    layers = loop.trained_layers(backbone.model, trainable_names(backbone.model, TRAINABLE))
    data = task_factors("kfac", backbone, [loop._task("20news-part0", config)],
                        **loop._fit_options(config, cpu, layers, cache=None))
    shared = KFAC.load(small)
    expected = merge_kfac([data, KFAC({n: lf for n, lf in shared.items() if n in layers}, shared.meta)], [40, 20])
    assert list(merged) == list(expected) == list(data)
    for name in expected:
        assert torch.equal(merged[name].A, expected[name].A) and torch.equal(merged[name].B, expected[name].B)
    assert merged.meta["merge"]["lambdas"] == pytest.approx([2 / 3, 1 / 3])


def test_factor_files_that_name_no_task_are_each_taken(tmp_path):
    """Files made by hand (KFAC.save with train_examples set, no task named) are not one task listed twice."""
    tensors, meta = read(fit(tiny(tmp_path, task="20news-part0"), "kfac", tmp_path / "20news.kfac.safetensors"))
    files = [str(tmp_path / f"user{i}.safetensors") for i in range(2)]
    for path in files:
        write(path, tensors, {k: v for k, v in meta.items() if k != "task"})
    result = tak.train(tiny(tmp_path / "runs", "tak", tasks=["rotten_tomatoes"], factor_files=files))
    assert [f["path"] for f in result.task_vector.meta["factor_files"]] == files


def test_the_seed_draws_the_probes_of_the_file(tmp_path):
    a = read(fit(tiny(tmp_path, task="20news-part0"), "kfac", tmp_path / "a.safetensors"))[0]
    b = read(fit(tiny(tmp_path, task="20news-part0", seed=1), "kfac", tmp_path / "b.safetensors"))[0]
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)


def tak_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_tak_fit_on_the_command_line_writes_the_file_of_tak_training_fit(tmp_path, monkeypatch):
    """... and with --progress false it prints no bar, Hugging Face's loading bar included."""
    monkeypatch.setattr(loop, "_CACHE", {})  # the backbone loads here
    small = ["--max-length", "16", "--max-train", "40", "--factor-examples", "4", "--trainable", TRAINABLE,
             "--progress", "false"]
    code, out, err = tak_cli("fit", "--kind", "kfac", "--task", "20news-part0", *small, "--out", tmp_path / "cli.st")
    assert code == 0 and out.startswith(f"wrote {tmp_path / 'cli.st'}") and err == ""
    layers = len(read(tmp_path / "cli.st")[1]["layers"])  # and says what it holds
    assert out.rstrip().endswith(f": {layers} layers (0 embeddings), 1 exact blocks"), out
    python = fit(tiny(tmp_path, task="20news-part0"), "kfac", tmp_path / "python.safetensors")
    (cli, cli_meta), (py, py_meta) = read(tmp_path / "cli.st"), read(python)
    assert cli.keys() == py.keys() and all(torch.equal(cli[k], py[k]) for k in cli)
    assert cli_meta["storage"]["layers"] == py_meta["storage"]["layers"]
    code, _, err = tak_cli("fit", "--kind", "kfac", *small, "--out", tmp_path / "no-task.st")
    assert code == 2 and "--task: name the task whose factors are fitted" in err
    code, _, err = tak_cli("fit", "--kind", "ekfac", *small, "--out", tmp_path / "no-reference.st")
    assert code == 2 and "EK-FAC factors are fitted on a reference set: set reference=[task names] (tak fit " \
                         "--reference)" in err


def test_factor_files_that_do_not_fit_the_run_are_refused_naming_why(tmp_path):
    kfac = fit(tiny(tmp_path, task="20news-part0"), "kfac", tmp_path / "20news.kfac.safetensors")
    ekfac = fit(tiny(tmp_path), "ekfac", tmp_path / "subj.ekfac.safetensors")
    own = fit(tiny(tmp_path, task="rotten_tomatoes"), "kfac", tmp_path / "own.kfac.safetensors")
    tensors, meta = read(kfac)
    write(tmp_path / "bert.safetensors", tensors, {**meta, "base_model": "hf:bert-base-uncased"})
    write(tmp_path / "theta.safetensors", tensors, {**meta, "weights": {**meta["weights"], "digest": "0" * 16}})
    for name, size in (("sizeless", None), ("empty", 0), ("boolean", True), ("text", "40")):
        write(tmp_path / f"{name}.safetensors", tensors, {**meta, "train_examples": size})

    def refused(message, **overrides):
        overrides = {"tasks": ["rotten_tomatoes"], **overrides}
        with pytest.raises(ValueError, match=message):
            tak.train(tiny(tmp_path / "runs", overrides.pop("method", "tak"), **overrides))

    refused(r"factor_files: .*holds 'ekfac' factors, not 'kfac' \(this run's method penalizes with 'kfac' factors: "
            r"tak fit --kind kfac\)", factor_files=[str(ekfac)])
    refused("factor_files: .*missing.safetensors: no such file", factor_files=[str(tmp_path / "missing.safetensors")])
    refused("holds the factors of 'rotten_tomatoes', the task this run trains", factor_files=[str(own)])
    refused("holds the factors of '20news-part0', which this run fits from its data; a task's factors count once",
            factor_files=[str(kfac)], tasks=["rotten_tomatoes", "20news-part0"])
    refused("holds the factors of '20news-part0', which .*20news.kfac.safetensors holds too",
            factor_files=[str(kfac), str(kfac)])
    refused(r"no factors for 5 layers this run trains: \['encoder.layer.4.attention", factor_files=[str(kfac)],
            trainable="encoder.layer.4.attention.*")
    refused("fitted on base_model 'hf:bert-base-uncased', this run's is 'minilm'",
            factor_files=[str(tmp_path / "bert.safetensors")])
    refused(r"theta.safetensors: fitted on base weights \{'digest': '0000000000000000', 'dtypes': \['float32'\]\}; "
            r"this run's are \{'digest': '[0-9a-f]{16}'.*another θ0 in the same dtypes",
            factor_files=[str(tmp_path / "theta.safetensors")])
    for name, size in (("sizeless", None), ("empty", 0), ("boolean", True), ("text", "'40'")):
        refused(f"{name}.safetensors: train_examples={size} in its metadata; expected .* a positive integer",
                factor_files=[str(tmp_path / f"{name}.safetensors")])
    refused("has no curvature penalty, so factor_files=", method="nonlinear", factor_files=[str(kfac)])
    ekfac2 = fit(tiny(tmp_path, reference=["20news-part1"]), "ekfac", tmp_path / "20news.ekfac.safetensors")
    refused("EK-FAC factors of several sets do not merge", method="delta", factor_files=[str(ekfac), str(ekfac2)],
            reference=[])
    refused("EK-FAC factors of several sets do not merge", method="delta", factor_files=[str(ekfac)],
            reference=["20news-part1"])
    refused("holds the factors of 'subjectivity', which this run fits from its data", method="delta",
            factor_files=[str(ekfac)])
    with pytest.raises(ValueError, match="factor_files must be a list of paths, got 'a,b'"):
        tiny(tmp_path, factor_files="a,b")
    with pytest.raises(ValueError, match="factor_files: an empty path"):
        tiny(tmp_path, factor_files=[""])
    with pytest.raises(ValueError, match="unknown factor kind 'kfca'; valid kinds: kfac, ekfac, diagonal"):
        fit(tiny(tmp_path), "kfca", tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="a folder; name the factor file"):
        fit(tiny(tmp_path), "kfac", tmp_path)


def test_an_ekfac_file_of_the_trained_task_s_reference_set_needs_no_size(tmp_path):
    """EK-FAC files do not merge, so they need no train_examples; a reference set may hold the trained task."""
    tensors, meta = read(fit(tiny(tmp_path, reference=["rotten_tomatoes"]), "ekfac", tmp_path / "e.safetensors"))
    write(tmp_path / "e.safetensors", tensors, {k: v for k, v in meta.items() if k != "train_examples"})
    tak.train(tiny(tmp_path / "runs", "delta", reference=[], factor_files=[str(tmp_path / "e.safetensors")]))


def test_a_run_resumes_only_with_files_of_the_contents_it_started_with(tmp_path):
    path = tmp_path / "other.kfac.safetensors"
    fit(tiny(tmp_path, task="20news-part0"), "kfac", path)
    config = tiny(tmp_path / "runs", "tak", tasks=["rotten_tomatoes"], factor_files=[str(path)])
    first = tak.train(config)
    shutil.copy(path, tmp_path / "copy.safetensors")  # the same bytes elsewhere: the same run
    again = tak.train(tiny(tmp_path / "runs", "tak", tasks=["rotten_tomatoes"],
                           factor_files=[str(tmp_path / "copy.safetensors")]))
    assert same_task_vector(first.task_vector.tensors, again.task_vector.tensors)
    fit(tiny(tmp_path, task="subjectivity"), "kfac", path)  # another task's factors under the same name
    with pytest.raises(ValueError, match="checkpoint of a run with another config .*factor_digests"):
        tak.train(config)


def test_a_file_fitted_on_features_computed_otherwise_is_used_with_a_warning(tmp_path):
    path = fit(tiny(tmp_path, task="20news-part0"), "kfac", tmp_path / "20news.kfac.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the run's own settings: silent
        tak.train(tiny(tmp_path / "same", "tak", tasks=["rotten_tomatoes"], factor_files=[str(path)]))
    with pytest.warns(UserWarning, match=r"20news.kfac.safetensors: fitted with max_length=16 \(this run: 12\), "
                                         r"backbone_options=\{\} \(this run: \{'logit_scale': 50.0\}\); its curvature"):
        tak.train(tiny(tmp_path / "other", "tak", tasks=["rotten_tomatoes"], factor_files=[str(path)], max_length=12,
                       backbone_options={"logit_scale": 50.0}))
