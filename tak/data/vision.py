"""Image tasks: the 14-Vision datasets and ImageNet-R from local roots, and two embedded ones
(``digits`` from scikit-learn, ``fashion_mnist`` from the Debian package ``dataset-fashion-mnist``).

A 14-Vision dataset is read from the folder layout ``{root}/{name}/{train,test}/{class}/*.jpg`` (or
``{root}/{train,test}/...``) when it exists, else with its torchvision class (``download=False``) under
``root``. ImageNet-R (``imagenet_r``, used for the class-partition protocol of TAK Sec. F.7) is read
from its official tarball's layout ``{root}/imagenet-r/{wnid}/*.jpg``, a fixed 20% (seed 0) held out
as test, or from the folder layout; its classes get CLIP's ImageNet class names. Images load lazily,
as RGB PIL images; CLIP preprocessing is the backbone's job.
"""
import functools
import gzip
import importlib.util
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from .registry import register_task
from .splits import task_from_splits, validation_split

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".tif", ".tiff", ".webp"}


class ImageSplit(Sequence):
    """``(RGB PIL image, label)`` examples whose images load on access: ``load(key)`` opens the image
    of ``key``. ``labels`` are known without loading; ``subset`` selects without loading."""

    def __init__(self, load, keys, labels):
        self.load, self.keys, self.labels = load, list(keys), [int(y) for y in labels]

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.subset(range(len(self))[i])
        return self.load(self.keys[i]).convert("RGB"), self.labels[i]

    def subset(self, indices, labels=None):
        """The examples at ``indices``, relabelled with ``labels`` if given."""
        indices = list(indices)
        return ImageSplit(self.load, [self.keys[i] for i in indices],
                          [self.labels[i] for i in indices] if labels is None else labels)


def readable(name: str) -> str:
    """A class name for prompts: underscores and slashes become spaces, a CamelCase single word is
    split and lowercased ("AnnualCrop" -> "annual crop")."""
    name = name.replace("_", " ").replace("/", " ")
    if " " not in name.strip() and re.search(r"[a-z][A-Z]", name):
        name = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name).lower()
    return " ".join(name.split())


def _open(path):
    with Image.open(path) as image:
        image.load()
        return image


# --- folder layout -------------------------------------------------------------------------------

def _hidden(path: Path, root: Path) -> bool:
    """Whether ``path`` or a folder between ``root`` and it is hidden (".ipynb_checkpoints", macOS "._x.jpg")."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _class_folders(folder: Path) -> list[str]:
    """The names of ``folder``'s visible subfolders, sorted."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _folder_split(folder: Path, classes: list[str]) -> ImageSplit:
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (folder / name).rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and not _hidden(p, folder / name))
        files += found
        labels += [label] * len(found)
    return ImageSplit(_open, files, labels)


def _has_splits(folder: Path) -> bool:
    """Whether ``folder`` holds the folder layout's ``train/`` and ``test/`` folders."""
    return (folder / "train").is_dir() and (folder / "test").is_dir()


def _held_out_test(load_all):
    """``(load_train, load_test)`` for a dataset without a test split: a fixed 20% (seed 0) of
    ``load_all()``'s examples is test, the rest train."""
    data = functools.cache(lambda: validation_split(load_all(), 0.2, None, seed=0))
    return (lambda: data()[0]), (lambda: data()[1])


def folder_task(name: str, folder: Path, templates: list[str], seed: int = 0, numbered=None, class_name=None):
    """A task from ``folder/{train,test}/{class}/*.<image>``; the classes are train's subfolders in
    sorted order, named ``numbered[int(folder)]`` for numbered folders ("00014") when ``numbered`` is
    given, else ``class_name(folder)`` (default ``readable``). Hidden files and folders (a leading
    ".") are skipped."""
    folders = _class_folders(folder / "train")
    extra = sorted(set(_class_folders(folder / "test")) - set(folders))
    if extra:
        raise ValueError(f"{folder}/test has classes missing from {folder}/train: {extra}")
    class_name = class_name or readable
    classes = [numbered[int(f)] if numbered and f.isdigit() and int(f) < len(numbered) else class_name(f)
               for f in folders]
    return task_from_splits(name, classes, "image", templates, lambda: _folder_split(folder / "train", folders),
                            lambda: _folder_split(folder / "test", folders), f"local copy in {folder}; the "
                            "dataset's own terms apply", seed, str(folder))


# --- the 14-Vision datasets ----------------------------------------------------------------------

