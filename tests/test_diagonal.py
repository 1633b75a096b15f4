"""The GGN diagonal against diag(1/N Σ_n J_nᵀ J_n) from torch.func.jacrev."""
import torch
from torch import nn
from torch.func import functional_call, jacrev

import tak
from tak.curvature import DiagonalGGN, fit_diagonal
from tests.util import rel_err


def exact_diagonal(model, batch, output):
    """{parameter name: diag of the GGN block} for a float64 model: 1/N Σ_n Σ_c J_n[c]²."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    J = jacrev(lambda p: output(lambda *a, **k: functional_call(model, p, a, k), batch))(params)
    n = next(iter(J.values())).shape[0]
    return {name: j.square().sum((0, 1)) / n for name, j in J.items()}


class TokenNet(nn.Module):
    def __init__(self, d=5, c=3):
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(d, 7), nn.LayerNorm(7), nn.Linear(7, c, bias=False)

    def forward(self, x, attention_mask):
        h = self.fc2(torch.tanh(self.ln(self.fc1(x))))
        w = attention_mask.to(h.dtype).unsqueeze(-1)
        return (h * w).sum(1) / w.sum(1)


def test_exact_diagonal_of_a_token_model_with_padding():
    model = TokenNet().double()
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    mask = torch.ones(6, 4, dtype=torch.long)
    mask[1, 2:] = 0
    mask[4, 1:] = 0
    batches = [{"x": x[:3], "attention_mask": mask[:3]}, {"x": x[3:], "attention_mask": mask[3:]}]
    d = fit_diagonal(model, batches, exact=True, progress=False)
    exact = exact_diagonal(model, {"x": x, "attention_mask": mask}, lambda f, b: f(**b))
    fc1 = torch.cat([exact["fc1.weight"], exact["fc1.bias"][:, None]], 1)
    assert rel_err(d["fc1"].D, fc1) < 1e-5
    assert rel_err(d["fc2"].D, exact["fc2.weight"]) < 1e-5
    ln = torch.cat([exact["ln.weight"], exact["ln.bias"]])[:, None]
    assert rel_err(d["ln"].D, ln) < 1e-5


def test_quadratic_form_and_storage(tmp_path):
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3))
    d = fit_diagonal(model, [torch.randn(8, 4)], mc_samples=3, progress=False)
    taus = {n: torch.randn_like(p, requires_grad=True) for n, p in model.named_parameters()}
    q = d.quadratic_form(taus, weights={"2": 0.1})
    want = sum(w * (d[n].D * torch.cat([taus[f"{n}.weight"], taus[f"{n}.bias"][:, None]], 1) ** 2).sum()
               for n, w in (("0", 1.0), ("2", 0.1)))
    assert rel_err(q, want) < 1e-6
    q.backward()
    assert rel_err(taus["2.bias"].grad, 0.2 * d["2"].D[:, -1] * taus["2.bias"].detach()) < 1e-6
    d.save(tmp_path / "diag.safetensors")
    back = DiagonalGGN.load(tmp_path / "diag.safetensors", model=model)
    assert back.meta["kind"] == "diagonal" and torch.equal(back["0"].D, d["0"].D)


def test_monte_carlo_converges_to_exact():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    exact = fit_diagonal(model, [x], exact=True, progress=False)["0"].D
    errors = [rel_err(fit_diagonal(model, [x], mc_samples=m, seed=1, progress=False)["0"].D, exact) for m in (4, 1024)]
    assert errors[1] < 0.1 and errors[1] < errors[0] / 3
    assert tak.fit_diagonal is fit_diagonal


def test_monte_carlo_dense_blocks_are_averaged_over_probes_and_converge_to_exact():
    """A LayerNorm's Monte-Carlo diagonal is divided by N·probes, as a linear layer's, and converges to exact."""
    torch.manual_seed(0)
    model = TokenNet().double()
    batch = {"x": torch.randn(8, 4, 5, dtype=torch.float64), "attention_mask": torch.ones(8, 4, dtype=torch.long)}
    batch["attention_mask"][2, 3:] = 0
    exact = fit_diagonal(model, [batch], exact=True, progress=False)["ln"].D
    errors = [rel_err(fit_diagonal(model, [batch], mc_samples=m, seed=1, progress=False)["ln"].D, exact)
              for m in (4, 1024)]
    assert errors[1] < 0.1 and errors[1] < errors[0] / 3
