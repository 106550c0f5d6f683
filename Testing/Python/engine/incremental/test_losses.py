"""Loss tests: hand-computed cases and the properties of METHOD.md section 7."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from cimis.incremental.dapd import DAPDLoss
from cimis.incremental.distillation import plain_kd, unbiased_cross_entropy, unbiased_kd, unbiased_old_log_probs
from cimis.incremental.pgcd import PGCDLoss, unit_channels
from cimis.incremental.pod import local_pod_loss
from cimis.incremental.prototypes import IGNORE, PrototypeAccumulator, PrototypeBank, class_prototypes, masked_average
from cimis.incremental.pseudo_labels import EntropyThresholds, normalised_entropy, predicted_classes, pseudo_label_targets
from cimis.model.network import NetworkConfig, SegmentationNet

N_OLD, N_NEW, D = 3, 2, 4
CONFIG = NetworkConfig(filters=[D, 8, 8], kernel_sizes=[3, 3, 3], strides=[1, 2, 2])


@pytest.fixture
def teacher_student():
    """M_{t-1} and a student that equals it, grown as in METHOD.md section 2."""
    torch.manual_seed(0)
    teacher = SegmentationNet(CONFIG, N_OLD).eval()
    student = copy.deepcopy(teacher)
    student.head.grow(N_NEW, init="balanced")
    return teacher, student.eval()


@pytest.fixture
def batch():
    torch.manual_seed(1)
    image = torch.randn(2, 1, 8, 8, 8)
    labels = torch.zeros(2, 8, 8, 8, dtype=torch.long)
    labels[:, :2] = N_OLD  # first new class
    labels[:, 2:3, :4] = N_OLD + 1
    return image, labels


def outputs(net, image):
    logits, features = net.forward_with_features(image)
    return logits, features


def prototypes_for(features, n):
    torch.manual_seed(2)
    return torch.randn(n, features.shape[1]), torch.ones(n, dtype=torch.bool)


# ------------------------------------------------------------------------------------------ prototypes
def test_masked_average_by_hand():
    features = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 4, 1, 1).repeat(1, 2, 1, 1, 1)
    features[:, 1] *= 10
    mask = torch.tensor([True, False, True, False]).view(1, 4, 1, 1)
    torch.testing.assert_close(masked_average(features, mask), torch.tensor([2.0, 20.0]))  # (1+3)/2, (10+30)/2


def test_accumulator_equals_pooling_over_the_whole_set():
    torch.manual_seed(3)
    f1, f2 = torch.randn(1, D, 4, 4, 4), torch.randn(1, D, 4, 4, 4)
    t1, t2 = torch.randint(0, 3, (1, 4, 4, 4)), torch.randint(0, 3, (1, 4, 4, 4))
    t2[0, 0] = IGNORE
    acc = PrototypeAccumulator(4, D)
    acc.add(f1, t1)
    acc.add(f2, t2)
    protos, valid = acc.result()
    both_f, both_t = torch.cat([f1, f2]), torch.cat([t1, t2])
    for c in range(3):
        torch.testing.assert_close(protos[c], masked_average(both_f, both_t == c))
    assert valid.tolist() == [True, True, True, False]


def test_dynamic_background_moves_by_one_minus_m():
    bank = PrototypeBank(torch.zeros(3, 2), torch.ones(3, dtype=torch.bool), momentum=0.9)
    features = torch.zeros(1, 2, 2, 1, 1)
    features[0, :, 0] = torch.tensor([1.0, 2.0]).view(2, 1, 1)  # background voxel
    features[0, :, 1] = torch.tensor([5.0, 5.0]).view(2, 1, 1)  # class-1 voxel
    targets = torch.tensor([0, 1]).view(1, 2, 1, 1)
    bank.update_background(features, targets)
    torch.testing.assert_close(bank.prototypes[0], torch.tensor([0.1, 0.2]))  # 0.9*0 + 0.1*[1, 2]
    torch.testing.assert_close(bank.prototypes[1], torch.zeros(2))  # only background is dynamic
    bank.update_background(features, torch.ones_like(targets))  # no background voxel: unchanged
    torch.testing.assert_close(bank.prototypes[0], torch.tensor([0.1, 0.2]))
    frozen = PrototypeBank(torch.zeros(3, 2), torch.ones(3, dtype=torch.bool), dynamic_background=False)
    frozen.update_background(features, targets)
    torch.testing.assert_close(frozen.prototypes[0], torch.zeros(2))


# --------------------------------------------------------------------------------------- pseudo-labels
def test_pseudo_labels_keep_new_labels_and_confident_old_predictions():
    # Voxels: 0 labelled new; 1 old model confident organ 1; 2 unconfident organ 2; 3 predicts background.
    probs = torch.tensor([[0.1, 0.8, 0.1], [0.02, 0.96, 0.02], [0.3, 0.3, 0.4], [0.9, 0.05, 0.05]])
    old_probs = probs.T.reshape(1, 3, 4, 1, 1)
    labels = torch.tensor([N_OLD, 0, 0, 0]).view(1, 4, 1, 1)
    thresholds = torch.tensor([0.5, 0.5, 0.5])
    targets = pseudo_label_targets(labels, old_probs, thresholds, N_OLD).flatten().tolist()
    assert targets == [N_OLD, 1, IGNORE, 0]


def test_entropy_thresholds_are_class_medians_with_a_floor():
    stats = EntropyThresholds(3, floor=0.001)
    # Class 1 predicted on three voxels with entropies that we can compute; class 2 never predicted.
    probs = torch.tensor([[0.1, 0.8, 0.1], [0.2, 0.6, 0.2], [0.0, 1.0, 0.0]]).T.reshape(1, 3, 3, 1, 1)
    stats.add(probs)
    h = normalised_entropy(probs).flatten()
    tau = stats.thresholds()
    assert tau[1].item() == pytest.approx(float(h.median()), abs=1e-3)
    assert tau[2].item() == pytest.approx(0.001)


def test_normalised_entropy_by_hand():
    uniform = torch.full((1, 4, 1, 1, 1), 0.25)
    assert normalised_entropy(uniform).item() == pytest.approx(1.0)
    certain = torch.tensor([1.0, 0, 0, 0]).view(1, 4, 1, 1, 1)
    assert normalised_entropy(certain).item() == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------------ head growth
def test_growth_property_of_section_2(teacher_student, batch):
    teacher, student = teacher_student
    image, _ = batch
    p_old = torch.softmax(teacher(image), 1)
    p_new = torch.softmax(student(image), 1)
    torch.testing.assert_close(p_new[:, 0] + p_new[:, N_OLD:].sum(1), p_old[:, 0])
    torch.testing.assert_close(p_new[:, 1:N_OLD], p_old[:, 1:])


# ------------------------------------------------------------------------------------------ distillation
def test_unbiased_kd_and_plain_kd_by_hand():
    teacher_logits = torch.log(torch.tensor([0.5, 0.5])).view(1, 2, 1, 1, 1)
    student_logits = torch.log(torch.tensor([0.25, 0.25, 0.5])).view(1, 3, 1, 1, 1)  # bg, old organ, new
    # Unbiased: q = [0.25 + 0.5, 0.25]; KL = 0.5 log(0.5/0.75) + 0.5 log(0.5/0.25), divided by |O_t| = 2
    # (MiB's mean over the old classes).
    expected = (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2.0)) / 2
    assert unbiased_kd(student_logits, teacher_logits).item() == pytest.approx(expected, rel=1e-5)
    # Plain: the student restricted to old channels is [0.5, 0.5] = the teacher: KL 0.
    assert plain_kd(student_logits, teacher_logits).item() == pytest.approx(0.0, abs=1e-6)


def test_unbiased_cross_entropy_by_hand():
    logits = torch.log(torch.tensor([0.2, 0.3, 0.5])).view(1, 3, 1, 1, 1)
    background = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    # n_old = 2: a background voxel may be background or the old organ: -log(0.2 + 0.3)
    assert unbiased_cross_entropy(logits, background, 2).item() == pytest.approx(-math.log(0.5), rel=1e-5)
    new = torch.full((1, 1, 1, 1), 2, dtype=torch.long)
    assert unbiased_cross_entropy(logits, new, 2).item() == pytest.approx(-math.log(0.5), rel=1e-5)


def test_unbiased_log_probs_sum_to_one():
    logits = torch.randn(2, 5, 3, 3, 3)
    torch.testing.assert_close(unbiased_old_log_probs(logits, 3).exp().sum(1), torch.ones(2, 3, 3, 3))


# ------------------------------------------------------------------------------------------------ PGCD
def test_pgcd_is_zero_when_student_equals_teacher(teacher_student, batch):
    teacher, student = teacher_student
    image, labels = batch
    logits, features = outputs(student, image)
    old_logits, old_features = outputs(teacher, image)
    protos, valid = prototypes_for(features, N_OLD)
    loss, parts = PGCDLoss()(features, old_features, logits, old_logits, labels, protos, valid)
    assert parts["pgcd_f"] == pytest.approx(0.0, abs=1e-7)
    assert parts["pgcd_o"] == pytest.approx(0.0, abs=1e-6)


def test_pgcd_without_the_feature_term_is_lambda_o_times_the_output_term(teacher_student, batch):
    teacher, student = teacher_student
    image, labels = batch
    logits, features = outputs(student, image)
    old_logits, old_features = outputs(teacher, image)
    old_features = old_features + 0.5  # a feature distance the full loss would count
    protos, valid = prototypes_for(features, N_OLD)
    full, full_parts = PGCDLoss(lambda_f=1.0, lambda_o=2.0)(features, old_features, logits, old_logits, labels, protos, valid)
    loss, parts = PGCDLoss(lambda_f=0.0, lambda_o=2.0)(features, old_features, logits, old_logits, labels, protos, valid)
    assert "pgcd_f" not in parts and full_parts["pgcd_f"] > 0  # not computed at weight 0
    assert loss.item() == pytest.approx(2.0 * full_parts["pgcd_o"], rel=1e-5)
    assert full.item() == pytest.approx(full_parts["pgcd_f"] + loss.item(), rel=1e-5)


def test_the_fast_channel_helpers_match_torch():
    x = torch.randn(2, 6, 5, 4, 3)
    x[0, :, 0, 0, 0] = 0  # a zero vector stays zero, as with F.normalize
    assert torch.equal(predicted_classes(x), x.argmax(1))
    torch.testing.assert_close(unit_channels(x), F.normalize(x, dim=1))


def test_pgcd_ignores_new_class_voxels(teacher_student, batch):
    teacher, student = teacher_student
    image, labels = batch
    old_logits, old_features = outputs(teacher, image)
    logits, features = outputs(student, image)
    protos, valid = prototypes_for(features, N_OLD)
    loss_fn = PGCDLoss()
    base, _ = loss_fn(features, old_features, logits, old_logits, labels, protos, valid)
    # Perturb the student only where the labels are new classes: nothing changes.
    new = (labels >= N_OLD)[:, None]
    perturbed_features = features + 5.0 * torch.randn_like(features) * new
    perturbed_logits = logits + 5.0 * torch.randn_like(logits) * new
    after, _ = loss_fn(perturbed_features, old_features, perturbed_logits, old_logits, labels, protos, valid)
    assert after.item() == pytest.approx(base.item(), abs=1e-6)
    # ...while a perturbation on old-knowledge voxels does change it.
    changed, _ = loss_fn(features + 5.0 * torch.randn_like(features) * ~new, old_features, logits, old_logits,
                         labels, protos, valid)
    assert changed.item() > base.item() + 1e-3


def test_pgcd_down_weights_voxels_far_from_their_prototype():
    # Two voxels, both predicted class 1 by the old model; voxel 0 matches P_1, voxel 1 points elsewhere.
    prototypes = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    old_features = torch.tensor([[1.0, 0.0], [-0.2, 1.0]]).T.reshape(1, 2, 2, 1, 1)
    old_logits = torch.tensor([[0.0, 5.0], [0.0, 5.0]]).T.reshape(1, 2, 2, 1, 1)
    labels = torch.zeros(1, 2, 1, 1, dtype=torch.long)
    w = PGCDLoss().voxel_weights(old_features, old_logits, labels, prototypes, torch.ones(2, dtype=torch.bool))
    assert w[0, 0, 0, 0] > w[0, 1, 0, 0]
    assert w.mean().item() == pytest.approx(1.0)
    off = PGCDLoss(spatial_weight=False).voxel_weights(old_features, old_logits, labels, prototypes, torch.ones(2, dtype=torch.bool))
    assert off.flatten().tolist() == [1.0, 1.0]


def test_channel_weights_have_mean_one_and_follow_the_prototype():
    prototypes = torch.tensor([[0.0, 0.0, 3.0, -3.0]])
    a = PGCDLoss(tau_c=1.0).channel_weights(prototypes)
    assert a.mean().item() == pytest.approx(1.0)
    assert a[0, 2] == a[0, 3] and a[0, 2] > a[0, 0]
    assert torch.equal(PGCDLoss(channel_weight=False).channel_weights(prototypes), torch.ones(1, 4))


def test_pgcd_feature_term_by_hand():
    # One participating voxel, w = 1, a = 1 (switched off): L_f = mean_d (F - F')^2.
    features = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1, 1)
    old_features = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1, 1)
    old_logits = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1, 1)
    logits = torch.tensor([0.0, 1.0, -10.0]).view(1, 3, 1, 1, 1)
    labels = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    loss_fn = PGCDLoss(channel_weight=False, output_term=False)
    loss, parts = loss_fn(features, old_features, logits, old_logits, labels, torch.eye(2), torch.ones(2, dtype=torch.bool))
    assert loss.item() == pytest.approx((1.0 + 4.0) / 2)


# ------------------------------------------------------------------------------------------------ DAPD
def test_dapd_local_is_zero_and_global_is_one_minus_cosine_when_student_equals_teacher(teacher_student, batch):
    teacher, student = teacher_student
    image, labels = batch
    _, features = outputs(student, image)
    _, old_features = outputs(teacher, image)
    targets = labels.clone()
    targets[:, 5:] = 1  # some old-organ targets
    protos, valid = prototypes_for(features, N_OLD)
    loss, parts = DAPDLoss(lambda_p=1.0)(features, old_features, targets, protos, valid)
    assert parts["dapd_l"] == pytest.approx(0.0, abs=1e-6)
    local = class_prototypes(features, targets, range(N_OLD))
    expected_g = sum(1 - F.cosine_similarity(local[c], protos[c], dim=0).item() for c in local) / len(local)
    assert parts["dapd_g"] == pytest.approx(expected_g, rel=1e-5)
    assert parts["dapd_g"] > 0.01
    assert loss.item() == pytest.approx(expected_g, rel=1e-5)


def test_dapd_weight_and_switches(teacher_student, batch):
    teacher, student = teacher_student
    image, labels = batch
    _, features = outputs(student, image)
    _, old_features = outputs(teacher, image)
    protos, valid = prototypes_for(features, N_OLD)
    full, _ = DAPDLoss(lambda_p=1.0)(features, old_features, labels, protos, valid)
    scaled, _ = DAPDLoss(lambda_p=0.1)(features, old_features, labels, protos, valid)
    assert scaled.item() == pytest.approx(0.1 * full.item(), rel=1e-5)
    no_global, _ = DAPDLoss(lambda_p=1.0, global_term=False)(features, old_features, labels, protos, valid)
    assert no_global.item() == pytest.approx(0.0, abs=1e-6)  # local is 0 for equal models


# --------------------------------------------------------------------------------------------- Local POD
def test_local_pod_zero_for_equal_maps_and_positive_otherwise():
    x = torch.randn(2, 3, 8, 8, 8)
    assert local_pod_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert local_pod_loss(x + torch.randn_like(x), x).item() > 0.01


# ------------------------------------------------------------------------------------------- gradients
def test_gradients_reach_the_student_and_not_the_teacher(teacher_student, batch):
    teacher, student = teacher_student
    student.train()
    image, labels = batch
    with torch.no_grad():
        old_logits, old_features = teacher.forward_with_features(image)
    # Move the student off the teacher so every term has a gradient.
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    logits, features = student.forward_with_features(image)
    protos, valid = prototypes_for(features, N_OLD)
    targets = labels.clone()
    targets[:, 5:] = 1
    pgcd, _ = PGCDLoss()(features, old_features, logits, old_logits, labels, protos, valid)
    dapd, _ = DAPDLoss()(features, old_features, targets, protos, valid)
    (pgcd + dapd).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert not old_features.requires_grad and not old_logits.requires_grad
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
