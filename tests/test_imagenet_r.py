"""tak.data.vision's ImageNet-R task (``imagenet_r``) on a tiny fake copy of the official layout.

Class names come from open_clip's CLIP ImageNet names and timm's ImageNet-1k WordNet ids; the tests
look both up on their own (open_clip by importing it) to check the mapping.
"""
import importlib.util
from pathlib import Path

import pytest
from PIL import Image

from tak.data import get_task, list_tasks
from tak.data import vision

COUNTS = [7, 5, 6, 4, 3]  # images per class folder, in sorted folder order (25 images: 5 test, 2 val, 18 train)


def timm_synsets(name):
    folder = Path(importlib.util.find_spec("timm").submodule_search_locations[0])
    return (folder / "data" / "_info" / name).read_text().split()


@pytest.fixture(scope="module")
def clip_names():
    """WordNet id -> CLIP name, built here: ImageNet-1k's label i is its i-th sorted WordNet id."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES  # conftest made torchvision importable
    return dict(zip(sorted(timm_synsets("imagenet_synsets.txt")), IMAGENET_CLASSNAMES))


def write_images(folder, n):
    folder.mkdir(parents=True)
    for i in range(n):  # PNGs and JPEGs, one with an upper-case suffix
        Image.new("RGB", (4, 4), (i * 20, 0, 0)).save(folder / f"{i:03d}{('.png', '.jpg', '.JPEG')[i % 3]}")


@pytest.fixture
def fake_root(tmp_path):
    """``tmp_path/imagenet-r/``: four real ImageNet-R WordNet ids and one unknown folder, plus a hidden
    file and folder that must be skipped. Returns ``(root, folders in sorted order, image files)``."""
    wnids = timm_synsets("imagenet_r_synsets.txt")
    folders = sorted([wnids[0], wnids[57], wnids[133], wnids[199], "my_drawings"])
    assert folders[0] == "my_drawings"  # the unknown folder sorts first
    for folder, n in zip(folders, COUNTS):
        write_images(tmp_path / "imagenet-r" / folder, n)
    (tmp_path / "imagenet-r" / folders[1] / "._000.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    write_images(tmp_path / "imagenet-r" / ".ipynb_checkpoints", 2)
    files = sorted(p for p in (tmp_path / "imagenet-r").rglob("*") if p.is_file() and not p.name.startswith(".")
                   and ".ipynb_checkpoints" not in p.parts)
    assert len(files) == sum(COUNTS)
    return tmp_path, folders, files


def test_imagenet_r_is_registered():
    assert "imagenet_r" in list_tasks() and "imagenet-r/{wnid}" in list_tasks()["imagenet_r"]


def test_class_names_are_clip_names_of_the_wordnet_ids(clip_names):
    assert vision.imagenet_class_name("n01443537") == "goldfish" == clip_names["n01443537"]
    assert vision.imagenet_class_name("n01440764") == "tench"  # ImageNet-1k label 0
    wnids = timm_synsets("imagenet_r_synsets.txt")
    assert len(wnids) == 200 and [vision.imagenet_class_name(w) for w in wnids] == [clip_names[w] for w in wnids]
    assert len({clip_names[w] for w in wnids}) == 200  # no two ImageNet-R classes share a name
    assert vision.imagenet_class_name("n00000001") == "n00000001"  # not an ImageNet-1k id
    assert vision.imagenet_class_name("my_drawings") == "my drawings"


def test_official_layout_task(fake_root, clip_names, monkeypatch):
    root, folders, files = fake_root
    opened = []
    monkeypatch.setattr(vision, "_open", lambda path: opened.append(path) or Image.open(path))
    task = get_task("imagenet_r", root=str(root))
    assert task.name == "imagenet_r" and task.modality == "image"
    assert task.classes == ["my drawings"] + [clip_names[f] for f in folders[1:]]
    assert all(t.count("{}") == 1 for t in task.templates) and "a photo of a {}." in task.templates
    assert str(root / "imagenet-r") in task.licence
    data = {s: task.split(s) for s in ("train", "val", "test")}
    assert opened == []  # labels and splits without loading an image
    assert [len(data[s]) for s in ("train", "val", "test")] == [18, 2, 5]  # 20% test, 10% of the rest as val
    for split in data.values():  # the label of an image is its folder's position in sorted order
        assert split.labels == [folders.index(Path(k).parent.name) for k in split.keys]
    keys = [Path(k) for s in data.values() for k in s.keys]
    assert sorted(keys) == files  # every image exactly once over train, val and test
    image, label = data["test"][0]
    assert len(opened) == 1 and image.mode == "RGB" and image.size == (4, 4)
    assert label == folders.index(Path(data["test"].keys[0]).parent.name)


def test_test_split_is_fixed_and_val_follows_the_seed(fake_root):
    root, _, _ = fake_root
    tasks = [get_task("imagenet_r", root=str(root), seed=s) for s in (0, 0, 1, 2)]
    tests = [t.split("test").keys for t in tasks]
    assert tests[0] == tests[1] == tests[2] == tests[3]
    vals = [t.split("val").keys for t in tasks]
    assert vals[0] == vals[1] and len({tuple(v) for v in vals[1:]}) > 1
    for t in tasks:
        assert not set(t.split("test").keys) & (set(t.split("train").keys) | set(t.split("val").keys))


def test_imagenet_r_folder_name_and_folder_layout(tmp_path, clip_names):
    wnids = timm_synsets("imagenet_r_synsets.txt")[:2]
    for wnid in wnids:
        write_images(tmp_path / "raw" / "imagenet_r" / wnid, 5)
    task = get_task("imagenet_r", root=str(tmp_path / "raw"))
    assert task.classes == [clip_names[w] for w in wnids] and len(task.split("test")) == 2
    for split, n in (("train", 10), ("test", 3)):  # the folder layout's own test split, no 20% held out
        for wnid in wnids:
            write_images(tmp_path / "split" / "imagenet_r" / split / wnid, n)
    task = get_task("imagenet_r", root=str(tmp_path / "split"))
    assert task.classes == [clip_names[w] for w in wnids]
    assert [len(task.split(s)) for s in ("train", "val", "test")] == [18, 2, 6]
    assert task.split("test").labels == [0, 0, 0, 1, 1, 1]


def test_missing_data_names_the_expected_paths(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        get_task("imagenet_r", root=str(tmp_path / "nowhere"))
    message = str(e.value)
    assert f"{tmp_path / 'nowhere' / 'imagenet-r'}/{{wnid}}/*.jpg" in message
    assert f"{tmp_path / 'nowhere' / 'imagenet_r'}/{{train,test}}/{{class}}" in message


def test_missing_timm_data_is_named(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else find_spec(name, *a))
    vision.imagenet_class_names.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="imagenet_synsets.txt.*'timm' package, which is not installed"):
            vision.imagenet_class_name("n01443537")
        assert vision.imagenet_class_name("my_drawings") == "my drawings"  # no WordNet id: no lookup
    finally:
        vision.imagenet_class_names.cache_clear()
