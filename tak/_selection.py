"""Selecting parameters or layers by name: None (all), a glob pattern or a list of them, or a
predicate ``name -> bool``. Used by every layer of tak (imports nothing of tak)."""
import fnmatch


def selects(selection, name: str) -> bool:
    """Whether ``selection`` includes ``name``."""
    if selection is None:
        return True
    if callable(selection):
        return bool(selection(name))
    patterns = [selection] if isinstance(selection, str) else selection
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def check_patterns(selection, names, argument: str, what: str) -> None:
    """ValueError naming each pattern of ``selection`` that matches none of ``names``."""
    if selection is None or callable(selection):
        return
    names = list(names)
    unmatched = [p for p in ([selection] if isinstance(selection, str) else selection)
                 if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise ValueError(f"{argument}: {unmatched} match no {what}; it has {names[:8]}" + (" ..." if len(names) > 8 else ""))


def select_parameters(model, trainable) -> list[str]:
    """Names (``model.named_parameters()``'s) of the parameters ``trainable`` selects: None, those with
    requires_grad=True; else patterns or a predicate matched against every name of a parameter (tied
    aliases too), each pattern matching at least one. ValueError when none is selected."""
    params = dict(model.named_parameters())
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    if trainable is None:
        chosen = [name for name, p in params.items() if p.requires_grad]
    else:
        if not callable(trainable):
            trainable = [trainable] if isinstance(trainable, str) else list(trainable)  # an iterator, used twice
            check_patterns(trainable, [n for names in aliases.values() for n in names], "trainable",
                           "parameter of the model")
        chosen = [name for name, p in params.items() if any(selects(trainable, a) for a in aliases[id(p)])]
    if not chosen:
        raise ValueError(f"trainable={trainable!r} selects no parameter of {type(model).__name__} (None selects "
                         "the parameters with requires_grad=True; '*' selects all)")
    return chosen
