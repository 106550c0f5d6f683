"""Supervised training on all (or chosen) classes of a manifest: step 0, and the joint upper bound.

Dice + cross-entropy on label-balanced patches, iteration-based with nnU-Net's polynomial learning-rate
decay, AdamW, mixed precision on CUDA, validation Dice per class, periodic checkpoints and ``resume``.
Under torchrun (cimis/distributed.py) the batch is split over the ranks, each sampling its own patches;
rank 0 alone validates and writes checkpoints, events and the model.
:class:`Trainer` owns the loop; the incremental strategies subclass it and change :meth:`Trainer.loss`.
"""

from __future__ import annotations

import math
import resource
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset, MetaTensor
from monai.transforms import Compose, MapTransform
from monai.utils import set_determinism
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from cimis import distributed

from cimis.checkpoint import load_checkpoint, save_checkpoint
from cimis.data.classes import ClassSet
from cimis.data.io import check_folder_output
from cimis.data.manifest import Case, Manifest, load_case
from cimis.data.preprocess import (
    PreprocessConfig,
    model_space_transforms,
    patch_sampling_transforms,
    sitk_to_metatensor,
    training_transforms,
)
from cimis.device import autocast, needs_grad_scaler, resolve_device
from cimis.errors import CimisError
from cimis.incremental.prototypes import global_prototypes
from cimis.infer import predict_probabilities
from cimis.metrics import evaluate_case
from cimis.model.modelfile import ModelCard, check_model_output, save_model
from cimis.model.network import NetworkConfig, SegmentationNet
from cimis.seg_loss import DiceCELoss

# on_event(kind, payload): "progress", "metric" and "checkpoint" events for the worker's event stream.
EventSink = Callable[[str, dict], None]


@dataclass
class TrainConfig:
    """Training budget and optimisation settings (each one a ``cimis train`` option)."""

    iterations: int = 1000
    batch_size: int = 2  # patches per iteration (all ranks together)
    samples_per_volume: int = 2  # patches cut from each loaded volume
    learning_rate: float = 2e-3
    weight_decay: float = 3e-5
    warmup: int = 20  # iterations of linear learning-rate warm-up
    val_every: int = 250
    checkpoint_every: int = 250
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    num_workers: int = 0
    cache: bool = True
    augment: bool = True
    sw_batch_size: int = 2
    sw_overlap: float = 0.25

    def __post_init__(self):
        if min(self.iterations, self.batch_size, self.samples_per_volume) < 1:
            raise CimisError("iterations, batch size and samples per volume must be at least 1")
        if self.learning_rate <= 0:
            raise CimisError(f"the learning rate must be positive, got {self.learning_rate}")
        # Each loaded volume gives samples_per_volume patches, so they must divide the batch.
        self.samples_per_volume = math.gcd(self.batch_size, self.samples_per_volume)

    def learning_rate_at(self, iteration: int) -> float:
        """Linear warm-up, then nnU-Net's polynomial decay ``lr * (1 - t/T)^0.9``."""
        if iteration < self.warmup:
            return self.learning_rate * (iteration + 1) / self.warmup
        return self.learning_rate * (1 - iteration / self.iterations) ** 0.9


class LoadCased(MapTransform):
    """Reads a manifest case into ``image`` (HU) and ``label`` (channel indices) MetaTensors.

    Args:
        manifest_classes: what the label values on disk mean.
        classes: the model's classes, in channel order.
        label_classes: the classes whose labels are used (default: all of ``classes``). Every other label
            value becomes background: a base step trained on a subset of a dataset's organs, or an
            incremental step that sees only its new organs, treats the rest as 0.
    """

    def __init__(self, manifest_classes: ClassSet, classes: ClassSet, label_classes: ClassSet | None = None):
        super().__init__(keys=["case"])
        self.manifest_classes = manifest_classes
        top = max(manifest_classes.values + classes.values, default=0)
        lut = classes.value_to_channel_lut(top).clip(min=0)
        if label_classes is not None:
            kept = np.zeros_like(lut, dtype=bool)
            kept[[v for v in label_classes.values if v <= top]] = True
            lut[~kept] = 0
        self.lut = torch.as_tensor(lut)

    def __call__(self, data: dict) -> dict:
        case: Case = data["case"]
        image, label = load_case(case, self.manifest_classes)
        if label is None:
            raise CimisError(f"case {case.id} has no label map and cannot be used for training")
        values = sitk_to_metatensor(label, dtype=torch.int64)
        channels = MetaTensor(self.lut[values.as_tensor()].float(), affine=values.affine)
        return {"id": case.id, "image": sitk_to_metatensor(image), "label": channels}


