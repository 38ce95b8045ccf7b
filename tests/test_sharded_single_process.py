"""`hypergrad.sharded.sharded_hypergrad` in one process (plain parameters, no shards): the mixed product of an
objective holding a stop-gradient, taken from the directional derivatives of per-example outputs, against
autograd's (which respects the stop-gradient); the two hooks come together."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from hypergrad.approx_hypergrad import implicit_hypergrad, make_solver
from hypergrad.sharded import sharded_hypergrad


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
    xv, yv = torch.randn(12, 4, dtype=torch.float64), torch.randn(12, 1, dtype=torch.float64)
    phi = {"scale": torch.tensor([0.7], dtype=torch.float64)}

    def losses(params=None):
        out = model(x) if params is None else functional_call(model, params, (x,))
        return ((out - y) ** 2).squeeze(-1)

    def weights(scale, values):  # loss-based weights: they read the losses as values (a stop-gradient)
        return torch.softmax(-scale * values.detach(), 0)

    def inner(params, o):
        values = losses(params)
        return (weights(o["scale"], values) * values).sum()

    def outer(params, o):
        return ((functional_call(model, params, (xv,)) - yv) ** 2).mean()

    return model, losses, weights, inner, outer, phi


def test_stop_gradient_mixed_product_from_directional_derivatives():
    model, losses, weights, inner, outer, phi = problem()
    theta = {k: v.detach() for k, v in model.named_parameters()}
    solve = make_solver("identity")
    exact = implicit_hypergrad(inner, outer, theta, phi, solve, "rev_rev")  # autograd respects the detach

    def current(o):  # the inner objective with the module's live parameters, as sharded_hypergrad calls it
        values = losses()
        return (weights(o["scale"], values) * values).sum()

    def mixed_from_directional(values, directional):
        scale = phi["scale"].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad((weights(scale, values) * directional).sum(), scale)
        return {"scale": grad}

    result = sharded_hypergrad(model, current, lambda o: outer(dict(model.named_parameters()), o), phi, solve,
                               inner_outputs=losses, mixed_from_directional=mixed_from_directional)
    torch.testing.assert_close(result["scale"], exact["scale"], rtol=1e-7, atol=1e-12)
    # finite differences of grad_phi cross the stop-gradient: a different (wrong) value here
    crossing = sharded_hypergrad(model, current, lambda o: outer(dict(model.named_parameters()), o), phi, solve)
    assert not torch.allclose(crossing["scale"], exact["scale"], rtol=1e-3)


def test_both_hooks_or_neither():
    model, losses, *_, phi = problem()
    with pytest.raises(ValueError, match="both"):
        sharded_hypergrad(model, lambda o: losses().sum(), lambda o: losses().sum(), phi, make_solver("identity"),
                          inner_outputs=losses)
