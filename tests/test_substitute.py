"""Calling a model with other parameter values (tak._substitute) where a submodule sits under two paths, as
transformers 4.x's T5 shares its ``shared`` embedding module with both stacks: torch.func.functional_call left the
substituted tensors in the model there. Checked on the callers: the generic linearized path and a non-linear
trainee evaluated at θ0 + ατ."""
import torch
from torch import nn
from torch.func import jvp

import tak
from tak._substitute import call_with, parameter_paths
from tak.methods.trainees import NonlinearTrainee
from tests.util import rel_err


class SharedEmbedding(nn.Module):
    """One embedding reachable as ``a`` and ``b``, its weight W (7, 5) tied into a head: f = tanh(W[ids]) Wᵀ."""

    def __init__(self):
        super().__init__()
        self.a = nn.Embedding(7, 5)
        self.b = self.a
        self.head = nn.Linear(5, 7, bias=False)
        self.head.weight = self.a.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.b(ids)))


def f(W, ids):
    return torch.tanh(W[ids]) @ W.T


def only_parameters(model):
    return all(type(p) is nn.Parameter for m in model.modules() for p in m._parameters.values() if p is not None)


def setup():
    torch.manual_seed(0)
    model = SharedEmbedding().double()
    return model, torch.tensor([[1, 4, 6], [0, 2, 2]]), 0.3 * torch.randn(7, 5, dtype=torch.float64)


def test_each_submodule_is_substituted_once_and_keeps_its_parameters():
    model, ids, tau = setup()
    assert parameter_paths(model) == {"a.weight": "a.weight", "head.weight": "a.weight"}
    W0 = model.a.weight.detach().clone()
    for _ in range(2):
        assert rel_err(call_with(model, {"a.weight": W0 + tau}, (ids,)), f(W0 + tau, ids)) < 1e-14
    assert only_parameters(model) and torch.equal(model.a.weight, W0)


def test_generic_linearization_and_nonlinear_trainee_of_a_module_under_two_paths():
    model, ids, tau = setup()
    W0 = model.a.weight.detach().clone()
    lin = tak.linearize(model, fast=False)
    lin.load_task_vector({"a.weight": tau})
    y, dy = jvp(lambda W: f(W, ids), (W0,), (tau,))
    for _ in range(2):
        assert rel_err(lin(ids), y + dy) < 1e-12
    assert only_parameters(lin._base) and torch.equal(lin._base.a.weight, W0)

    trainee = NonlinearTrainee(model)
    with torch.no_grad():
        trainee.model.a.weight.add_(tau)
    for _ in range(2):
        assert rel_err(trainee.at(0.5)(ids), f(W0 + 0.5 * tau, ids)) < 1e-14
    assert only_parameters(trainee.model) and torch.equal(trainee.model.a.weight, W0 + tau)
