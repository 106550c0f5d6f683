"""Local POD (PLOP, Douillard et al., CVPR 2021), extended to 3D volumes.

Each feature map is squared, split into ``s x s x s`` regions for every scale ``s``, and each region is
mean-pooled along two of its three axes in turn (giving one profile per axis: the 3D analogue of PLOP's
width and height pooling). The profiles are L2-normalised and concatenated; the loss is the Frobenius
distance between the student's and the teacher's embeddings, averaged over the batch.

When every spatial size is divisible by every scale (the usual case: patch sizes are multiples of the
network's stride), all regions of a scale are pooled at once by a reshape into ``s`` blocks per axis;
otherwise :func:`local_pod_embedding_loop` cuts the uneven regions one by one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AXES = (2, 3, 4)


def local_pod_embedding_loop(x: torch.Tensor, scales=(1, 2, 4)) -> torch.Tensor:
    """``(B, C, X, Y, Z)`` -> ``(B, E)`` multi-scale pooled profiles of the squared map, region by region."""
    x = x.float().pow(2)
    profiles = []
    for s in scales:
        for xs in torch.tensor_split(x, s, dim=2):
            for ys in torch.tensor_split(xs, s, dim=3):
                for region in torch.tensor_split(ys, s, dim=4):
                    for keep in AXES:
                        pooled_axes = tuple(a for a in AXES if a != keep)
                        profiles.append(F.normalize(region.mean(dim=pooled_axes).flatten(1), dim=1))
    return torch.cat(profiles, dim=1)


def local_pod_embedding(x: torch.Tensor, scales=(1, 2, 4)) -> torch.Tensor:
    """The same profiles as :func:`local_pod_embedding_loop` (in another order, which the Frobenius distance
    does not see), every region of a scale at once."""
    if any(size % s for size in x.shape[2:] for s in scales):
        return local_pod_embedding_loop(x, scales)
    x = x.float().pow(2)
    b, c, sx, sy, sz = x.shape
    profiles = []
    for s in scales:
        # (B, C, s, X/s, s, Y/s, s, Z/s): dims 2, 4, 6 index the region, 3, 5, 7 the voxel inside it.
        blocks = x.reshape(b, c, s, sx // s, s, sy // s, s, sz // s)
        for inner, others in ((3, (5, 7)), (5, (3, 7)), (7, (3, 5))):
            pooled = blocks.mean(dim=others, keepdim=True)  # the profile along the kept axis, per region
            # One row per region: (B, s, s, s, C * length of the kept axis in a region).
            rows = pooled.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, s ** 3, -1)
            profiles.append(F.normalize(rows, dim=2).reshape(b, -1))
    return torch.cat(profiles, dim=1)


def local_pod_loss(student: torch.Tensor, teacher: torch.Tensor, scales=(1, 2, 4)) -> torch.Tensor:
    """Frobenius distance between Local POD embeddings of ``student`` and ``teacher`` maps of equal shape."""
    difference = local_pod_embedding(student, scales) - local_pod_embedding(teacher.detach(), scales)
    return difference.norm(dim=1).mean()
