"""Working around a broken but common install: a CPU build of torch next to PyPI's torchvision, which
is a CUDA build. Importing that torchvision (as open_clip and transformers do) fails while it
registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms``, operators its C++
extension would have defined. ``ensure_torchvision_importable`` defines their schemas, only after
that exact failure, and imports it again; nothing ever calls those operators."""
import sys

import torch

_schemas = None


def ensure_torchvision_importable() -> None:
    global _schemas
    try:
        import torchvision  # noqa: F401
        return
    except ModuleNotFoundError:
        return
    except RuntimeError as e:
        if "torchvision::nms does not exist" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _schemas = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        _schemas.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401
