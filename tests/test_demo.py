"""``tak demo`` end to end on a tiny profile: every method trained, merged and scored, the joint problem of
the 20 Newsgroups parts included; ``results.json``, the table, plots and report written."""
import json
import os

import pytest
import torch

from tak import demo
from tak.arithmetic.protocols import normalized_accuracy
from tak.backbones import load_backbone
from tak.data import get_task, joint_task
from tak.evaluation import accuracy

from .test_training import free_port, spawn

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


def _demo_worker(rank, world, port, out):
    """One torchrun-like process of ``tak demo`` (TAK only: factors fitted over both ranks, then merged)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    demo.PROFILES["quick"] = TINY
    results = demo.run(out, quick=True, progress=False, methods=["tak"], device="cpu")
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({k: v for k, v in results.items() if k != "seconds"}, f)
    os._exit(0)  # no process-group teardown (see tests.test_training._ddp_worker)


def test_demo_under_two_gloo_processes_gives_every_rank_the_written_results(tmp_path):
    spawn(_demo_worker, (2, free_port(), str(tmp_path)), nprocs=2, timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    written = json.loads((tmp_path / "results.json").read_text())
    assert ranks[0] == ranks[1] == {k: v for k, v in written.items() if k != "seconds"}
    assert set(written["methods"]) == {"tak"} and (tmp_path / "report.md").is_file()
