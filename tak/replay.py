"""Frozen-prefix replay: skip the layers that a task vector leaves unchanged, when evaluating it again.

Sweeping θ0 + α τ over an α grid (or evaluating several task vectors of one trainable set) runs the
same network on the same batches many times. When τ changes only the top of the network (the top
layers, a head, the last blocks), everything computed before the first module that holds a changed
parameter is the same on every pass: a function of the inputs and θ0 alone. ``FrozenPrefix`` finds
those modules, records their outputs for each batch of a fixed sequence, and on later passes makes
each of them return its recorded output without running.

Which modules: the changed parameters are the ones with ``requires_grad`` (``tak.arithmetic.compose.
apply`` sets it on exactly the parameters τ changes; a linearized model's parameters are τ alone).
The owner of a changed parameter is the innermost module holding it that has a ``forward`` (a
``ParameterDict`` of τ is owned by its layer). The replayed calls are the outermost ones that end
before the first call of an owner starts, of modules not called again after that. They are found
(and recorded) on the first forward, by hooks on every module, with no data or model knowledge.

Assumes deterministic forwards (eval mode, no dropout), replayed modules that do not modify their inputs in
place (their side effects are not replayed: only their outputs are), and that a parameter is used within a call of
its owner or, for an owner never called, of the owner's innermost called ancestor
(``nn.MultiheadAttention`` reads ``out_proj.weight`` without calling ``out_proj``): such an ancestor
becomes a cut point, found on the first forward and used from the second. A replayed module called
a different number of times than when it was recorded raises RuntimeError. Recordings are clones,
kept on the device they were made on, within a ``ByteBudget`` that several prefixes may share: the prefix whose
recording passes it is dropped, and its passes run in full.
"""
import contextlib

import torch
from torch import nn
from torch.utils import _pytree as pytree

DEFAULT_MAX_BYTES = 4 << 30


class ByteBudget:
    """The bytes that the recordings (inputs and outputs) of the prefixes sharing it may hold together."""

    def __init__(self, limit: int = DEFAULT_MAX_BYTES):
        self.limit, self.used = int(limit), 0


def _clone(tree):
    return pytree.tree_map_only(torch.Tensor, torch.Tensor.clone, tree)


def _nbytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor))


def _same(a, b) -> bool:
    """Whether two batches (trees of tensors and constants) are equal, leaf by leaf."""
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if sa != sb:
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


class FrozenPrefix:
    """Records and replays, per batch index of a fixed sequence of batches, the outputs of the
    modules a network runs before its first changed one (see the module docstring).

    One instance serves the networks that share θ0 and the set of changed parameters (the copies at
    θ0 + α τ over an α grid, or task vectors of one trainable set), not mixed regimes: the replayed
    modules are found on the first network and looked up by path in the others."""

    def __init__(self, max_bytes: "int | ByteBudget" = DEFAULT_MAX_BYTES):
        """``max_bytes``: a budget of its own (int) or one shared with other prefixes."""
        self.budget = max_bytes if isinstance(max_bytes, ByteBudget) else ByteBudget(max_bytes)
        self.calls: dict[str, int] | None = None  # the replayed modules' calls per forward, by path
        self.records: dict[int, tuple] = {}  # batch index -> (inputs, {path: [outputs, in call order]})
        self.bytes = 0
        self._stand_ins: set[str] = set()  # called ancestors of owners never called, to cut at

    @property
    def paths(self) -> list[str] | None:
        """The replayed modules; [] when there is nothing to replay, None before the first forward."""
        return None if self.calls is None else list(self.calls)

    @contextlib.contextmanager
    def batch(self, model: nn.Module, index: int, inputs):
        """Within the context, the forward of ``model`` on ``inputs`` (batch ``index`` of the sequence)
        is watched to find the prefix (the first time), records it, or replays it. A model in training
        mode runs in full (dropout differs from pass to pass)."""
        if model.training:
            yield
            return
        if self.calls is None:  # the first forward finds the prefix, and records it
            watch = _Watch(model, self._stand_ins)
            with watch:
                yield
            found, self._stand_ins = watch.result(), watch.stand_ins
            if found is not None:
                self.calls, outputs = found
                if self.calls:
                    self._keep(index, inputs, outputs, None)
            return
        if not self.calls:
            yield
            return
        record = self.records.get(index)
        modules = _lookup(model, self.paths)
        if modules is None:
            self.drop()
            yield
        elif record is not None and _same(record[0], inputs):
            with _replaying(modules, record[1]):
                yield
        else:
            outputs = {p: [] for p in self.paths}
            with _recording(modules, outputs):
                yield
            if any(len(outputs[p]) != n for p, n in self.calls.items()):
                self.drop()  # another control flow than on the first forward: run in full from now on
                return
            self._keep(index, inputs, outputs, record)

    def _keep(self, index: int, inputs, outputs: dict, replaced) -> None:
        record = (_clone(inputs), outputs)
        added = _nbytes(record) - (0 if replaced is None else _nbytes(replaced))
        self.bytes += added
        self.budget.used += added
        self.records[index] = record
        if self.budget.used > self.budget.limit:
            self.drop()

    def drop(self) -> None:
        """Forget the prefix and its recordings (their bytes go back to the budget); later passes run in full."""
        self.budget.used -= self.bytes
        self.calls, self.records, self.bytes = {}, {}, 0