_DIGITS = [str(i) for i in range(10)]
_GTSRB = [  # the meaning of GTSRB's class ids 0..42
    "speed limit 20 km/h", "speed limit 30 km/h", "speed limit 50 km/h", "speed limit 60 km/h",
    "speed limit 70 km/h", "speed limit 80 km/h", "end of speed limit 80 km/h", "speed limit 100 km/h",
    "speed limit 120 km/h", "no overtaking", "no overtaking by trucks", "right of way at the next crossroads",
    "priority road", "give way", "stop", "no vehicles", "no trucks", "no entry", "general danger",
    "bend to the left", "bend to the right", "double bend", "uneven road", "slippery road",
    "road narrows on the right", "roadworks", "traffic lights", "pedestrians", "children", "cyclists",
    "ice or snow", "wild animals", "end of all restrictions", "turn right ahead", "turn left ahead",
    "ahead only", "ahead or turn right", "ahead or turn left", "keep right", "keep left", "roundabout",
    "end of no overtaking", "end of no overtaking by trucks",
]


class _Vision(NamedTuple):
    """How to read one local image dataset (a 14-Vision one, ImageNet-R): its title; torchvision's
    class for it (None: folder layout only); that class's arguments for the train and test splits
    (test None: a fixed 20% of the data, seed 0, is test); the files it expects under root; a
    dataset-specific prompt template; class names when the dataset has none (label i is
    ``classes[i]``)."""

    title: str
    tv_class: str | None
    train: dict | None
    test: dict | None
    layout: str
    template: str
    classes: list[str] | None = None

    @property
    def templates(self):
        return ["a photo of a {}.", self.template]


VISION = {
    "cars": _Vision("Stanford Cars", "StanfordCars", {"split": "train"}, {"split": "test"},
                    "stanford_cars/{devkit,cars_train,cars_test,cars_test_annos_withlabels.mat}",
                    "a photo of a {}, a type of car."),
    "dtd": _Vision("DTD", "DTD", {"split": "train"}, {"split": "test"}, "dtd/dtd/{images,labels}",
                   "a photo of a {} texture."),
    "eurosat": _Vision("EuroSAT", "EuroSAT", {}, None, "eurosat/2750/{class}/*.jpg",
                       "a satellite photo of {}."),
    "gtsrb": _Vision("GTSRB", "GTSRB", {"split": "train"}, {"split": "test"},
                     "gtsrb/{GTSRB/Training,GTSRB/Final_Test/Images,GT-final_test.csv}",
                     'a zoomed in photo of a "{}" traffic sign.', _GTSRB),
    "mnist": _Vision("MNIST", "MNIST", {"train": True}, {"train": False}, "MNIST/raw/*-ubyte",
                     'a photo of the number "{}".', _DIGITS),
    "resisc45": _Vision("RESISC45", None, None, None, "resisc45/{NWPU-RESISC45/{class}/*.jpg,resisc45-{train,test}.txt}",
                        "satellite imagery of {}."),
    "sun397": _Vision("SUN397", "SUN397", {}, None, "SUN397/{ClassName.txt,a/abbey/sun_*.jpg,...}",
                      "a photo of a {}, a type of place."),
    "svhn": _Vision("SVHN", "SVHN", {"split": "train"}, {"split": "test"}, "{train,test}_32x32.mat",
                    'a photo of the house number "{}".', _DIGITS),
    "cifar100": _Vision("CIFAR-100", "CIFAR100", {"train": True}, {"train": False}, "cifar-100-python/",
                        "a low resolution photo of a {}."),
    "stl10": _Vision("STL-10", "STL10", {"split": "train"}, {"split": "test"}, "stl10_binary/",
                     "a photo of the {}, a type of object."),
    "flowers102": _Vision("Flowers102", "Flowers102", {"split": "train"}, {"split": "test"},
                          "flowers-102/{jpg,imagelabels.mat,setid.mat}", "a photo of a {}, a type of flower."),
    "oxford_pets": _Vision("Oxford-IIIT Pet", "OxfordIIITPet", {"split": "trainval"}, {"split": "test"},
                           "oxford-iiit-pet/{images,annotations}", "a photo of a {}, a type of pet."),
    "pcam": _Vision("PatchCamelyon", "PCAM", {"split": "train"}, {"split": "test"},
                    "pcam/camelyonpatch_level_2_split_{train,test}_{x,y}.h5", "a histopathology slide of {}.",
                    ["healthy lymph node tissue", "lymph node tissue with metastatic tumor"]),
    "fer2013": _Vision("FER2013", "FER2013", {"split": "train"}, {"split": "test"},
                       "fer2013/{fer2013.csv | icml_face_data.csv}",
                       "a photo of a {} looking face.",
                       ["angry", "disgusted", "fearful", "happy", "sad", "surprised", "neutral"]),
}


