"""Factors shared in place of data (TAK Sec. 3): ``tak fit`` writes a task's factor file, and a run given it
(``factor_files``) trains the task vector that one with the task's data does; files that do not fit the run
are refused, naming why."""
import contextlib
import hashlib
import io

import pytest
import torch

import tak
from tak.cli import main
from tak.io import read, write
from tak.training import fit, loop

from .test_training import tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def same_task_vector(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method, kind", [("tak", "kfac"), ("diag_ggn", "diagonal"), ("delta", "ekfac")])
def test_a_factor_file_trains_the_task_vector_its_data_does(tmp_path, method, kind):
    """tak / diag_ggn: the other task's data → its file; delta: the reference set → its EK-FAC file."""
    other = {} if kind == "ekfac" else {"task": "20news-part0"}  # ekfac: tiny's reference, subjectivity
    path = fit(tiny(tmp_path, **other), kind, tmp_path / f"other.{kind}.safetensors")
    meta = read(path)[1]
    assert meta["kind"] == kind and meta["base_model"] == "minilm" and meta["train_examples"] == 40  # max_train
    with_data = tak.train(tiny(tmp_path / "data", method))
    without = {"reference": []} if kind == "ekfac" else {"tasks": ["rotten_tomatoes"]}
    with_file = tak.train(tiny(tmp_path / "file", method, factor_files=[str(path)], **without))
    assert same_task_vector(with_data.task_vector.tensors, with_file.task_vector.tensors)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert with_file.task_vector.meta["factor_files"] == [{"path": str(path.resolve()), "sha256": digest}]
    assert "factor_files" not in with_data.task_vector.meta
    if method == "tak":  # the file is what the penalty reads: another task's gives another τ
        elsewhere = fit(tiny(tmp_path, task="subjectivity"), kind, tmp_path / "subjectivity.kfac.safetensors")
        other_file = tak.train(tiny(tmp_path / "other", method, factor_files=[str(elsewhere)], tasks=["rotten_tomatoes"]))
        assert not same_task_vector(with_file.task_vector.tensors, other_file.task_vector.tensors)


def test_tak_fit_on_the_command_line_writes_the_file_of_tak_training_fit(tmp_path, monkeypatch):
    """... and with --progress false it prints no bar, Hugging Face's loading bar included."""
    monkeypatch.setattr(loop, "_CACHE", {})  # the backbone loads here
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["fit", "--kind", "kfac", "--task", "20news-part0", "--max-length", "16", "--max-train", "40",
                     "--factor-examples", "4", "--trainable", "encoder.layer.5.attention.*", "--progress", "false",
                     "--out", str(tmp_path / "cli.safetensors")])
    assert code == 0 and out.getvalue().startswith(f"wrote {tmp_path / 'cli.safetensors'}") and err.getvalue() == ""
    python = fit(tiny(tmp_path, task="20news-part0"), "kfac", tmp_path / "python.safetensors")
    (cli, cli_meta), (py, py_meta) = read(tmp_path / "cli.safetensors"), read(python)
    assert cli.keys() == py.keys() and all(torch.equal(cli[k], py[k]) for k in cli)
    assert cli_meta["storage"]["layers"] == py_meta["storage"]["layers"]


def test_factor_files_that_do_not_fit_the_run_are_refused_naming_why(tmp_path):
    kfac = fit(tiny(tmp_path, task="20news-part0"), "kfac", tmp_path / "20news.kfac.safetensors")
    ekfac = fit(tiny(tmp_path), "ekfac", tmp_path / "subj.ekfac.safetensors")
    own = fit(tiny(tmp_path, task="rotten_tomatoes"), "kfac", tmp_path / "own.kfac.safetensors")
    tensors, meta = read(kfac)
    write(tmp_path / "bert.safetensors", tensors, {**meta, "base_model": "hf:bert-base-uncased"})
    write(tmp_path / "sizeless.safetensors", tensors, {k: v for k, v in meta.items() if k != "train_examples"})

    def refused(message, **overrides):
        overrides = {"tasks": ["rotten_tomatoes"], **overrides}
        with pytest.raises(ValueError, match=message):
            tak.train(tiny(tmp_path / "runs", overrides.pop("method", "tak"), **overrides))

    refused("holds EKFAC factors, not KFAC", factor_files=[str(ekfac)])
    refused("holds the factors of 'rotten_tomatoes', the task this run trains", factor_files=[str(own)])
    refused(r"no factors for 5 layers this run trains: \['encoder.layer.4.attention", factor_files=[str(kfac)],
            trainable="encoder.layer.4.attention.*")
    refused("fitted on base_model 'hf:bert-base-uncased', this run's is 'minilm'",
            factor_files=[str(tmp_path / "bert.safetensors")])
    refused("no 'train_examples'", factor_files=[str(tmp_path / "sizeless.safetensors")])
    refused("has no curvature penalty, so factor_files=", method="nonlinear", factor_files=[str(kfac)])
    refused("EK-FAC factors of several sets do not merge", method="delta", factor_files=[str(ekfac)] * 2, reference=[])
    refused("EK-FAC factors of several sets do not merge", method="delta", factor_files=[str(ekfac)])
    with pytest.raises(ValueError, match="factor_files must be a list of paths, got 'a,b'"):
        tiny(tmp_path, factor_files="a,b")
    with pytest.raises(ValueError, match="unknown factor kind 'kfca'; valid kinds: kfac, ekfac, diagonal"):
        fit(tiny(tmp_path), "kfca", tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="a folder; name the factor file"):
        fit(tiny(tmp_path), "kfac", tmp_path)
    with pytest.raises(ValueError, match="EK-FAC factors are fitted on a reference set: set reference="):
        fit(tiny(tmp_path, reference=[]), "ekfac", tmp_path / "x.safetensors")


def test_a_run_resumes_only_with_the_factor_files_it_started_with(tmp_path):
    path = tmp_path / "other.kfac.safetensors"
    fit(tiny(tmp_path, task="20news-part0"), "kfac", path)
    config = tiny(tmp_path / "runs", "tak", tasks=["rotten_tomatoes"], factor_files=[str(path)])
    tak.train(config)
    fit(tiny(tmp_path, task="subjectivity"), "kfac", path)  # another task's factors under the same name
    with pytest.raises(ValueError, match="checkpoint of a run with another config .*factor_files"):
        tak.train(config)
