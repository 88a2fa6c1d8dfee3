"""fire_core.torch: the optimizer state of projected weights, for any optimizer, against a freshly constructed one.

After ``apply(optimizer=opt)``, one ``step`` of ``opt`` on the projected
weights must equal the first step of a new optimizer on the same weights,
while every other parameter keeps its state.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch_models import TinyResNet, seeded  # noqa: E402

import fire_core.torch as ft  # noqa: E402


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)


def loss_of(model):
    x, y = data()
    return (model(x) - y).square().mean()


def closure_for(model, opt):
    def closure():
        opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        return loss

    return closure


def test_lbfgs_joint_history_is_reset_whole():
    """LBFGS keeps one history for all its parameters (in its first's state); a step after FIRE is a fresh one's."""
    model = mlp()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3, history_size=5)
    for _ in range(3):
        opt.step(closure_for(model, opt))
    assert opt.state[model[0].weight]["old_dirs"]  # the history lives in the first parameter's state
    ft.apply(model, include="2", optimizer=opt)  # projects 2.weight, whose own state is empty
    twin = copy.deepcopy(model)
    fresh = torch.optim.LBFGS(twin.parameters(), lr=0.5, max_iter=3, history_size=5)
    assert not opt.state[model[0].weight]
    opt.step(closure_for(model, opt))
    fresh.step(closure_for(twin, fresh))
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=name)


def test_reset_optimizer_state_resets_lbfgs_history_for_any_of_its_parameters():
    model = mlp()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=2)
    opt.step(closure_for(model, opt))
    assert ft.reset_optimizer_state(opt, [model[2].bias]) == 1
    assert not opt.state


def test_list_of_optimizers_is_reset_in_each():
    model = seeded(TinyResNet)
    body = [p for n, p in model.named_parameters() if not n.startswith("fc")]
    opts = [torch.optim.Adam(body, lr=1e-3), torch.optim.SGD(model.fc.parameters(), lr=0.1, momentum=0.9)]
    model(torch.randn(2, 3, 8, 8, dtype=torch.float64)).square().mean().backward()
    for opt in opts:
        opt.step()
    kept = {n: {k: v.clone() for k, v in opts[0].state[p].items()} for n, p in model.named_parameters() if "bn" in n}
    ft.apply(model, optimizer=tuple(opts))
    assert model.stem.weight not in opts[0].state and model.fc.weight not in opts[1].state
    assert opts[1].state[model.fc.bias]["momentum_buffer"] is not None
    for n, state in kept.items():
        p = dict(model.named_parameters())[n]
        assert all(torch.equal(opts[0].state[p][k], v) for k, v in state.items()), n


def test_adam_step_after_fire_equals_a_fresh_adam_for_the_projected_weights():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.step(closure_for(model, opt))
    kept = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    ft.apply(model, include="2", optimizer=opt)
    twin = copy.deepcopy(model)
    fresh = torch.optim.Adam([twin[2].weight], lr=1e-2)
    assert all(torch.equal(opt.state[model[0].weight][k], v) for k, v in kept.items())  # not projected: kept
    opt.step(closure_for(model, opt))
    fresh.step(closure_for(twin, fresh))
    torch.testing.assert_close(model[2].weight, twin[2].weight, rtol=1e-12, atol=1e-14)
    assert int(opt.state[model[2].weight]["step"]) == 1 and int(opt.state[model[0].weight]["step"]) == 4


def test_projected_weights_lose_their_gradient_and_others_keep_theirs():
    model = mlp()
    loss_of(model).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    ft.apply(model, include="2")
    assert model[2].weight.grad is None
    for n, p in model.named_parameters():
        if n != "2.weight":
            assert torch.equal(p.grad, grads[n]), n


def test_dry_run_keeps_gradients():
    model = mlp()
    loss_of(model).backward()
    ft.apply(model, dry_run=True)
    assert all(p.grad is not None for p in model.parameters())


def test_tied_by_memory_parameters_both_lose_their_optimizer_state():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 4).double(), nn.Linear(4, 4).double()
    b.weight = nn.Parameter(a.weight.detach())  # another Parameter over the same memory
    model = nn.Sequential(a, b)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4, dtype=torch.float64)).sum().backward()
    opt.step()
    ft.apply(model, optimizer=opt)
    assert a.weight not in opt.state and b.weight not in opt.state and a.weight.grad is None and b.weight.grad is None
