"""fit_kfac over torch.distributed: 2 gloo processes on CPU, each fitting its shard of the batches,
end with the factors of one process fitting all of them; rank 0 writes the file."""
import importlib.util
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tak.curvature import KFAC, fit_kfac
from tak.curvature.distributed import is_main_rank
from tests.util import rel_err

WORLD = 2
HAS_STORAGE = importlib.util.find_spec("tak.curvature.storage") is not None


class Encoder(nn.Module):
    """Tokens (N, T, d) with a padding mask -> linear + position embedding (position ids the batch shares),
    LayerNorm, self-attention, masked mean, head; a linear layer off the output's path."""

    def __init__(self, d=6, c=3):
        super().__init__()
        self.embed, self.positions = nn.Linear(d, d), nn.Embedding(8, d)
        self.norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head, self.unused = nn.Linear(d, c), nn.Linear(d, d)

    def forward(self, x, attention_mask):
        self.unused(x)
        h = self.norm(torch.tanh(self.embed(x) + self.positions(torch.arange(x.shape[1])[None])))
        h = h + self.attn(h, h, h, key_padding_mask=~attention_mask, need_weights=False)[0]
        w = attention_mask.to(h.dtype).unsqueeze(-1)
        return self.head((h * w).sum(1) / w.sum(1))


def make_batches(sizes):
    batches = []
    for n, t in sizes:
        lengths = torch.randint(1, t + 1, (n,))
        lengths[0] = t
        mask = torch.arange(t)[None, :] < lengths[:, None]
        batches.append({"x": torch.randn(n, t, 6, dtype=torch.float64), "attention_mask": mask})
    return batches


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, model, batches, linear, same_batch, out_dir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    shard = batches[rank::WORLD]  # uneven shards: 3 and 2 batches
    f = fit_kfac(model, shard, exact=True, progress=False)
    torch.save({"factors": {n: (lf.A, lf.B) for n, lf in f.items()}, "n_rows": f.meta["n_rows"],
                "n_examples": f.meta["n_examples"]}, os.path.join(out_dir, f"rank{rank}.pt"))
    if HAS_STORAGE and is_main_rank():
        f.save(os.path.join(out_dir, "factors.safetensors"))
    # Monte-Carlo: every rank fits the same batch; its probes must differ between ranks
    g = fit_kfac(linear, [same_batch], mc_samples=1, progress=False)
    torch.save({n: lf.B for n, lf in g.items()}, os.path.join(out_dir, f"mc{rank}.pt"))
    os._exit(0)  # after the last collective, no process-group teardown: gloo's, both ranks at once, can abort (SIGABRT)


def test_two_gloo_processes_equal_one(tmp_path):
    model = Encoder().double()
    batches = make_batches([(4, 5), (3, 7), (5, 4), (2, 6), (6, 3)])
    linear = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3)).double()
    same_batch = torch.randn(6, 4, dtype=torch.float64)
    mp.spawn(_worker, args=(free_port(), model, batches, linear, same_batch, str(tmp_path)), nprocs=WORLD, join=True)

    single = fit_kfac(model, batches, exact=True, progress=False)
    assert {"embed", "positions", "attn.in_proj", "attn.out_proj", "head", "norm"} <= set(single)
    assert single.meta["off_path"] == ["unused"] and single["positions"].A.shape == (8,)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert set(got["factors"]) == set(single)
        assert got["n_examples"] == single.meta["n_examples"] == 20
        assert got["n_rows"] == single.meta["n_rows"]
        for name, (A, B) in got["factors"].items():
            assert rel_err(A, single[name].A) < 1e-6, (rank, name)
            assert rel_err(B, single[name].B) < 1e-6, (rank, name)

    if HAS_STORAGE:
        loaded = KFAC.load(tmp_path / "factors.safetensors", model=model)
        assert set(loaded) == set(single) and loaded.meta["n_examples"] == 20
        for name in single:
            assert rel_err(loaded[name].A, single[name].A) < 1e-6 and rel_err(loaded[name].B, single[name].B) < 1e-6
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors") == (
        ["factors.safetensors"] if HAS_STORAGE else [])

    # The all-reduced Monte-Carlo B of two ranks on one batch is not that of one rank: their probes differ.
    mc = [torch.load(tmp_path / f"mc{rank}.pt", weights_only=True) for rank in range(WORLD)]
    alone = fit_kfac(linear, [same_batch], mc_samples=1, progress=False)  # seed 0, as rank 0
    for name in alone:
        assert torch.equal(mc[0][name], mc[1][name])  # all-reduced: the same on every rank
        assert rel_err(mc[0][name], alone[name].B) > 1e-3, name
