"""Data-parallel training on the CPU with gloo: two real torchrun launches of two processes each.

1. ``torchrun`` runs distributed_ranks.py: each rank's half of a pgcd-dapd step gives, through DDP and the
   cross-rank sums, the gradient, thresholds, background prototype and global prototypes of one process
   on the whole batch; the ranks agree; ranks holding different replicas are refused.
2. ``cimis learn --nproc 2`` with rank 1 killed after iteration 2's checkpoint: one error line, the
   checkpoint kept; ``--resume`` in one process finishes the step, and the model matches a one-process run
   with the same global batch.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import cimis
from cimis.cli import main
from cimis.data.manifest import Manifest
from cimis.data.phantom import write_phantom_dataset
from cimis.data.preprocess import PreprocessConfig
from cimis.incremental.prototypes import global_prototypes
from cimis.model.modelfile import ModelCard, load_card, load_model, load_prototypes, save_model
from cimis.model.network import NetworkConfig, SegmentationNet
from cimis.train import TrainConfig, Trainer

HERE = Path(__file__).parent
TINY_NET = NetworkConfig(filters=[4, 8, 16], kernel_sizes=[3, 3, 3], strides=[1, 2, 2])
# Every phantom fits in one patch after the body crop: each patch is a whole volume, the same whatever
# the random state, so one process and two ranks see the same data.
PREPROCESS = PreprocessConfig(spacing=[12.0, 12.0, 12.0], patch_size=[48, 40, 32])
BASE = ["spleen", "liver", "aorta", "left kidney"]
NEW = "right kidney,stomach"


def _env(**extra) -> dict:
    path = str(Path(cimis.__file__).parents[1])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([path, os.environ.get("PYTHONPATH", "")]), **extra}


# ------------------------------------------------------------------------------- 1. the reductions
def _ranks_module():
    """distributed_ranks.py, by path (the tests are imported with --import-mode=importlib)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("distributed_ranks", HERE / "distributed_ranks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_ranks_reduce_to_the_one_process_step(tmp_path):
    ranks_module = _ranks_module()
    fixed_batch, single_step = ranks_module.fixed_batch, ranks_module.single_step

    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(HERE / "distributed_ranks.py"), str(tmp_path)],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    whole = single_step(fixed_batch(), slice(0, 2))
    for result in ranks:
        assert result["world_size"] == 2 and result["disagreement_refused"]
        # The thresholds come from both ranks' histograms: exactly the one-process ones.
        assert torch.equal(result["thresholds"], whole["thresholds"])
        # Loss and gradient of the global batch (float32 sums in another order: 1e-5 relative).
        assert result["loss"].item() == pytest.approx(whole["loss"].item(), rel=1e-5)
        torch.testing.assert_close(result["gradient"], whole["gradient"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(result["background"], whole["background"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result["prototypes"], whole["prototypes"], rtol=1e-5, atol=1e-6)
    # Identical across ranks, bit for bit.
    for key in ("thresholds", "loss", "gradient", "background", "prototypes"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    # The ranks really held different halves: each one's own gradient would differ.
    alone = single_step(fixed_batch(), slice(1, 2))
    assert not torch.allclose(alone["gradient"], whole["gradient"], rtol=1e-2)


# ----------------------------------------------------------------------- 2. cimis learn --nproc 2
@pytest.fixture(scope="module")
def step(tmp_path_factory):
    """A phantom dataset (2 training cases, nothing to validate on) and an untrained tiny base model with its
    prototypes."""
    root = tmp_path_factory.mktemp("ddp")
    manifest_path = write_phantom_dataset(root / "ds", num_cases=2, spacing=(8.0, 8.0, 8.0), seed=11, val_cases=0,
                                          test_cases=0, progress=False)
    manifest = Manifest.load(manifest_path)
    classes = manifest.classes.subset(BASE)
    config = TrainConfig(iterations=3, batch_size=2, samples_per_volume=1, augment=False, device="cpu",
                         learning_rate=1e-3)
    torch.manual_seed(0)
    net = SegmentationNet(TINY_NET, classes.num_channels)
    volumes = Trainer(net, classes, PREPROCESS, config, root / "unused").model_space_volumes(
        manifest.cases_in("train"), manifest.classes)
    prototypes = global_prototypes(net, volumes, PREPROCESS.patch_size, torch.device("cpu"), amp=False)
    card = ModelCard(classes=classes, network=TINY_NET, preprocessing=PREPROCESS,
                     history=[{"step": 0, "kind": "train", "config": asdict(config)}])
    base = save_model(root / "base", net, card, prototypes=prototypes)
    return root, manifest_path, base


def _learn_args(manifest: Path, base: Path, out: Path) -> list[str]:
    return ["learn", "--model", str(base), "--manifest", str(manifest), "--out", str(out), "--new-classes", NEW,
            "--iterations", "3", "--checkpoint-every", "1", "--device", "cpu"]


def test_a_dead_rank_stops_the_run_and_resume_gives_the_one_process_model(step, tmp_path, capsys, monkeypatch):
    root, manifest, base = step
    run = tmp_path / "run"
    for key, value in _env(CIMIS_DISTRIBUTED_STOP_AT="1:2").items():
        monkeypatch.setenv(key, value)
    # The launcher runs here (the ranks are its subprocesses, their output goes to the test's file
    # descriptors); a one-core CI machine still gets two ranks.
    monkeypatch.setattr("cimis.launch.check_nproc", lambda nproc, device: None)
    code = main([*_learn_args(manifest, base, run), "--nproc", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == ("error: training process 1 of 2 was killed by SIGKILL; the others were stopped "
                   "(run the same command with --resume to continue from its last checkpoint)\n")
    monkeypatch.delenv("CIMIS_DISTRIBUTED_STOP_AT")
    assert not (run / "model").exists()
    state = (run / "checkpoint" / "state.json").read_text()
    assert '"iteration": 2' in state

    # The checkpoint of two ranks resumes in one process (same global batch: 2).
    assert main([*_learn_args(manifest, base, run), "--resume"]) == 0
    assert main(_learn_args(manifest, base, tmp_path / "one")) == 0  # the one-process reference
    capsys.readouterr()
    ours, reference = run / "model", tmp_path / "one" / "model"
    # The pseudo-label thresholds of two ranks' summed histograms are the one-process ones, exactly.
    assert load_card(ours).history[-1]["pseudo_label_thresholds"] == \
        load_card(reference).history[-1]["pseudo_label_thresholds"]
    (a, _), (b, _) = load_model(ours), load_model(reference)
    difference = torch.cat([(p - q).abs().reshape(-1) for p, q in zip(a.state_dict().values(), b.state_dict().values())])
    # AdamW's first steps move a weight by about the learning rate whatever its gradient's size, so float
    # rounding flips a few weights whose gradient is near zero (3 steps at <= 1.5e-4: at most 6e-4); the
    # rest agree to float precision.
    assert float((difference > 1e-5).float().mean()) < 0.1
    assert float(difference.max()) < 6e-4
    (pa, va), (pb, vb) = load_prototypes(ours), load_prototypes(reference)
    assert torch.equal(va, vb)
    torch.testing.assert_close(pa, pb, rtol=0, atol=1e-3)


# ------------------------------------------------------------------------------------- bad input
def test_more_processes_than_cores_or_gpus_is_one_line(step, capsys):
    root, manifest, base = step
    assert main([*_learn_args(manifest, base, root / "x"), "--nproc", "999"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --nproc 999 asks for more processes than the ") and err.count("\n") == 1
    assert not (root / "x").exists()


def test_a_port_in_use_is_one_line(step, capsys, monkeypatch):
    root, manifest, base = step
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setenv("MASTER_PORT", str(taken.getsockname()[1]))
        monkeypatch.setattr("cimis.launch.check_nproc", lambda nproc, device: None)  # a 1-core CI machine
        assert main([*_learn_args(manifest, base, root / "x"), "--nproc", "2"]) == 2
    err = capsys.readouterr().err
    assert "is in use by another program" in err and err.startswith("error: port ") and err.count("\n") == 1


def test_nproc_that_contradicts_torchrun_is_one_line(step, capsys, monkeypatch):
    root, manifest, base = step
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert main([*_learn_args(manifest, base, root / "x"), "--nproc", "3"]) == 2
    err = capsys.readouterr().err
    assert "--nproc 3 differs from torchrun's 2 processes" in err and err.count("\n") == 1


def test_dice_ce_is_monai_dice_plus_cross_entropy():
    """The written-out Dice (its sums reduced across ranks) is MONAI's DiceLoss in one process."""
    import torch.nn.functional as F
    from monai.losses import DiceLoss

    from cimis.seg_loss import DiceCELoss

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 6, 5, 4, generator=g)
    targets = torch.randint(-1, 4, (2, 6, 5, 4), generator=g)
    monai = DiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True, ignore_index=-1)
    expected = monai(logits, targets[:, None]) + F.cross_entropy(logits, targets, ignore_index=-1)
    assert DiceCELoss()(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)
    # Every voxel ignored: zero, and still differentiable.
    empty = torch.full_like(targets, -1)
    logits.requires_grad_(True)
    loss = DiceCELoss()(logits, empty)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
