"""anebackward.torch.AdamW against torch.optim.AdamW: same trajectory, same
state_dict (checkpoints move both ways), clear errors."""
import copy

import pytest


@pytest.fixture
def at(torch):
    import anebackward.torch as at
    return at


def _params(torch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in ((7, 5), (13,), (3, 4, 6))]


def _groups(ps):
    return [{"params": [ps[0], ps[2]], "weight_decay": 0.1}, {"params": [ps[1]], "weight_decay": 0.0}]


def _run(torch, opt, ps, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g) * 0.1
        opt.step()


def test_matches_torch_adamw(torch, at):
    ours, theirs = _params(torch), _params(torch)
    ptrs = [p.data_ptr() for p in ours]
    o1 = at.AdamW(_groups(ours), lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    o2 = torch.optim.AdamW(_groups(theirs), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    _run(torch, o1, ours, 6, 1)
    _run(torch, o2, theirs, 6, 1)
    for p, q in zip(ours, theirs):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), (p - q).abs().max()
    assert [p.data_ptr() for p in ours] == ptrs  # updated in place
    s1, s2 = o1.state_dict(), o2.state_dict()
    assert s1["param_groups"][0].keys() >= {"lr", "betas", "eps", "weight_decay", "params"}
    for i in s2["state"]:
        assert s1["state"][i].keys() == s2["state"][i].keys()
        assert float(s1["state"][i]["step"]) == float(s2["state"][i]["step"]) == 6.0
        assert torch.allclose(s1["state"][i]["exp_avg_sq"], s2["state"][i]["exp_avg_sq"], rtol=1e-5)


def test_state_dict_moves_between_torch_and_ours(torch, at):
    base = _params(torch)
    o = torch.optim.AdamW(_groups(base), lr=1e-2, foreach=False)
    _run(torch, o, base, 3, 2)

    def resumed(make, params, state, steps, seed):
        """copies of params under make(groups) with `state` loaded, run on"""
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = make(_groups(ps))
        opt.load_state_dict(copy.deepcopy(state))   # state_dict() holds references
        _run(torch, opt, ps, steps, seed)
        return ps, opt

    ours = lambda g: at.AdamW(g, lr=1e-2)                            # noqa: E731
    theirs = lambda g: torch.optim.AdamW(g, lr=1e-2, foreach=False)  # noqa: E731
    # resume a torch.optim.AdamW checkpoint with ours, and the reverse
    a, oa = resumed(ours, base, o.state_dict(), 2, 3)
    b, _ = resumed(theirs, base, o.state_dict(), 2, 3)
    for p, q in zip(a, b):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
    c, _ = resumed(theirs, a, oa.state_dict(), 1, 4)
    _run(torch, oa, a, 1, 4)
    for p, q in zip(a, c):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


def test_errors(torch, at):
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    p.grad = torch.ones(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="torch.optim.AdamW"):
        at.AdamW([p]).step()
    q = torch.nn.Parameter(torch.ones(4, 3).t())
    q.grad = torch.ones(3, 4)
    with pytest.raises(ValueError, match="contiguous"):
        at.AdamW([q]).step()
    with pytest.raises(ValueError, match="betas"):
        at.AdamW([q], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        at.AdamW([q], lr=-1.0)
