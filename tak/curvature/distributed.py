"""Fitting over ``torch.distributed``: each rank accumulates sums over its shard of the batches, then one
all-reduce adds the sums and counts, so every rank ends with the factors of all the data."""
import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without torch.distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 without torch.distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_rank() -> bool:
    """True on rank 0, or without torch.distributed: the process that writes files."""
    return not is_distributed() or dist.get_rank() == 0


def all_reduce_sums(tensors: list[torch.Tensor]) -> None:
    """In place: each tensor becomes its sum over ranks (no-op without torch.distributed).

    One flat buffer, one all-reduce, in the dtype of the first tensor."""
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(tensors[0].dtype) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def on_main_rank(write, device) -> None:
    """``write()`` on rank 0 (the one process without torch.distributed), the others waiting for it; where it raises
    there, every rank raises (the others an OSError naming rank 0), so none is left waiting in a collective."""
    error = None
    if is_main_rank():
        try:
            write()
        except Exception as e:  # re-raised below, once the other ranks have heard of it
            error = e
    if not on_every_rank(error is None, device):
        raise error if error is not None else OSError("rank 0 failed to write its files (its error says why)")


def on_every_rank(flag: bool, device) -> bool:
    """Whether ``flag`` holds on every rank (``flag`` itself without torch.distributed): one all-reduce."""
    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