def _forever(loader: DataLoader) -> Iterator[dict]:
    epoch = 0
    while True:
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)  # another split of the cases over the ranks every epoch
        yield from loader
        epoch += 1


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Trainer:
    """One training run of ``net`` on ``classes``.

    Args:
        net: the network to train (its head already has ``classes.num_channels`` outputs).
        classes: what the output channels mean (channel ``i`` is ``classes[i - 1]``).
        preprocess: model-space settings.
        config: budget and optimiser.
        run_dir: where checkpoints go (``run_dir/checkpoint``).
        on_event: optional sink for progress, metric and checkpoint events.
        progress: show a progress bar.
        label_classes: the classes whose labels the data provides (default: all of ``classes``); the
            others are background in the data and are not validated.
    """

    kind = "train"

    def __init__(
        self,
        net: SegmentationNet,
        classes: ClassSet,
        preprocess: PreprocessConfig,
        config: TrainConfig,
        run_dir: Path,
        on_event: EventSink | None = None,
        progress: bool = True,
        label_classes: ClassSet | None = None,
    ):
        self.net = net
        self.classes = classes
        self.label_classes = label_classes if label_classes is not None else classes
        self.preprocess = preprocess
        self.config = config
        self.run_dir = Path(run_dir)
        # Rank 0 speaks for the run: events and progress bars come from it alone.
        self.on_event = (on_event if distributed.is_main() else None) or (lambda kind, payload: None)
        self.progress = progress and distributed.is_main()
        self.device = distributed.rank_device(resolve_device(config.device))
        self.seg_loss = DiceCELoss()

    # ----------------------------------------------------------------------------------------- the loss
    def loss(self, batch: dict, logits: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Dice + cross-entropy against the batch's labels. Returns the loss and its parts for the log."""
        loss = self.seg_loss(logits, batch["label"])
        return loss, {"seg": float(loss.detach())}

    # -------------------------------------------------------------------------------------------- hooks
    def before_training(self, train_cases: list[Case], manifest_classes: ClassSet) -> None:
        """Called once before the first iteration (e.g. to estimate statistics over the training data)."""

    def after_step(self) -> None:
        """Called after every optimiser step."""

    def checkpoint_state(self) -> dict:
        """JSON-able training state beyond the weights and the optimiser that a resumed run must continue
        from (an incremental step's moving background prototype); stored in the checkpoint's state."""
        return {}

    def restore_checkpoint_state(self, state: dict) -> None:
        """Take back :meth:`checkpoint_state` from a checkpoint's state when resuming."""

    def replicated_state(self) -> list[torch.Tensor]:
        """Tensors beyond the weights that every rank must hold identically (checked at checkpoints)."""
        return []

    # ------------------------------------------------------------------------------------------- data
    def load_case(self, manifest_classes: ClassSet) -> LoadCased:
        return LoadCased(manifest_classes, self.classes, self.label_classes)

    def model_space_volumes(self, cases: list[Case], manifest_classes: ClassSet) -> list[dict]:
        """Whole volumes in model space with their labels (channel indices), without augmentation."""
        prepare = Compose([self.load_case(manifest_classes), model_space_transforms(self.preprocess, True)])
        return [prepare({"case": c}) for c in cases]

    def local_batch(self) -> tuple[int, int]:
        """This rank's patches per iteration and patches per loaded volume: the batch split over the ranks."""
        cfg, ranks = self.config, distributed.world_size()
        if cfg.batch_size % ranks:
            raise CimisError(f"the batch size {cfg.batch_size} does not split evenly over {ranks} processes",
                             f"choose a batch size that is a multiple of {ranks}")
        batch = cfg.batch_size // ranks
        return batch, math.gcd(batch, cfg.samples_per_volume)

    def _train_loader(self, cases: list[Case], manifest_classes: ClassSet) -> DataLoader:
        cfg = self.config
        batch, per_volume = self.local_batch()
        transform = Compose([
            self.load_case(manifest_classes),
            training_transforms(self.preprocess, self.classes.num_channels),
            patch_sampling_transforms(self.preprocess, self.classes.num_channels, per_volume, cfg.augment),
        ])
        data = [{"case": c} for c in cases]
        if cfg.cache:
            dataset = CacheDataset(data, transform, cache_rate=1.0, num_workers=1, progress=self.progress)
        else:
            dataset = Dataset(data, transform)
        # Several ranks: each loads its own share of the cases every epoch (and crops its own patches: the
        # random state is seeded by rank).
        sampler = DistributedSampler(dataset, distributed.world_size(), distributed.rank(), shuffle=True,
                                     seed=cfg.seed) if distributed.is_distributed() else None
        return DataLoader(
            dataset,
            batch_size=batch // per_volume,
            shuffle=sampler is None,
            sampler=sampler,
            num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=cfg.num_workers > 0,
        )

    # -------------------------------------------------------------------------------------- validation
    def validate(self, val_data: list[dict]) -> dict:
        """Dice per labelled class on the validation cases, in model space; means over cases."""
        self.net.eval()
        per_class: dict[str, list[float]] = {c.name: [] for c in self.label_classes}
        for item in val_data:
            probs = predict_probabilities(
                self.net, item["image"], self.preprocess.patch_size, self.device,
                self.config.sw_batch_size, self.config.sw_overlap, self.config.amp,
            )
            pred = self.classes.channels_to_values(probs.argmax(0).numpy())
            ref = self.classes.channels_to_values(item["label"][0].numpy().astype(np.int64))
            metrics = evaluate_case(pred, ref, tuple(self.preprocess.spacing), self.label_classes, item["id"])
            for name, value in metrics.dice.items():
                per_class[name].append(value)
        self.net.train()
        dice = {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for k, v in per_class.items()}
        finite = [v for v in dice.values() if np.isfinite(v)]
        return {"dice": dice, "mean_dice": float(np.mean(finite)) if finite else float("nan")}

    # --------------------------------------------------------------------------------------- the loop
    def fit(
        self, train_cases: list[Case], val_cases: list[Case], manifest_classes: ClassSet, resume: bool = False
    ) -> list[dict]:
        """Train for ``config.iterations``; returns the history (one entry per validation)."""
        cfg = self.config
        if not train_cases:
            raise CimisError("the training split is empty", "list training cases under splits.train in the manifest")
        set_determinism(seed=cfg.seed + distributed.rank())  # every rank crops its own patches
        self.net.to(self.device).train()
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(self.device, cfg.amp))
        checkpoint_dir = self.run_dir / "checkpoint"
        start, history = 0, []
        if resume:
            state = load_checkpoint(checkpoint_dir, self.net, optimizer)
            start, history = int(state["iteration"]), list(state["history"])
            self.restore_checkpoint_state(state)
            # A resumed run is reproducible, not bit-identical.
            set_determinism(seed=cfg.seed + start + distributed.rank())

        loader = self._train_loader(train_cases, manifest_classes)
        val_data = self.model_space_volumes(val_cases, manifest_classes) if val_cases and distributed.is_main() else []
        self.before_training(train_cases, manifest_classes)
        student = distributed.data_parallel(self.net, self.device)  # DDP on the student alone
        batches = _forever(loader)
        bar = tqdm(total=cfg.iterations, initial=start, desc=self.kind, unit="it", disable=not self.progress)
        running, started, done_here = None, time.perf_counter(), 0
        for iteration in range(start, cfg.iterations):
            batch = next(batches)
            batch = {k: v.as_tensor().to(self.device, non_blocking=True) if isinstance(v, MetaTensor) else v
                     for k, v in batch.items()}
            for group in optimizer.param_groups:
                group["lr"] = cfg.learning_rate_at(iteration)
            with autocast(self.device, cfg.amp):
                logits, features = student(batch["image"])
                loss, parts = self.loss(batch, logits.float(), features.float())
            value = distributed.mean_over_ranks(float(loss.detach()))  # every rank stops together
            if not math.isfinite(value):
                raise CimisError(f"the training loss became {value} at iteration {iteration + 1}",
                                 "lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), 12.0)  # nnU-Net's clip
            scaler.step(optimizer)
            scaler.update()
            self.after_step()

            done_here += 1
            running = value if running is None else 0.95 * running + 0.05 * value
            seconds_per_it = (time.perf_counter() - started) / done_here
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}", lr=f"{cfg.learning_rate_at(iteration):.1e}")
            it = iteration + 1
            self.on_event("progress", {
                "iteration": it, "total": cfg.iterations, "loss": running, "parts": parts,
                "eta_s": seconds_per_it * (cfg.iterations - it), "device": str(self.device),
                "memory_mb": peak_memory_mb(self.device),
            })
            if val_data and (it % cfg.val_every == 0 or it == cfg.iterations):
                result = self.validate(val_data)
                entry = {"iteration": it, "loss": running, **result}
                history.append(entry)
                bar.write(f"iteration {it}: validation mean Dice {result['mean_dice']:.3f}")
                self.on_event("metric", entry)
            validated = bool(val_cases) and (it % cfg.val_every == 0 or it == cfg.iterations)
            if it % cfg.checkpoint_every == 0 and it < cfg.iterations:
                distributed.check_replicas_agree([*self.net.parameters(), *self.replicated_state()],
                                                 "model weights or prototypes", tolerance=1e-4)
                if distributed.is_main():
                    save_checkpoint(checkpoint_dir, self.net, optimizer, {
                        **self.checkpoint_state(), "iteration": it, "history": history, "config": asdict(cfg)})
                    self.on_event("checkpoint", {"iteration": it, "path": str(checkpoint_dir)})
                distributed.barrier()  # the others wait while rank 0 validates and writes
                distributed.stop_point(it)
            elif validated:
                distributed.barrier()
        bar.close()
        self.seconds_per_iteration = (time.perf_counter() - started) / max(done_here, 1)
        self.peak_memory_mb = peak_memory_mb(self.device)
        self.net.eval()
        return history


