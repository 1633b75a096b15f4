"""The GPU benchmark scripts run end to end on CPU (``--smoke``: tiny shapes, torch backend), so that
the GPU machine's minutes go to numbers, not to a script's bugs: every section runs, no result
records an error, and each result checked against float64 is accurate for its precision."""
import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_script(name: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def smoke(stem: str, tmp_path, *args: str, suffix: str = "") -> dict:
    """``{stem}.py --smoke [args]``'s JSON (``{stem}{suffix}_smoke.json``), after the checks every script passes."""
    run_script(f"{stem}.py", "--smoke", *args, "--out", str(tmp_path))
    stem += suffix
    data = json.loads((tmp_path / f"{stem}_smoke.json").read_text())
    assert not data["failed_sections"]
    cpu_only = "backend 'cuda' needs CUDA tensors"  # the hand-written CUDA kernel's rows, on this CPU
    assert [(r["name"], r["error"]) for r in data["results"] if r["error"] and cpu_only not in r["error"]] == []
    for r in data["results"]:
        if r.get("rel_err") is not None:  # IEEE fp32 near exact; TF32, bf16 and the jvp references looser
            bound = 1e-4 if re.search(r"\bfp32\b", r["name"]) else 5e-2
            assert r["rel_err"] < bound, (r["name"], r["rel_err"])
    assert (tmp_path / f"{stem}_smoke.md").read_text().count("|") > 20  # the table was written
    return data


def test_bench_gpu_smoke(tmp_path):
    data = smoke("bench_gpu", tmp_path)
    sections = {row["section"] for row in data["rows"]}
    assert sections == {"quad", "compressed", "eigen", "embedding", "covariance", "dual", "elementwise", "correction"}
    assert sum(r.get("rel_err") is not None for r in data["results"]) > 50


@pytest.mark.parametrize("stem", ["bench_curvature", "bench_linearized"])
def test_bench_curvature_and_linearized_smoke(stem, tmp_path):
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip(f"{stem}.py needs open_clip")
    data = smoke(stem, tmp_path)
    assert data["rows"] and all(r["ours"] is not None for r in data["rows"])


def test_bench_methods_smoke(tmp_path):
    """bench_methods.py --smoke (tiny open_clip CLIP on the CPU) runs every configuration and writes its table."""
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("bench_methods.py needs open_clip")
    data = smoke("bench_methods", tmp_path)
    results = {r["name"]: r for r in data["results"]}
    for name in ("nonlinear", "linear", "tak", "tak, published-code penalty", "tak, factors offloaded", "delta"):
        assert results[name]["ms"] > 0 and results[name]["iterations"] == 2, name
    assert results["tak"]["ratio"] is not None and results["delta"]["ratio"] is not None
    assert results["linear"]["terms"]["student"] == "DualLinearizedModel"  # the fast path ran
    assert results["delta"]["terms"]["teacher"] == "DualLinearizedModel"
    published = next(r for n, r in results.items() if n.startswith("published form"))
    ours = results["CurvaturePenalty(KFAC), fp32 τ"]
    value = [float(r["terms"]["value β·q(τ)"]) for r in (ours, published)]  # same τ, same factors
    assert abs(value[0] - value[1]) <= 1e-4 * abs(value[1]), value
    table = (tmp_path / "bench_methods_smoke.md").read_text()
    assert "| tak |" in table and "| delta |" in table


def test_saved_activations_runs():
    """saved_activations.py counts what the plain model and the fast path keep for their backward."""
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("saved_activations.py needs open_clip")
    out = run_script("saved_activations.py", "--patch", "32", "--attention", "auto")
    saved = [float(m) for m in re.findall(r"([\d.]+) MiB saved", out)]
    assert len(saved) == 2 and all(s > 0 for s in saved)
    assert "_DualLinearBackward" in out and "_DualNormBackward" in out


def test_bench_methods_smoke_on_t5(tmp_path):
    """--backbone t5: all of a (tiny) T5 trained, its embeddings in the penalty, the published form's value ours."""
    data = smoke("bench_methods", tmp_path, "--backbone", "t5", suffix="_t5")
    results = {r["name"]: r for r in data["results"]}
    assert results["tak"]["ratio"] is not None and results["linear"]["terms"]["student"] == "DualLinearizedModel"
    # two position-bias tables and the token table, which transformers 5 calls as two modules (encoder.embed_tokens,
    # decoder.embed_tokens), 4 as one (shared)
    tables = 4 if int(importlib.metadata.version("transformers").split(".")[0]) >= 5 else 3
    assert f"{tables} embeddings" in data["header"]["factors"]
    published = next(r for n, r in results.items() if n.startswith("published form"))
    value = [float(r["terms"]["value β·q(τ)"]) for r in (results["CurvaturePenalty(KFAC), fp32 τ"], published)]
    assert abs(value[0] - value[1]) <= 1e-4 * abs(value[1]), value
