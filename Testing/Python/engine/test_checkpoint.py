"""Checkpoints hold optimizer state without pickle and restore it exactly."""

import torch

from cimis.checkpoint import flatten, load_checkpoint, save_checkpoint, unflatten


def test_flatten_round_trip_keeps_key_types_and_tensors():
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1, "params": [0], "betas": (0.9, 0.99)}]}
    tensors = {}
    skeleton = flatten(state, tensors)
    back = unflatten(skeleton, tensors)
    assert list(back["state"]) == [0]
    assert back["param_groups"][0]["betas"] == (0.9, 0.99)
    torch.testing.assert_close(back["state"][0]["exp_avg"], torch.ones(2))


def test_save_and_load_restore_weights_and_optimizer(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "ck", net, opt, {"iteration": 7, "history": [1]})

    net2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(net2.parameters(), lr=0.5)
    state = load_checkpoint(tmp_path / "ck", net2, opt2)
    assert state["iteration"] == 7 and state["history"] == [1]
    torch.testing.assert_close(net2.weight, net.weight)
    assert opt2.param_groups[0]["lr"] == 0.01
    torch.testing.assert_close(opt2.state[opt2.param_groups[0]["params"][0]]["exp_avg"],
                               opt.state[opt.param_groups[0]["params"][0]]["exp_avg"])
    # A second save replaces the first atomically and leaves no staging folders behind.
    save_checkpoint(tmp_path / "ck", net, opt, {"iteration": 8, "history": []})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
