"""``tak demo`` end to end on a tiny profile: every method trained, merged and scored, the joint problem of
the 20 Newsgroups parts included; ``results.json``, the table, plots and report written."""
import json

import pytest

from tak import demo
from tak.arithmetic.protocols import normalized_accuracy
from tak.backbones import load_backbone
from tak.data import get_task, joint_task
from tak.evaluation import accuracy

TINY = dict(steps=1, batch_size=4, max_length=16, max_train=27, max_test=12, factor_examples=4,
            trainable=["encoder.layer.5.output.*"], alphas=[0.0, 1.0])


def test_demo_trains_merges_and_reports_every_method(tmp_path, monkeypatch):
    monkeypatch.setitem(demo.PROFILES, "quick", TINY)
    results = demo.run(tmp_path, quick=True, progress=False)
    assert json.loads((tmp_path / "results.json").read_text())["methods"].keys() == set(demo.METHODS)
    assert all((tmp_path / f).is_file() for f in ("alpha_sweep.png", "merged_per_task.png", "report.md"))
    for method, r in results["methods"].items():
        assert set(r["individual"]) == set(demo.TASKS) == set(r["per_task"]["alpha1"])
        for key in ("alpha1", "best"):
            per_task = r["per_task"][key]
            assert r[key]["abs"] == pytest.approx(sum(per_task.values()) / len(per_task))
            assert r[key]["norm"] == pytest.approx(normalized_accuracy(per_task, r["individual"]))
        joint = r["joint"]["20news-joint"]
        assert joint["parts"] == ["20news-part0", "20news-part1"] and joint["classes"] == 10
        assert joint["best"]["alpha"] in TINY["alphas"] and set(joint["val_curve"]) == set(TINY["alphas"])
    backbone = load_backbone("minilm", max_length=TINY["max_length"])
    parts = [get_task(f"20news-part{k}", max_train=TINY["max_train"], max_test=TINY["max_test"]) for k in (0, 1)]
    assert results["zero_shot_joint"] == {
        "20news-joint": pytest.approx(accuracy(backbone, backbone.model, joint_task(parts), "test"))}
    table = demo.table(results)
    assert all(f"| {m} |" in table for m in demo.METHODS) and "20news-joint = 20news-part0 + 20news-part1" in table
    assert table in (tmp_path / "report.md").read_text()