def train_model(
    manifest: Manifest,
    run_dir: str | Path,
    classes: ClassSet | None = None,
    network: str | NetworkConfig = "small",
    preprocess: PreprocessConfig | None = None,
    config: TrainConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_event: EventSink | None = None,
    progress: bool = True,
) -> Path:
    """Train a model from scratch on ``manifest``'s train split and write it to ``run_dir/model``.

    Args:
        classes: the classes to learn (default: all of the manifest's); others are treated as background.
        network: a preset name (``"small"``, ``"dynunet"``) or a full config.

    Returns the model folder.
    """
    run_dir = Path(run_dir)
    preprocess = preprocess or PreprocessConfig()
    config = config or TrainConfig()
    classes = classes if classes is not None else manifest.classes
    model_dir = run_dir / "model"
    check_folder_output(run_dir, "run (--out)")
    # Refused now, not after hours of training; --resume may replace the model a finished run left.
    check_model_output(model_dir, overwrite or resume)
    if not resume and (run_dir / "checkpoint").exists() and not overwrite:
        raise CimisError(f"{run_dir} holds an unfinished run", "pass --resume to continue it or --overwrite to restart")
    net_config = network if isinstance(network, NetworkConfig) else NetworkConfig.preset(
        network, preprocess.patch_size, preprocess.spacing)
    divisor = net_config.size_divisor
    if any(p % d for p, d in zip(preprocess.patch_size, divisor)):
        raise CimisError(f"patch size {preprocess.patch_size} is not a multiple of {divisor} per axis",
                         "choose a patch size divisible by the network's total stride")
    torch.manual_seed(config.seed)
    net = SegmentationNet(net_config, classes.num_channels)
    trainer = Trainer(net, classes, preprocess, config, run_dir, on_event, progress)
    history = trainer.fit(manifest.cases_in("train"), manifest.cases_in("val"), manifest.classes, resume)
    card = ModelCard(
        classes=classes, network=net_config, preprocessing=preprocess,
        history=[{
            "step": 0, "kind": trainer.kind, "dataset": manifest.name, "classes": classes.names,
            "config": asdict(config), "validation": history,
            "seconds_per_iteration": trainer.seconds_per_iteration, "peak_memory_mb": trainer.peak_memory_mb,
            "device": str(trainer.device),
        }],
        metrics={"validation": history[-1]} if history else {},
    )
    # The incremental methods start the next step from these (METHOD.md section 4).
    # Each rank pools its share of the volumes; the sums are added across ranks.
    volumes = trainer.model_space_volumes(distributed.share(manifest.cases_in("train")), manifest.classes)
    prototypes = global_prototypes(net, volumes, preprocess.patch_size, trainer.device, amp=config.amp)
    if distributed.is_main():
        save_model(model_dir, net, card, overwrite=True, prototypes=prototypes)
        shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)  # the run is finished: nothing to resume
    distributed.barrier()
    return model_dir
