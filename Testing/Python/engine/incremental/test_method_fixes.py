"""The review's method fixes (issue 16): KD normalised as MiB's code, per-method settings, prototype
carry-over and the background prototype across a resume, DAPD's class mean, vectorised DAPD and Local POD
against their loop versions, and the distillation computed in float32 under autocast."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from cimis.checkpoint import load_checkpoint, save_checkpoint
from cimis.errors import CimisError
from cimis.incremental.base import StepOptions
from cimis.incremental.dapd import DAPDLoss
from cimis.incremental.distillation import plain_kd, unbiased_kd
from cimis.incremental.method_settings import load_method_settings, parse_option_overrides, resolve_options
from cimis.incremental.pgcd import PGCDLoss
from cimis.incremental.pod import local_pod_embedding, local_pod_embedding_loop, local_pod_loss
from cimis.incremental.prototypes import carry_over_prototypes, masked_average
from cimis.incremental.strategies import STRATEGIES
from cimis.model.network import NetworkConfig, SegmentationNet
from cimis.train import TrainConfig

N_OLD, N_NEW, D = 3, 2, 4
CONFIG = NetworkConfig(filters=[D, 8, 8], kernel_sizes=[3, 3, 3], strides=[1, 2, 2])


# ------------------------------------------------------------------------------ KD as MiB's code has it
def test_kd_terms_are_means_over_the_old_classes_as_in_mibs_code():
    # Three old channels (background, two organs), one new. By hand, per voxel:
    p_old = torch.tensor([0.5, 0.3, 0.2])
    p_new = torch.tensor([0.4, 0.2, 0.1, 0.3])  # background, organ 1, organ 2, new class
    teacher = torch.log(p_old).view(1, 3, 1, 1, 1)
    student = torch.log(p_new).view(1, 4, 1, 1, 1)
    # MiB's UnbiasedKnowledgeDistillationLoss: -(p'_0 log(q_0) + sum_c p'_c log q_c) / |O_t|, with
    # q_0 = p_0 + p_new = 0.7; ours is the KL, i.e. that minus the teacher's entropy over |O_t|.
    q = [0.7, 0.2, 0.1]
    mib_cross_entropy = -sum(p * math.log(qc) for p, qc in zip(p_old.tolist(), q)) / 3
    teacher_entropy = -sum(p * math.log(p) for p in p_old.tolist()) / 3
    assert unbiased_kd(student, teacher).item() == pytest.approx(mib_cross_entropy - teacher_entropy, rel=1e-5)
    # MiB's KnowledgeDistillationLoss: the student's softmax over the old channels only, mean over them.
    restricted = [0.4 / 0.7, 0.2 / 0.7, 0.1 / 0.7]
    expected = sum(p * math.log(p / r) for p, r in zip(p_old.tolist(), restricted)) / 3
    assert plain_kd(student, teacher).item() == pytest.approx(expected, rel=1e-5)


# -------------------------------------------------------------------------------- per-method settings
def test_the_versioned_settings_file_gives_every_method_its_values_with_sources():
    settings = load_method_settings()
    for strategy in STRATEGIES:
        assert strategy in settings.values, strategy
        assert all(settings.sources[strategy][k].strip() for k in settings.values[strategy])
    resolved = resolve_options("lwf", StepOptions(), settings)
    assert (resolved.kd_weight, resolved.head_init) == (100.0, "random")
    assert resolve_options("mib", StepOptions(), settings).head_init == "balanced"
    # An explicit option wins over the file.
    assert resolve_options("mib", StepOptions(kd_weight=1.25, head_init="random"), settings).kd_weight == 1.25


def _settings_file(tmp_path, methods: dict) -> str:
    body = {"format": "cimis-method-settings/1",
            "methods": {m: {k: {"value": v, "source": "test"} for k, v in keys.items()} for m, keys in methods.items()}}
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(body))
    return str(path)


@pytest.mark.parametrize("methods, message", [
    ({"nope": {}}, "unknown method"),
    ({"lwf": {"kd_wieght": 1.0}}, "unknown setting"),
    ({"lwf": {"kd_weight": -1.0}}, "at least 0"),
    ({"lwf": {"head_init": "zeros"}}, "balanced or random"),
])
def test_bad_settings_files_are_refused(tmp_path, methods, message):
    with pytest.raises(CimisError, match=message):
        load_method_settings(_settings_file(tmp_path, methods))


def test_a_value_without_its_source_is_refused(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"format": "cimis-method-settings/1", "methods": {"lwf": {"kd_weight": {"value": 1}}}}))
    with pytest.raises(CimisError, match="source"):
        load_method_settings(path)


def test_option_overrides_parse_and_refuse_unknown_keys():
    assert parse_option_overrides(["kd_weight=1.25", "head-init=random", "pseudo_labels=false"]) == {
        "kd_weight": 1.25, "head_init": "random", "pseudo_labels": False}
    with pytest.raises(CimisError, match="bad step option"):
        parse_option_overrides(["kd=1"])


def _trainer(strategy, tmp_path, options=None, settings=None, prototypes=None):
    torch.manual_seed(0)
    teacher = SegmentationNet(CONFIG, N_OLD).eval()
    student = copy.deepcopy(teacher)
    student.head.grow(N_NEW, init="random")
    return STRATEGIES[strategy](
        student, old_net=teacher, n_old=N_OLD, options=options or StepOptions(), prototypes=prototypes,
        method_settings=settings, classes=None, preprocess=None, config=TrainConfig(device="cpu"), run_dir=tmp_path)


def _step_inputs(trainer, seed=1):
    torch.manual_seed(seed)
    image = torch.randn(2, 1, 8, 8, 8)
    labels = torch.zeros(2, 8, 8, 8, dtype=torch.long)
    labels[:, :2] = N_OLD
    with torch.no_grad():
        for p in trainer.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    logits, features = trainer.net.forward_with_features(image)
    old_logits, old_features = trainer.teacher(image)
    return labels, logits, features, old_logits, old_features


@pytest.mark.parametrize("strategy, key, part", [("lwf", "kd_weight", "kd"), ("mib", "kd_weight", "kd"),
                                                 ("ilt", "feature_kd_weight", "feature_kd"),
                                                 ("plop", "pod_features", "pod_f")])
def test_a_methods_settings_reach_its_loss(tmp_path, strategy, key, part):
    default = _trainer(strategy, tmp_path)
    inputs = _step_inputs(default)
    loss_default, parts = default.step_loss(*inputs)
    base = load_method_settings().of(strategy)
    changed = {**base, key: base[key] + 3.0}
    custom = _trainer(strategy, tmp_path, settings=load_method_settings(_settings_file(tmp_path, {strategy: changed})))
    loss_custom, _ = custom.step_loss(*inputs)
    factor = math.sqrt((N_OLD + N_NEW) / N_NEW) if strategy == "plop" else 1.0  # PLOP: sqrt(|O u C| / |C|)
    assert loss_custom.item() - loss_default.item() == pytest.approx(3.0 * factor * parts[part], rel=1e-4)
    assert parts[part] > 0


def test_pseudo_labels_strategy_is_the_segmentation_loss_on_pseudo_labels_only(tmp_path):
    trainer = _trainer("pseudo-labels", tmp_path)
    labels, logits, features, old_logits, old_features = _step_inputs(trainer)
    loss, parts = trainer.step_loss(labels, logits, features, old_logits, old_features)
    assert set(parts) == {"seg"}
    targets = trainer.targets(labels, old_logits)
    assert bool((targets[labels == 0] != 0).any())  # some old organs pseudo-labelled
    assert loss.item() == pytest.approx(trainer.seg_loss(logits, targets).item(), rel=1e-6)


# ----------------------------------------------------------------------- float32 outside autocast
def test_the_step_loss_is_computed_in_float32_inside_an_autocast_region(tmp_path):
    protos = (torch.randn(N_OLD, D), torch.ones(N_OLD, dtype=torch.bool))
    trainer = _trainer("pgcd-dapd", tmp_path, prototypes=protos, options=StepOptions(lambda_f=1.0))
    inputs = _step_inputs(trainer)
    reference, _ = trainer.float32_step_loss(*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast, _ = trainer.float32_step_loss(*inputs)
    assert under_autocast.dtype == torch.float32
    assert under_autocast.item() == pytest.approx(reference.item(), rel=1e-6)


# ------------------------------------------------------------------------------ prototypes across steps
def test_an_old_class_absent_from_the_step_keeps_its_prototype():
    old = (torch.tensor([[1.0, 0.0], [2.0, 2.0], [3.0, 3.0]]), torch.tensor([True, True, True]))
    new = (torch.tensor([[9.0, 9.0], [0.0, 0.0], [4.0, 4.0], [5.0, 5.0]]), torch.tensor([True, False, True, True]))
    protos, valid = carry_over_prototypes(new, old)
    torch.testing.assert_close(protos, torch.tensor([[9.0, 9.0], [2.0, 2.0], [4.0, 4.0], [5.0, 5.0]]))
    assert valid.tolist() == [True, True, True, True]
    # A class that had no prototype before and none now stays without one.
    _, valid = carry_over_prototypes(new, (old[0], torch.tensor([True, False, True])))
    assert valid.tolist() == [True, False, True, True]


def test_voxels_of_a_class_without_prototype_keep_weight_one_in_the_output_term():
    torch.manual_seed(4)
    old_features = torch.randn(1, D, 4, 4, 1)
    old_logits = torch.randn(1, N_OLD, 4, 4, 1)
    old_logits[:, 2, :2] = 10.0  # the old model predicts class 2 on these voxels; class 2 has no prototype
    labels = torch.zeros(1, 4, 4, 1, dtype=torch.long)
    valid = torch.tensor([True, True, False])
    weights = PGCDLoss().voxel_weights(old_features, old_logits, labels, torch.randn(N_OLD, D), valid)
    torch.testing.assert_close(weights[:, :2], torch.ones_like(weights[:, :2]))
    assert weights.mean().item() == pytest.approx(1.0, rel=1e-5)


def test_the_background_prototype_survives_a_checkpoint_round_trip(tmp_path):
    protos = (torch.randn(N_OLD, D), torch.ones(N_OLD, dtype=torch.bool))
    first = _trainer("pgcd-dapd", tmp_path, prototypes=protos)
    for seed in range(3):  # move P_0 away from the stored prototype
        first.bank.update_background(torch.randn(1, D, 4, 4, 4) + seed, torch.zeros(1, 4, 4, 4, dtype=torch.long))
    moved = first.bank.prototypes[0].clone()
    assert not torch.allclose(moved, protos[0][0])
    optimizer = torch.optim.AdamW(first.net.parameters())
    save_checkpoint(tmp_path / "checkpoint", first.net, optimizer, {**first.checkpoint_state(), "iteration": 1})
    resumed = _trainer("pgcd-dapd", tmp_path, prototypes=protos)
    state = load_checkpoint(tmp_path / "checkpoint", resumed.net, torch.optim.AdamW(resumed.net.parameters()))
    resumed.restore_checkpoint_state(state)
    assert torch.equal(resumed.bank.prototypes[0], moved)
    torch.testing.assert_close(resumed.bank.prototypes[1:], protos[0][1:])


# ---------------------------------------------------------------------------- DAPD: class mean, loop
def dapd_loop(features, old_features, targets, prototypes, valid, lambda_p=1.0):
    """DAPD written out class by class (the previous implementation, with the corrected mean)."""
    g_terms, l_terms = [], []
    for c in range(prototypes.shape[0]):
        mask = targets == c
        if not bool(mask.any()):
            continue
        local = masked_average(features, mask)
        if bool(valid[c]):
            g_terms.append(1 - F.cosine_similarity(local, prototypes[c], dim=0))
        l_terms.append(1 - F.cosine_similarity(local, masked_average(old_features, mask), dim=0))
    total = (torch.stack(g_terms).mean() if g_terms else 0.0) + (torch.stack(l_terms).mean() if l_terms else 0.0)
    return lambda_p * total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_dapd_equals_the_loop_version(seed):
    torch.manual_seed(seed)
    n_old = 5
    features = torch.randn(2, 6, 6, 5, 4, requires_grad=True)
    old_features = torch.randn(2, 6, 6, 5, 4)
    targets = torch.randint(-1, n_old + 2, (2, 6, 5, 4))  # ignored, old and new classes
    targets[targets == 3] = 0  # class 3 absent from the batch
    prototypes, valid = torch.randn(n_old, 6), torch.tensor([True, True, False, True, True])
    loss, parts = DAPDLoss(lambda_p=0.5)(features, old_features, targets, prototypes, valid)
    expected = dapd_loop(features, old_features, targets, prototypes, valid, lambda_p=0.5)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    grad, = torch.autograd.grad(loss, features)
    expected_grad, = torch.autograd.grad(expected, features)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-7)


def test_dapds_global_mean_counts_only_classes_with_a_prototype():
    features = torch.zeros(1, 2, 2, 1, 1)
    features[0, :, 0, 0, 0] = torch.tensor([1.0, 0.0])  # class 0's voxel
    features[0, :, 1, 0, 0] = torch.tensor([0.0, 1.0])  # class 1's voxel
    targets = torch.tensor([0, 1]).view(1, 2, 1, 1)
    prototypes = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # class 0 orthogonal (L_g = 1); class 1 has none
    loss, parts = DAPDLoss(lambda_p=1.0, local_term=False)(features, features, targets, prototypes,
                                                           torch.tensor([True, False]))
    assert parts["dapd_g"] == pytest.approx(1.0)  # not (1 + 0) / 2
    assert loss.item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------------- Local POD
@pytest.mark.parametrize("shape", [(2, 3, 8, 8, 4), (1, 2, 12, 8, 16)])
def test_vectorised_local_pod_equals_the_loop_version(shape):
    torch.manual_seed(5)
    student, teacher = torch.randn(shape), torch.randn(shape)
    fast, loop = local_pod_embedding(student), local_pod_embedding_loop(student)
    assert fast.shape == loop.shape
    # The same profiles in another order: equal sorted values and equal Frobenius distances.
    torch.testing.assert_close(fast.sort(dim=1).values, loop.sort(dim=1).values)
    reference = (local_pod_embedding_loop(student) - local_pod_embedding_loop(teacher)).norm(dim=1).mean()
    torch.testing.assert_close(local_pod_loss(student, teacher), reference)


def test_local_pod_with_uneven_regions_uses_the_loop():
    x = torch.randn(1, 2, 6, 5, 4)
    torch.testing.assert_close(local_pod_embedding(x), local_pod_embedding_loop(x))
