"""Local POD (PLOP, Douillard et al., CVPR 2021), extended to 3D volumes.

Each feature map is squared, split into ``s x s x s`` regions for every scale ``s``, and each region is
mean-pooled along two of its three axes in turn (giving one profile per axis: the 3D analogue of PLOP's
width and height pooling). The profiles are L2-normalised and concatenated; the loss is the Frobenius
distance between the student's and the teacher's embeddings, averaged over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def local_pod_embedding(x: torch.Tensor, scales=(1, 2, 4)) -> torch.Tensor:
    """``(B, C, X, Y, Z)`` -> ``(B, E)`` multi-scale pooled profiles of the squared map."""
    x = x.float().pow(2)
    profiles = []
    for s in scales:
        for xs in torch.tensor_split(x, s, dim=2):
            for ys in torch.tensor_split(xs, s, dim=3):
                for region in torch.tensor_split(ys, s, dim=4):
                    for keep in (2, 3, 4):
                        pooled_axes = tuple(a for a in (2, 3, 4) if a != keep)
                        profiles.append(F.normalize(region.mean(dim=pooled_axes).flatten(1), dim=1))
    return torch.cat(profiles, dim=1)


def local_pod_loss(student: torch.Tensor, teacher: torch.Tensor, scales=(1, 2, 4)) -> torch.Tensor:
    """Frobenius distance between Local POD embeddings of ``student`` and ``teacher`` maps of equal shape."""
    difference = local_pod_embedding(student, scales) - local_pod_embedding(teacher.detach(), scales)
    return difference.norm(dim=1).mean()