def _tv_labels(ds) -> list[int]:
    """All labels of a torchvision dataset, read from its attributes (images are not loaded)."""
    if hasattr(ds, "_FILES"):  # PCAM keeps its labels in an HDF5 file
        with ds.h5py.File(ds._base_folder / ds._FILES[ds._split]["targets"][0]) as f:
            return f["y"][:, 0, 0, 0].tolist()
    for attr in ("targets", "labels", "_labels"):
        if hasattr(ds, attr):
            labels = list(getattr(ds, attr))
            break
    else:
        labels = [y for _, y in ds._samples]
    if any(y is None for y in labels):  # FER2013's Kaggle test.csv
        raise ValueError(f"{type(ds).__name__} under {ds.root}: this split has no labels; its test labels come "
                         "with fer2013.csv or icml_face_data.csv")
    return [int(y) for y in labels]


def _tv_split(ds) -> ImageSplit:
    """The dataset's examples, in the sorted order of their files where the class lists them from a directory
    walk (SUN397's ``rglob``: the filesystem's order), so a seed draws the same val/test on every copy."""
    labels = _tv_labels(ds)
    files = getattr(ds, "_image_files", None)
    order = sorted(range(len(ds)), key=lambda i: str(files[i])) if files is not None else range(len(ds))
    return ImageSplit(lambda i: ds[i][0], order, [labels[i] for i in order])


def torchvision_task(name: str, root: str, seed: int = 0):
    """The task ``name`` from torchvision's dataset class, ``download=False``."""
    from tak._compat import ensure_torchvision_importable

    spec = VISION[name]
    ensure_torchvision_importable()
    import torchvision.datasets

    cls = getattr(torchvision.datasets, spec.tv_class)
    no_download = {} if spec.tv_class == "FER2013" else {"download": False}  # FER2013 never downloads
    train = cls(root, **spec.train, **no_download)
    if spec.test is None:
        load_train, load_test = _held_out_test(lambda: _tv_split(train))
    else:  # the test files are found now, not at the first evaluation after training
        test = cls(root, **spec.test, **no_download)
        load_train, load_test = (lambda: _tv_split(train)), (lambda: _tv_split(test))
    classes = spec.classes or [readable(c) for c in train.classes]
    return task_from_splits(name, classes, "image", spec.templates, load_train, load_test,
                            f"{spec.title}: local copy under {root} (torchvision layout); the dataset's own terms "
                            "apply", seed, f"{root} ({spec.tv_class})")


def resisc45_files(folder: Path, seed: int = 0):
    """RESISC45 as torchgeo and the task-arithmetic code keep it: the images ``{folder}/NWPU-RESISC45/{class}/*.jpg``
    (the official archive), the file names of each split in ``{folder}/resisc45-{train,test}.txt`` (their val split
    is not used: val is drawn from train); without those files, a fixed 20% (seed 0) of the images is test. None
    where ``folder`` holds no ``NWPU-RESISC45/``."""
    images = folder / "NWPU-RESISC45"
    classes = _class_folders(images) if images.is_dir() else []
    if not classes:
        return None
    spec, lists = VISION["resisc45"], [folder / f"resisc45-{split}.txt" for split in ("train", "test")]
    if all(f.is_file() for f in lists):
        every = functools.cache(lambda: _folder_split(images, classes))  # one walk of the images for both splits

        def load(names: Path):
            keep = set(names.read_text().split())
            return every().subset([i for i, path in enumerate(every().keys) if path.name in keep])
        load_train, load_test, held_out = (lambda: load(lists[0])), (lambda: load(lists[1])), "torchgeo's splits"
    else:
        load_train, load_test = _held_out_test(lambda: _folder_split(images, classes))
        held_out = "no split files: a fixed 20% held out as test"
    return task_from_splits("resisc45", [readable(c) for c in classes], "image", spec.templates, load_train, load_test,
                            f"{spec.title}: local copy in {images} ({held_out}); the dataset's own terms apply", seed,
                            str(images))


