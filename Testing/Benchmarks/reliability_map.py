"""Where PGCD's reliability map is right: does it tell the old model's right voxels from its wrong ones?

PGCD distils the old model voxel by voxel with the weight ``w = r / mean r``, ``r = A_{c'}``: the softmax
over the old classes of ``cos(F', P_c) / tau_s`` taken at the old model's predicted class ``c'``
(METHOD.md section 5). The weight helps only if ``r`` is higher where the old prediction is right. This
script measures that on a benchmark folder of ``Testing/Benchmarks/hard_step_variants.py`` (or of
``cimis bench`` in the hard phantom setting): the base model of a seed labels the cases of a split, the
full reference says where it is right (voxels of classes it does not know are left out, as the step's
new-organ voxels are), and each candidate reliability score is judged by

- AUROC of "the old prediction is right" (0.5: no better than a coin; 1: perfect), over all counted
  voxels and over the voxels the old model calls an organ (where background's mass does not dominate);
- the mean weight ``w`` on wrong voxels (1 is no down-weighting; PGCD wants it well below 1).

    python Testing/Benchmarks/reliability_map.py --bench runs/hardval --seed 0 --split train_steps

Candidates: the PGCD affinity at several ``tau_s``, the raw cosine to the predicted class's prototype, the
old model's probability of its prediction, and one minus its normalised entropy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata

from cimis.bench.pseudo_label_errors import reference_in_model_space
from cimis.data.manifest import Manifest
from cimis.incremental.pseudo_labels import normalised_entropy
from cimis.infer import iterate_tiles
from cimis.model.modelfile import load_model, load_prototypes

TAUS = (0.02, 0.05, 0.1, 0.3, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", required=True, help="a benchmark folder (bench.json, data/, runs/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train_steps", help="the cases to label (default: the step's own)")
    parser.add_argument("--model", help="a model folder instead of the bench's base model of --seed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench = Path(args.bench)
    manifest = Manifest.load(bench / "data" / "phantoms" / "manifest.json")
    model = Path(args.model or bench / "runs" / f"seed{args.seed}" / "base" / "step0" / "model")
    scores, right, organ = collect(model, manifest, args.split)
    figures = judge(scores, right, organ)
    print(f"{model} on {args.split} ({len(right)} voxels, {1 - right.mean():.3f} wrong; "
          f"{organ.sum()} called an organ, {1 - right[organ].mean():.3f} of them wrong)")
    print("| score | AUROC, all | AUROC, organ calls | mean w on wrong, all | mean w on wrong, organ calls |")
    print("|:--|--:|--:|--:|--:|")
    for name, f in figures.items():
        print(f"| {name} | {f['auroc_all']:.3f} | {f['auroc_organ']:.3f} | {f['w_wrong_all']:.3f} | "
              f"{f['w_wrong_organ']:.3f} |")
    out = bench / f"reliability_seed{args.seed}_{args.split}.json"
    out.write_text(json.dumps(figures, indent=1))


@torch.no_grad()
def collect(model_dir: Path, manifest: Manifest, split: str):
    """Per counted voxel: every candidate score, whether the old prediction is right, whether it is an organ."""
    net, card = load_model(model_dir)
    net.eval()
    prototypes, valid = load_prototypes(model_dir, card)
    unit_prototypes = F.normalize(prototypes.float(), dim=1)
    prepare, to_model = reference_in_model_space(manifest, card)
    scores: dict[str, list] = {}
    rights, organs = [], []
    for case in manifest.cases_in(split):
        volume = prepare({"case": case})
        truth_volume = torch.as_tensor(to_model[volume["label"][0].as_tensor().long().numpy()]).unsqueeze(0)
        for image, truth, inside in iterate_tiles(volume["image"].as_tensor(), truth_volume, card.preprocessing.patch_size):
            logits, features = net.forward_with_features(image)
            probs = torch.softmax(logits.float(), 1)
            predicted = probs.max(1).indices
            counted = inside & (truth >= 0)
            cosine = torch.einsum("cd,bdxyz->bcxyz", unit_prototypes, F.normalize(features.float(), dim=1))
            cosine = cosine.masked_fill(~valid.bool().view(1, -1, 1, 1, 1), float("-inf"))
            at_prediction = {"cosine to P_c'": cosine.gather(1, predicted.unsqueeze(1)).squeeze(1),
                             "probability of c'": probs.max(1).values,
                             "1 - normalised entropy": 1 - normalised_entropy(probs)}
            for tau in TAUS:
                affinity = torch.softmax(cosine / tau, dim=1)
                at_prediction[f"PGCD affinity, tau_s {tau:g}"] = torch.nan_to_num(
                    affinity.gather(1, predicted.unsqueeze(1)).squeeze(1))
            at_prediction["PGCD affinity (tau_s 0.1) x probability of c'"] = (
                at_prediction["PGCD affinity, tau_s 0.1"] * at_prediction["probability of c'"])
            for name, score in at_prediction.items():
                scores.setdefault(name, []).append(score[counted].numpy())
            rights.append((predicted == truth)[counted].numpy())
            organs.append((predicted > 0)[counted].numpy())
    return ({k: np.concatenate(v) for k, v in scores.items()}, np.concatenate(rights), np.concatenate(organs))


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUROC of ``score`` for ``positive``, ties counted half."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def judge(scores: dict, right: np.ndarray, organ: np.ndarray) -> dict:
    figures = {}
    for name, score in scores.items():
        score = np.nan_to_num(score, neginf=0.0)
        weights = score / max(score.mean(), 1e-12)  # PGCD's normalisation: mean 1 over the counted voxels
        organ_weights = score[organ] / max(score[organ].mean(), 1e-12)
        figures[name] = {"auroc_all": auroc(score, right), "auroc_organ": auroc(score[organ], right[organ]),
                         "w_wrong_all": float(weights[~right].mean()),
                         "w_wrong_organ": float(organ_weights[~right[organ]].mean())}
    return figures


if __name__ == "__main__":
    main()
