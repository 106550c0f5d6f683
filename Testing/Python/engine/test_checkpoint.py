"""Checkpoints hold optimizer state without pickle and restore it exactly."""

import shutil

import pytest
import torch

from cimis.checkpoint import flatten, load_checkpoint, save_checkpoint, unflatten
from cimis.errors import CimisError, user_error_in


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


def _net_and_optimizer(seed: int):
    torch.manual_seed(seed)
    net = torch.nn.Linear(3, 2)
    return net, torch.optim.AdamW(net.parameters(), lr=0.01)


def _leftover_states(tmp_path):
    """Every state a kill during a save's rotation can leave (``ck`` current, ``ck.old`` the previous)."""
    net, opt = _net_and_optimizer(0)
    save_checkpoint(tmp_path / "ck", net, opt, {"iteration": 1})
    complete = tmp_path / "complete"
    shutil.copytree(tmp_path / "ck", complete)
    shutil.rmtree(tmp_path / "ck")
    states = {}
    for name, (current, old) in {
        "killed while ck.old was removed": ("complete", "partial"),
        "killed between the two renames": (None, "complete"),
        "ck.old fully there, ck whole": ("complete", "complete"),
        "ck.old only a name": ("complete", "empty"),
    }.items():
        root = tmp_path / name.replace(" ", "_").replace(".", "")
        root.mkdir()
        for target, kind in ((root / "ck", current), (root / "ck.old", old)):
            if kind in ("complete", "partial"):
                shutil.copytree(complete, target)
            if kind == "partial":  # rmtree had removed some files when the kill came
                (target / "model.safetensors").unlink()
                (target / "state.json").unlink()
            if kind == "empty":
                target.mkdir()
        states[name] = root
    return states


def test_resume_and_the_next_save_work_from_every_leftover_state_of_a_rotation(tmp_path):
    """Issue 14, item 10: a kill while ``checkpoint.old`` was being removed left a half-removed folder that
    made every later save fail with an OSError (Directory not empty)."""
    for name, root in _leftover_states(tmp_path).items():
        net, opt = _net_and_optimizer(1)
        assert load_checkpoint(root / "ck", net, opt)["iteration"] == 1, name
        save_checkpoint(root / "ck", net, opt, {"iteration": 2})
        assert sorted(p.name for p in root.iterdir()) == ["ck"], name
        assert load_checkpoint(root / "ck", *_net_and_optimizer(2))["iteration"] == 2, name


def test_an_unreadable_checkpoint_falls_back_to_the_old_one_and_its_hint_names_a_working_command(tmp_path):
    net, opt = _net_and_optimizer(0)
    save_checkpoint(tmp_path / "ck", net, opt, {"iteration": 1})
    shutil.copytree(tmp_path / "ck", tmp_path / "ck.old")
    (tmp_path / "ck" / "optimizer.safetensors").write_bytes(b"garbage")
    assert load_checkpoint(tmp_path / "ck", *_net_and_optimizer(1))["iteration"] == 1
    shutil.rmtree(tmp_path / "ck.old")
    with pytest.raises(CimisError) as caught:
        load_checkpoint(tmp_path / "ck", *_net_and_optimizer(1))
    # `train` without --resume refuses a folder with an unfinished run; --overwrite is what starts afresh.
    assert "--overwrite" in caught.value.hint


def test_a_run_folder_that_is_a_file_is_one_user_error_not_a_traceback(tmp_path):
    run = tmp_path / "notes.txt"
    run.write_text("a user's notes\n")
    net = torch.nn.Linear(3, 2)
    with pytest.raises(CimisError, match="cannot write the checkpoint"):
        save_checkpoint(run / "checkpoint", net, torch.optim.AdamW(net.parameters()), {"iteration": 1})
    assert run.read_text() == "a user's notes\n"


@pytest.mark.parametrize("clash", ["folder under a file", "file over a folder"])
def test_a_path_clash_from_a_library_reads_as_one_user_error(tmp_path, clash):
    (tmp_path / "notes.txt").write_text("a user's notes\n")
    (tmp_path / "folder").mkdir()
    try:
        if clash == "folder under a file":
            (tmp_path / "notes.txt" / "checkpoint").mkdir()
        else:
            open(tmp_path / "folder", "w").close()
    except OSError as exc:
        error = user_error_in(exc)
    assert error is not None and str(tmp_path) in error.one_line() and "\n" not in error.one_line()