def vision_task(name: str, root: str, seed: int = 0):
    """A 14-Vision task: the folder layout under ``{root}/{name}`` or ``root`` if there, else torchvision's (for
    RESISC45, which torchvision lacks: torchgeo's, ``resisc45_files``)."""
    spec = VISION[name]
    for folder in (Path(root) / name, Path(root)):
        if _has_splits(folder):
            return folder_task(name, folder, spec.templates, seed, spec.classes)
    expected = (f"{spec.title}: no data found. Expected the folder layout {Path(root) / name}/{{train,test}}/"
                "{class}/*.jpg")
    if name == "resisc45":
        for folder in (Path(root) / name, Path(root)):
            task = resisc45_files(folder, seed)
            if task is not None:
                return task
        raise FileNotFoundError(f"{expected}, or torchgeo's layout {Path(root) / spec.layout}")
    try:
        return torchvision_task(name, root, seed)
    except RuntimeError as e:  # torchvision's "Dataset not found"
        raise FileNotFoundError(f"{expected}, or torchvision's {spec.tv_class} layout {Path(root) / spec.layout} "
                                f"(torchvision said: {e})") from None
    except ImportError as e:
        raise FileNotFoundError(f"{expected}, or torchvision's {spec.tv_class} layout {Path(root) / spec.layout}, "
                                f"which needs torchvision ({e})") from None


# --- ImageNet-R ----------------------------------------------------------------------------------

IMAGENET_R = _Vision("ImageNet-R", None, None, None, "imagenet-r/{wnid}/*.jpg",
                     "a {} in a rendition such as art, cartoons or sculpture.")
_WNID = re.compile(r"n\d{8}")
_MODELS_HINT = "pip install 'kfac_kernels[models]'"


def _package_file(package: str, relative: str) -> Path:
    """The file ``relative`` of the installed package ``package``, found without importing it
    (importing timm fails where torchvision's operators are missing, see ``tak._compat``)."""
    spec = importlib.util.find_spec(package)
    folders = [Path(f) for f in (spec.submodule_search_locations or [])] if spec else []
    for folder in folders:
        if (folder / relative).is_file():
            return folder / relative
    if not folders:
        raise FileNotFoundError(f"ImageNet class names need {relative} from the {package!r} package, which is not "
                                f"installed ({_MODELS_HINT} installs it)")
    raise FileNotFoundError(f"ImageNet class names: no file {' or '.join(str(f / relative) for f in folders)}; it "
                            f"comes with {package} ({_MODELS_HINT} installs it)")


@functools.cache
def imagenet_class_names() -> dict[str, str]:
    """WordNet id -> CLIP's class name, for the 1000 ImageNet-1k classes ("n01443537" -> "goldfish").

    CLIP's names (open_clip's ``IMAGENET_CLASSNAMES``) are in ImageNet-1k's standard label order, which
    is the sorted order of the classes' WordNet ids, read from timm's ``imagenet_synsets.txt``."""
    path = _package_file("timm", "data/_info/imagenet_synsets.txt")
    wnids = path.read_text().split()
    from tak._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    try:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    except ImportError as e:
        raise ImportError(f"ImageNet class names are CLIP's, from open_clip ({e}); install it with "
                          f"{_MODELS_HINT}") from e
    if len(wnids) != 1000 or wnids != sorted(wnids) or len(IMAGENET_CLASSNAMES) != 1000:
        raise ValueError(f"ImageNet class names: expected 1000 sorted WordNet ids in {path} and 1000 names in "
                         f"open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES, got {len(wnids)} ids "
                         f"({'' if wnids == sorted(wnids) else 'not '}sorted) and {len(IMAGENET_CLASSNAMES)} names")
    return dict(zip(wnids, IMAGENET_CLASSNAMES))


def imagenet_class_name(folder: str) -> str:
    """CLIP's name of the ImageNet-1k class whose WordNet id is ``folder``; ``readable(folder)`` for a
    folder that is not one (the class names are loaded only when some folder looks like a WordNet id)."""
    if _WNID.fullmatch(folder):
        name = imagenet_class_names().get(folder)
        if name is not None:
            return name
    return readable(folder)


