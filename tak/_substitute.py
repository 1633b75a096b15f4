"""Calling a module with other values of its parameters (imports nothing of tak)."""
from torch import nn
from torch.func import functional_call


def parameter_paths(module: nn.Module) -> dict[str, str]:
    """{path: name} for each distinct (submodule, attribute) holding a parameter, ``name`` the parameter's name in
    ``module.named_parameters()``. A submodule reachable under several paths (transformers 4.x's T5 shares its
    ``shared`` embedding with both stacks) is counted once; a parameter tied into another module (an LM head) has
    a path of its own."""
    names, paths, visited = {}, {}, set()
    for prefix, m in module.named_modules(remove_duplicate=False):
        first = id(m) not in visited
        visited.add(id(m))
        for attr, p in m._parameters.items():
            if p is not None:
                path = f"{prefix}.{attr}" if prefix else attr
                name = names.setdefault(id(p), path)
                if first:
                    paths[path] = name
    return paths


def call_with(module: nn.Module, params: dict, args=(), kwargs=None, paths: dict[str, str] | None = None,
              buffers: dict | None = None):
    """``module(*args, **kwargs)`` with the parameters named in ``params`` ({``named_parameters()`` name: tensor})
    taking those values at every path they are used under; ``paths``: ``parameter_paths(module)``, found here when
    not given (callers on a hot path pass it); ``buffers`` ({``named_buffers()`` name: tensor}) stand in for those
    buffers.

    ``torch.func.functional_call(module, params)`` ties aliases itself, but leaves the substituted tensors in place
    of the parameters of a submodule reachable under several paths (its restore undoes the first path and then
    writes back the substitute it saved from the second); this substitutes each (submodule, attribute) once."""
    paths = parameter_paths(module) if paths is None else paths
    substitutes = {path: params[name] for path, name in paths.items() if name in params}
    return functional_call(module, {**substitutes, **(buffers or {})}, args, kwargs, tie_weights=False)