def _lookup(model: nn.Module, paths: list[str]) -> dict[str, nn.Module] | None:
    try:
        return {p: model.get_submodule(p) for p in paths}
    except AttributeError:
        return None


def _owners(model: nn.Module) -> dict[int, list[int]] | None:
    """{id of the owner of a changed parameter: ids of its ancestors, innermost first} (see the module
    docstring); None if a changed parameter has no module with a ``forward`` above it."""
    owners = {}
    for holder, m in model.named_modules(remove_duplicate=False):
        if not any(p is not None and p.requires_grad for p in m._parameters.values()):
            continue
        parts = holder.split(".") if holder else []
        chain = [model.get_submodule(".".join(parts[:i])) for i in range(len(parts), -1, -1)]
        at = next((i for i, a in enumerate(chain) if type(a).forward is not nn.Module.forward), None)
        if at is None:
            return None
        owners[id(chain[at])] = [id(a) for a in chain[at + 1:]]
    return owners


class _Watch:
    """Hooks on every module of ``model`` for one forward, cut at the first call of an owner or of a
    module of ``stand_ins`` (paths); ``result()`` gives the replayed modules' calls per forward and
    their recorded outputs (by path), or None when the cut came too late: ``stand_ins`` then holds
    the owners' stand-ins to cut at on the next forward."""

    def __init__(self, model: nn.Module, stand_ins: set[str]):
        self.model, self.owners, self.stand_ins = model, _owners(model), set(stand_ins)
        self.path_of = {}
        for path, m in model.named_modules(remove_duplicate=False):
            self.path_of.setdefault(id(m), path)
        self.triggers = {id(model.get_submodule(p)) for p in stand_ins} | set(self.owners or ())
        self.stack = []  # (module id, start tick) of the calls running
        self.kept = []  # (start tick, module id, output) of the outermost calls ended before the cut
        self.calls, self.first, self.late, self.cut, self.tick = {}, {}, set(), None, 0

    def pre(self, module, args):
        mid = id(module)
        self.calls[mid] = self.calls.get(mid, 0) + 1
        self.first.setdefault(mid, self.tick)
        if self.cut is None and mid in self.triggers:
            self.cut = self.tick
            self.late.update(m for m, _ in self.stack)  # calls still running at the cut
        if self.cut is not None:
            self.late.add(mid)
        self.stack.append((mid, self.tick))
        self.tick += 1

    def post(self, module, args, out):
        mid, start = self.stack.pop()
        if self.cut is None:
            while self.kept and self.kept[-1][0] > start:  # calls inside this one: it replaces them
                self.kept.pop()
            self.kept.append((start, mid, _clone(out)))

    def __enter__(self):
        self.handles = [h for m in self.model.modules()
                        for h in (m.register_forward_pre_hook(self.pre), m.register_forward_hook(self.post))]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def result(self) -> tuple[dict[str, int], dict[str, list]] | None:
        if self.owners is None:
            return {}, {}
        cut = self.tick if self.cut is None else self.cut
        for owner, ancestors in self.owners.items():
            called = next((a for a in [owner, *ancestors] if a in self.first), None)
            if called is None:  # a changed parameter used outside any module call (or not at all)
                return {}, {}
            if self.first[called] < cut:  # an owner never called, standing for an ancestor called earlier
                self.stand_ins.add(self.path_of[called])
        if not self.triggers >= {id(self.model.get_submodule(p)) for p in self.stand_ins}:
            return None
        outputs = {}
        for _, mid, out in self.kept:
            if mid not in self.late:
                outputs.setdefault(self.path_of[mid], []).append(out)
        # a module also called inside a replayed call would be replayed a different number of times
        calls = {path: len(outs) for path, outs in outputs.items()
                 if len(outs) == self.calls[id(self.model.get_submodule(path))]}
        return calls, {path: outputs[path] for path in calls}


@contextlib.contextmanager
def _recording(modules: dict[str, nn.Module], outputs: dict[str, list]):
    handles = [m.register_forward_hook(lambda mod, args, out, path=path: outputs[path].append(_clone(out)))
               for path, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _replaying(modules: dict[str, nn.Module], outputs: dict[str, list]):
    used = dict.fromkeys(outputs, 0)

    def replay(path):
        def forward(*args, **kwargs):
            if used[path] == len(outputs[path]):
                raise RuntimeError(f"FrozenPrefix: module {path!r} was called more often than when it was "
                                   "recorded (non-deterministic control flow?)")
            used[path] += 1
            return _clone(outputs[path][used[path] - 1])
        return forward

    saved = {path: m.__dict__.get("forward") for path, m in modules.items()}
    for path, m in modules.items():
        m.forward = replay(path)
    try:
        yield
    finally:
        for path, m in modules.items():
            if saved[path] is None:
                del m.forward
            else:
                m.forward = saved[path]
    short = [p for p, n in used.items() if n < len(outputs[p])]
    if short:
        raise RuntimeError(f"FrozenPrefix: modules {short} were called less often than when they were recorded")