def imagenet_r(root: str, seed: int = 0):
    """ImageNet-R: renditions (art, cartoons, sculptures, ...) of 200 ImageNet classes. Read from, in
    this order: the folder layout ``{root}/imagenet_r/{train,test}/{class}/``; the official tarball's
    layout ``{root}/imagenet-r/{wnid}/*.jpg`` (or ``{root}/imagenet_r/{wnid}/``), which has no test
    split, so a fixed 20% (seed 0) of its images is test; the folder layout ``{root}/{train,test}/``.
    Classes are the class folders in sorted order, named by ``imagenet_class_name``."""
    spec, root = IMAGENET_R, Path(root)
    if _has_splits(root / "imagenet_r"):
        return folder_task("imagenet_r", root / "imagenet_r", spec.templates, seed, class_name=imagenet_class_name)
    for folder in (root / "imagenet-r", root / "imagenet_r"):
        folders = _class_folders(folder) if folder.is_dir() else []
        if folders and not {"train", "test"} & set(folders):  # not an incomplete folder layout
            load_train, load_test = _held_out_test(lambda: _folder_split(folder, folders))
            return task_from_splits("imagenet_r", [imagenet_class_name(f) for f in folders], "image",
                                    spec.templates, load_train, load_test,
                                    f"{spec.title}: local copy in {folder} (official layout, a fixed 20% held out "
                                    "as test); the dataset's own terms apply", seed, str(folder))
    if _has_splits(root):
        return folder_task("imagenet_r", root, spec.templates, seed, class_name=imagenet_class_name)
    raise FileNotFoundError(f"{spec.title}: no data found. Expected the official tarball's layout "
                            f"{root / spec.layout} (or {root}/imagenet_r/{{wnid}}/*.jpg), or the folder layout "
                            f"{root / 'imagenet_r'}/{{train,test}}/{{class}}/*.jpg")


# --- embedded image tasks ------------------------------------------------------------------------

@functools.cache
def _digits():
    """``(train, test)``: scikit-learn's 8x8 digits as 32x32 RGB images, a fixed 20% (seed 0) as test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = [Image.fromarray(np.round(x * 255 / 16).astype(np.uint8)).resize((32, 32), Image.NEAREST).convert("RGB")
              for x in data.images]
    return validation_split(list(zip(images, data.target.tolist())), 0.2, None, seed=0)


def digits(root=None, seed=0):
    """Handwritten digits 0-9 (1,797 images from scikit-learn)."""
    return task_from_splits("digits", _DIGITS, "image", ["a photo of the number \"{}\".", "a handwritten digit {}."],
                            lambda: _digits()[0], lambda: _digits()[1], "UCI optical recognition of handwritten "
                            "digits (CC BY 4.0), as shipped in scikit-learn (BSD-3-Clause)", seed)


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_FASHION_CLASSES = ["t-shirt or top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                    "ankle boot"]


def _idx(path: Path) -> np.ndarray:
    """The array in a gzipped IDX file (MNIST's format: magic with the number of dimensions, sizes)."""
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    shape = np.frombuffer(data, ">u4", ndim, 4)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


@functools.cache
def _fashion(part: str) -> ImageSplit:
    images = _idx(FASHION_MNIST / f"{part}-images-idx3-ubyte.gz")
    return ImageSplit(lambda i: Image.fromarray(images[i]), range(len(images)),
                      _idx(FASHION_MNIST / f"{part}-labels-idx1-ubyte.gz"))


def fashion_mnist(root=None, seed=0):
    """Fashion-MNIST: 28x28 grey photos of 10 kinds of fashion products (60,000 train, 10,000 test)."""
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        raise FileNotFoundError(f"fashion_mnist reads {FASHION_MNIST}/*-ubyte.gz from the Debian package "
                                "dataset-fashion-mnist, which is not installed (apt-get install dataset-fashion-mnist)")
    return task_from_splits("fashion_mnist", _FASHION_CLASSES, "image",
                            ["a photo of a {}.", "a black and white photo of a {}, a fashion product."],
                            lambda: _fashion("train"), lambda: _fashion("t10k"),
                            "Fashion-MNIST (Zalando, MIT), from the Debian package dataset-fashion-mnist", seed)


for _name, _spec in VISION.items():
    register_task(_name, functools.partial(vision_task, _name), f"{_spec.title} (local: folder layout"
                  + (f" or torchvision {_spec.tv_class})" if _spec.tv_class else " or torchgeo's NWPU-RESISC45/)"))
register_task("imagenet_r", imagenet_r, "ImageNet-R, 200 classes (local: the official imagenet-r/{wnid}/ layout "
              "with a fixed 20% test, or folder layout)")
register_task("digits", digits, "scikit-learn 8x8 handwritten digits, 10 classes (embedded)")
register_task("fashion_mnist", fashion_mnist, "Fashion-MNIST, 10 classes (Debian package dataset-fashion-mnist)")
