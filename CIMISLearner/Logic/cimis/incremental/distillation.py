"""Output distillation shared by the strategies: plain KD (LwF), MiB's unbiased KD and unbiased
cross-entropy (Cermelli et al., CVPR 2020).

Normalisation of the KD terms follows MiB's own code (github.com/fcdl94/MiB, commit 1c589833,
``utils/loss.py``): ``KnowledgeDistillationLoss`` takes ``(log_softmax(student) * softmax(teacher)).mean(dim=1)``
and ``UnbiasedKnowledgeDistillationLoss`` divides its sum by ``targets.shape[1]``; both are means over the
old model's channels (background included), then over voxels. MiB's presets (KD weight 100 for LwF, 10
for MiB) are weights of *that* mean, so :func:`plain_kd` and :func:`unbiased_kd` divide the per-voxel
divergence by ``|O_t|`` too. We keep the KL divergence (MiB's cross-entropy minus the teacher's entropy,
which has no gradient) so the term is 0 when the student equals the teacher. PGCD's output term ``L_o`` is
METHOD.md's plain KL (:func:`kl_per_voxel`), not divided.

Shapes: student logits ``(B, n_old + n_new, ...)``, teacher logits ``(B, n_old, ...)``; channel 0 is
background, ``1 .. n_old - 1`` the old organs, ``n_old ..`` the new classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unbiased_old_log_probs(student_logits: torch.Tensor, n_old: int) -> torch.Tensor:
    """``log q`` over the old classes: ``q_0 = p_0 + sum of the new classes' p``, ``q_c = p_c`` for old
    organs. The old model's background contains what are now new classes, so they are merged back."""
    log_p = torch.log_softmax(student_logits, dim=1)
    background = torch.logsumexp(torch.cat([log_p[:, :1], log_p[:, n_old:]], dim=1), dim=1, keepdim=True)
    return torch.cat([background, log_p[:, 1:n_old]], dim=1)


def kl_per_voxel(teacher_logits: torch.Tensor, student_log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p' || q)`` per voxel ``(B, ...)``, temperature 1."""
    log_p_old = torch.log_softmax(teacher_logits, dim=1)
    return (log_p_old.exp() * (log_p_old - student_log_q)).sum(1)


def unbiased_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """MiB's unbiased knowledge distillation: the KL divergence divided by ``|O_t|`` (MiB's mean over the old
    classes), averaged over voxels (optionally weighted). Computed in float32."""
    n_old = teacher_logits.shape[1]
    per_voxel = kl_per_voxel(teacher_logits.float(), unbiased_old_log_probs(student_logits.float(), n_old)) / n_old
    return per_voxel.mean() if weights is None else (weights * per_voxel).mean()


def plain_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """LwF's distillation: the student's softmax restricted to the old channels against the teacher's, the
    KL divergence divided by ``|O_t|`` as in MiB's ``KnowledgeDistillationLoss``. Computed in float32."""
    n_old = teacher_logits.shape[1]
    student_log_q = torch.log_softmax(student_logits[:, :n_old].float(), dim=1)
    return (kl_per_voxel(teacher_logits.float(), student_log_q) / n_old).mean()


def unbiased_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor, n_old: int) -> torch.Tensor:
    """MiB's unbiased CE: a voxel labelled background may be background *or any old class*, so its target
    probability is ``sum_{c in O_t} p_c``; new-class voxels use their own probability.

    labels: ``(B, ...)`` channel indices, 0 or ``>= n_old``.
    """
    log_p = torch.log_softmax(student_logits, dim=1)
    merged = torch.cat([torch.logsumexp(log_p[:, :n_old], dim=1, keepdim=True), log_p[:, n_old:]], dim=1)
    merged_labels = torch.where(labels >= n_old, labels - n_old + 1, torch.zeros_like(labels)).long()
    return F.nll_loss(merged, merged_labels)
