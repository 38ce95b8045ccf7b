"""Differentiable functional optimizers of :mod:`hypergrad.optimizers`.

Ground truth: ``torch.optim.SGD``, ``Adam`` and ``AdamW`` stepped in float64 on the same
initial parameters and the same sequence of gradients (parameters, buffers and optimizer
state compared after every step), and central finite differences for the derivatives of
an unrolled optimization with respect to the learning rate and the initial parameters.
"""

import copy

import pytest
import torch

from hypergrad.optimizers import diff_adam, diff_adamw, diff_sgd
from hypergrad.trees import tree_leaves

KINDS = ["tuple", "dict"]
NAMES = ["weight", "bias", "scale"]
SHAPES = [(3, 4), (5,), ()]
STEPS = 5


def make_tree(kind, leaves):
    return dict(zip(NAMES, leaves)) if kind == "dict" else tuple(leaves)


def initial_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]


def grad_sequence(seed=1):
    """Gradients whose scale changes from step to step (so amsgrad's max matters)."""
    g = torch.Generator().manual_seed(seed)
    scales = [1.0, 3.0, 0.1, 2.0, 0.05]
    return [[scales[t] * torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
            for t in range(STEPS)]


def clone_tree(tree):
    if tree is None:
        return None
    if isinstance(tree, dict):
        return {k: clone_tree(v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(clone_tree(v) for v in tree)
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    return copy.deepcopy(tree)


def assert_tree_equal(a, b):
    """Bitwise equality of nested structures (used to prove inputs are not mutated)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_tree_equal(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_tree_equal(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


SGD_CONFIGS = [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3),
    dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.1, momentum=0.5, weight_decay=0.01),
    dict(lr=0.1, weight_decay=0.1),
    dict(lr=0.1, momentum=0.9, weight_decay=0.1, maximize=True),
    dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.05, maximize=True),
]

ADAM_CONFIGS = [
    dict(lr=1e-2),
    dict(lr=1e-2, amsgrad=True),
    dict(lr=1e-2, weight_decay=0.1),
    dict(lr=3e-2, weight_decay=0.1, amsgrad=True, betas=(0.8, 0.99), eps=1e-6),
    dict(lr=1e-2, maximize=True, weight_decay=0.05),
    dict(lr=1e-2, maximize=True, amsgrad=True),
]


def _run_reference(optim_cls, config, leaves, grads_seq):
    params = [p.clone().requires_grad_(True) for p in leaves]
    opt = optim_cls(params, **config)
    history = []
    for grads in grads_seq:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        history.append(([p.detach().clone() for p in params],
                        [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
                         for p in params]))
    return history


def _run_functional(fn, config, kind, leaves, grads_seq, reference, state_keys):
    params = make_tree(kind, [p.clone() for p in leaves])
    state = None
    for t, grads in enumerate(grads_seq):
        grads = make_tree(kind, grads)
        snapshot = (clone_tree(params), clone_tree(grads), clone_tree(state))
        new_params, new_state = fn(params, grads, state, **config)
        # Inputs are not mutated.
        assert_tree_equal(params, snapshot[0])
        assert_tree_equal(grads, snapshot[1])
        if state is not None:
            assert_tree_equal(state, snapshot[2])
        # Structure is preserved.
        assert type(new_params) is type(params)
        if kind == "dict":
            assert list(new_params.keys()) == NAMES
        ref_params, ref_state = reference[t]
        for p, q in zip(tree_leaves(new_params), ref_params):
            assert p.shape == q.shape
            close(p, q)
        for ours, theirs in state_keys:
            if new_state.get(ours) is None:
                assert all(theirs not in s or s[theirs] is None for s in ref_state)
                continue
            for leaf, s in zip(tree_leaves(new_state[ours]), ref_state):
                close(leaf, s[theirs])
        params, state = new_params, new_state
    return params, state


@pytest.mark.parametrize("config", SGD_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("kind", KINDS)
def test_diff_sgd_matches_torch_sgd(config, kind):
    leaves, grads_seq = initial_params(), grad_sequence()
    reference = _run_reference(torch.optim.SGD, config, leaves, grads_seq)
    _, state = _run_functional(diff_sgd, config, kind, leaves, grads_seq, reference,
                               [("momentum_buffer", "momentum_buffer")])
    if config.get("momentum", 0) == 0:
        assert state["momentum_buffer"] is None


@pytest.mark.parametrize("config", ADAM_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("which", ["adam", "adamw"])
def test_diff_adam_matches_torch(which, config, kind):
    fn, cls = (diff_adam, torch.optim.Adam) if which == "adam" else (diff_adamw, torch.optim.AdamW)
    leaves, grads_seq = initial_params(), grad_sequence()
    reference = _run_reference(cls, config, leaves, grads_seq)
    keys = [("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")]
    if config.get("amsgrad"):
        keys.append(("max_exp_avg_sq", "max_exp_avg_sq"))
    _, state = _run_functional(fn, config, kind, leaves, grads_seq, reference, keys)
    assert state["step"] == STEPS
    assert (state["max_exp_avg_sq"] is None) == (not config.get("amsgrad", False))


def test_adamw_default_weight_decay_matches_torch():
    leaves, grads_seq = initial_params(), grad_sequence()
    reference = _run_reference(torch.optim.AdamW, dict(lr=0.05), leaves, grads_seq)
    _run_functional(diff_adamw, dict(lr=0.05), "tuple", leaves, grads_seq, reference, [])


def test_adam_and_adamw_differ_with_weight_decay():
    """Coupled vs decoupled decay: the two must not silently be the same update."""
    params, grads = tuple(initial_params()), tuple(grad_sequence()[0])
    a, _ = diff_adam(params, grads, None, lr=0.1, weight_decay=0.5)
    b, _ = diff_adamw(params, grads, None, lr=0.1, weight_decay=0.5)
    assert not torch.allclose(a[0], b[0])


# ------------------------------------------------------------------------ differentiability
def _loss(params):
    w, b, s = params
    return (torch.tanh(w @ torch.cos(b[:4]) + s) ** 2).sum() + 0.1 * (b**4).sum()


def _unroll(fn, params, steps=3, **hparams):
    state = None
    for _ in range(steps):
        grads = torch.autograd.grad(_loss(params), params, create_graph=True)
        params, state = fn(params, grads, state, **hparams)
    return _loss(params)


UNROLL_CASES = {
    "sgd": (diff_sgd, dict(momentum=0.9), 0.1),
    "sgd_nesterov_wd": (diff_sgd, dict(momentum=0.9, nesterov=True, weight_decay=0.1), 0.1),
    "adam": (diff_adam, dict(weight_decay=0.1), 0.05),
    "adamw_amsgrad": (diff_adamw, dict(weight_decay=0.1, amsgrad=True), 0.05),
}


@pytest.mark.parametrize("case", UNROLL_CASES)
def test_gradient_through_unrolled_steps_matches_finite_difference(case):
    fn, hparams, lr0 = UNROLL_CASES[case]
    leaves = initial_params(3)

    # d loss / d lr with lr a tensor.
    lr = torch.tensor(lr0, dtype=torch.float64, requires_grad=True)
    params = tuple(p.clone().requires_grad_(True) for p in leaves)
    final = _unroll(fn, params, lr=lr, **hparams)
    d_lr, *d_params = torch.autograd.grad(final, (lr, *params))

    def at(lr_value, shift=None):
        ps = tuple((p + shift[i] if shift is not None else p).clone().requires_grad_(True)
                   for i, p in enumerate(leaves))
        return _unroll(fn, ps, lr=lr_value, **hparams).item()

    h = 1e-6
    fd_lr = (at(lr0 + h) - at(lr0 - h)) / (2 * h)
    assert abs(d_lr.item()) > 1e-3
    assert d_lr.item() == pytest.approx(fd_lr, rel=1e-6)

    # d loss / d initial params: finite, and right along a random direction.
    assert all(torch.isfinite(d).all() for d in d_params)
    g = torch.Generator().manual_seed(9)
    direction = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    analytic = sum((d * v).sum() for d, v in zip(d_params, direction)).item()
    fd = (at(lr0, [h * v for v in direction]) - at(lr0, [-h * v for v in direction])) / (2 * h)
    assert analytic == pytest.approx(fd, rel=1e-6)


def test_tensor_hyperparameters_receive_gradients():
    """Learned hyperparameters (momentum, weight decay) as tensors get gradients too."""
    leaves = initial_params(4)
    params = tuple(p.clone().requires_grad_(True) for p in leaves)
    mom = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    wd = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    final = _unroll(diff_sgd, params, lr=0.1, momentum=mom, weight_decay=wd)
    d_mom, d_wd = torch.autograd.grad(final, (mom, wd))
    assert torch.isfinite(d_mom) and torch.isfinite(d_wd)
    assert d_mom.abs() > 0 and d_wd.abs() > 0


# ------------------------------------------------------------------------ errors
@pytest.mark.parametrize("fn", [diff_sgd, diff_adam, diff_adamw])
def test_mismatched_structure_raises(fn):
    leaves = initial_params()
    params_t, params_d = tuple(leaves), make_tree("dict", leaves)
    with pytest.raises(ValueError, match="both be dicts"):
        fn(params_t, params_d, None)
    with pytest.raises(ValueError, match="tensors"):
        fn(params_t, params_t[:2], None)
    with pytest.raises(ValueError, match="shape"):
        fn(params_t, (leaves[0], leaves[1][:3], leaves[2]), None)
    with pytest.raises(ValueError, match="different keys"):
        fn(params_d, {"weight": leaves[0], "bias": leaves[1], "other": leaves[2]}, None)
    with pytest.raises(ValueError, match="gradient is None"):
        fn(params_t, (leaves[0], None, leaves[2]), None)


def test_bad_hyperparameters_raise():
    params, grads = tuple(initial_params()), tuple(grad_sequence()[0])
    with pytest.raises(ValueError, match="lr"):
        diff_sgd(params, grads, None, lr=-0.1)
    with pytest.raises(ValueError, match="momentum"):
        diff_sgd(params, grads, None, momentum=-0.5)
    with pytest.raises(ValueError, match="Nesterov"):
        diff_sgd(params, grads, None, nesterov=True)
    with pytest.raises(ValueError, match="Nesterov"):
        diff_sgd(params, grads, None, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        diff_adam(params, grads, None, betas=(1.0, 0.999))
    with pytest.raises(ValueError, match="betas"):
        diff_adamw(params, grads, None, betas=(0.9, -0.1))
    with pytest.raises(ValueError, match="eps"):
        diff_adam(params, grads, None, eps=-1e-8)
    # A state from amsgrad=False cannot continue with amsgrad=True.
    _, state = diff_adam(params, grads, None, amsgrad=False)
    with pytest.raises(ValueError, match="amsgrad"):
        diff_adam(params, grads, state, amsgrad=True)
