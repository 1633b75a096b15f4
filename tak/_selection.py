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
