"""``cimis import-model``: a MONAI bundle or an nnU-Net v2 model becomes an ordinary CIMISLearner model folder.

The source is read as data (:mod:`cimis.model.monai_bundle`, :mod:`cimis.model.nnunet_source`), its
network rebuilt from the table of supported constructors, its weights loaded strictly, and its final
1x1x1 convolution becomes the growable head (:mod:`cimis.model.imported`). ``--classes`` keeps a subset of
the output channels; ``--volumes`` computes the global prototypes the incremental methods need from
unlabelled CTs (without it, ``cimis learn`` computes them from the step's own images). Everything is
checked before anything is written, and the model folder appears complete or not at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from cimis.data.classes import ClassInfo, ClassSet, default_color
from cimis.data.preprocess import PreprocessConfig
from cimis.errors import CimisError
from cimis.model.card_limits import check_card_fields
from cimis.model.head import GrowableHead
from cimis.model.imported import ImportedBackbone, build_source_network, final_conv_of
from cimis.model.modelfile import ModelCard, check_model_output, save_model
from cimis.model.network import NetworkConfig, SegmentationNet
from cimis.model.source_model import SourceModel


def read_source(source: Path, fold: int | None = None, overrides=None) -> SourceModel:
    """The reader that fits ``source``: a MONAI bundle folder or an nnU-Net v2 trained-model folder."""
    source = Path(source)
    if not source.exists():
        raise CimisError(f"{source} does not exist")
    if not source.is_dir():
        raise CimisError(f"{source} is a file; give a MONAI bundle folder (configs/, models/) or an nnU-Net v2 "
                         "trained-model folder (plans.json, dataset.json, fold_N/)")
    if (source / "plans.json").is_file() and (source / "dataset.json").is_file():
        try:
            from cimis.model.nnunet_source import read_nnunet
        except ImportError as exc:
            raise CimisError(f"{source} is an nnU-Net model, which needs the optional package "
                             f"dynamic-network-architectures ({exc})", "install it: pip install 'cimis[nnunet]'") from None
        return read_nnunet(source, fold)
    from cimis.model.monai_bundle import is_bundle, read_monai_bundle

    if is_bundle(source):
        if fold is not None:
            raise CimisError("--fold applies to nnU-Net models only", "leave it out for a MONAI bundle")
        return read_monai_bundle(source, overrides)
    raise CimisError(f"{source} is neither a MONAI bundle (configs/metadata.json, configs/inference.json, "
                     "models/model.pt) nor an nnU-Net v2 model (plans.json, dataset.json, fold_N/checkpoint_final.pth)")


def _weights_name(model: SourceModel) -> str:
    return "the bundle's models/model.pt" if model.kind == "monai-bundle" else "the nnU-Net checkpoint"


def load_source_network(model: SourceModel) -> nn.Module:
    """The source network with the source's weights, loaded strictly; mismatches name the tensor."""
    net = build_source_network(model.builder, model.args)
    expected = net.state_dict()
    weights = model.state_dict
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    where = _weights_name(model)
    if missing or unexpected:
        first = (f"it lacks {missing[0]!r}" if missing else f"it holds {unexpected[0]!r}, which the network has not")
        raise CimisError(f"{where} does not match the network {model.builder} ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected tensors; {first})",
                         "the weights belong to another network than the config describes")
    for name, tensor in weights.items():
        want = expected[name]
        if tuple(tensor.shape) != tuple(want.shape):
            raise CimisError(f"{where}: tensor {name!r} has shape {list(tensor.shape)}, the network needs "
                             f"{list(want.shape)}", "the weights belong to another network than the config describes")
        if want.dtype.is_floating_point and not tensor.dtype.is_floating_point:
            raise CimisError(f"{where}: tensor {name!r} is not floating point")
        if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
            raise CimisError(f"{where}: tensor {name!r} holds NaN or infinite values")
    net.load_state_dict(weights, strict=True)
    return net.eval()


def split_head(net: nn.Module, final_conv: str, out_channels: int) -> tuple[ImportedBackbone, torch.Tensor, torch.Tensor]:
    """The backbone (final conv replaced by Identity) and the head's ``weight (C, D)`` and ``bias (C,)``.

    A network without a final 1x1x1 convolution (``final_conv == ""``) keeps its whole output as the
    features F and gets an identity head (``W = I``, ``b = 0``): the same logits, now growable.
    """
    if final_conv:
        conv = final_conv_of(net, final_conv)
        weight = conv.weight.detach().reshape(conv.out_channels, conv.in_channels).clone()
        bias = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(conv.out_channels)
    else:
        weight = bias = None
    backbone = ImportedBackbone("", {}, final_conv, net=net)
    if weight is None:
        weight, bias = torch.eye(out_channels), torch.zeros(out_channels)
    return backbone, weight, bias


def pick_classes(model: SourceModel, keep: Sequence[str] | None) -> list[int]:
    """Indices into ``model.class_names`` of the kept classes (all when ``keep`` is None), in source order."""
    names = [n.lower() for n in model.class_names]
    if not keep:
        return list(range(len(names)))
    picked = []
    for name in keep:
        if name.lower() not in names:
            shown = ", ".join(model.class_names[:20]) + (" ..." if len(names) > 20 else "")
            raise CimisError(f"--classes: the model has no class {name!r}", f"its classes are: {shown}")
        index = names.index(name.lower())
        if index in picked:
            raise CimisError(f"--classes names {name!r} twice")
        picked.append(index)
    return sorted(picked)


def import_source(
    model: SourceModel, keep: Sequence[str] | None = None, source_path: str = "",
) -> tuple[SegmentationNet, ModelCard]:
    """The imported network (head restricted to the kept classes) and its card; nothing written."""
    kept = pick_classes(model, keep)
    net = load_source_network(model)
    out_channels = model.args.get("out_channels", model.args.get("num_classes", len(model.class_names) + 1))
    backbone, weight, bias = split_head(net, model.final_conv, int(out_channels))
    if model.head is not None:  # the network is followed by its own 1x1x1 convolution: that is the head
        head_weight, head_bias = model.head
        if tuple(head_weight.shape) != (head_weight.shape[0], weight.shape[1], 1, 1, 1) or head_bias.shape != head_weight.shape[:1]:
            raise CimisError(f"{_weights_name(model)}: the 1x1x1 convolution after the network has shape "
                             f"{list(head_weight.shape)}, which does not fit the network's {weight.shape[1]} outputs")
        weight, bias = head_weight.detach().reshape(head_weight.shape[0], -1).float(), head_bias.detach().float()
    if weight.shape[0] != len(model.class_names) + 1:
        raise CimisError(f"the network has {weight.shape[0]} output channels but the source names "
                         f"{len(model.class_names)} classes besides background",
                         "the class list and the network do not belong together")
    channels = [0] + [i + 1 for i in kept]
    head = GrowableHead(weight.shape[1], len(channels))
    with torch.no_grad():
        head.conv.weight.copy_(weight[channels].reshape(len(channels), -1, 1, 1, 1))
        head.conv.bias.copy_(bias[channels])
    classes = ClassSet([ClassInfo(model.class_names[i], int(model.label_values[i]), default_color(n))
                        for n, i in enumerate(kept)])
    divisor = _divisor(model)
    config = NetworkConfig.imported(model.builder, model.args, model.final_conv, weight.shape[1], divisor)
    if not model.normalization:
        raise CimisError(f"the {model.kind} source gives no intensity normalisation", "give the CT window with --window")
    normalization = dict(model.normalization)
    preprocessing = PreprocessConfig(spacing=[float(s) for s in model.spacing], patch_size=[int(p) for p in model.patch_size],
                                     orientation=model.orientation, normalization=normalization)
    # window: the HU range the model sees (the body crop and readers of older cards use it).
    preprocessing.window = [float(v) for v in normalization.get("window", normalization.get("clip", preprocessing.window))]
    entry = {
        "step": 0, "kind": "import", "source": model.kind, "source_path": source_path, "builder": model.builder,
        "source_classes": len(model.class_names), "kept_classes": classes.names, "notes": list(model.notes),
    }
    card = ModelCard(classes=classes, network=config, preprocessing=preprocessing, history=[entry])
    check_card_fields(card.to_json(), "the imported model's card")
    return SegmentationNet.assemble(config, backbone, head).eval(), card


def _divisor(model: SourceModel) -> list[int]:
    from cimis.model.imported_limits import MONAI_BUILDERS, monai_size_divisor

    if model.builder in MONAI_BUILDERS:
        return monai_size_divisor(model.builder, model.args)
    # nnU-Net: the product of the strides, given in the network's axis order; the reader knows which of our
    # axes each one is (guessing from the patch picks the wrong order when both fit).
    from cimis.model.nnunet_source import size_divisor

    return size_divisor(model.args)


def model_space_images(paths: Sequence[str | Path], preprocessing: PreprocessConfig) -> list[torch.Tensor]:
    """Unlabelled CTs (files or DICOM folders) in the model's space, each ``(1, X, Y, Z)``."""
    from cimis.data.io import read_image
    from cimis.data.preprocess import model_space_transforms, sitk_to_metatensor
    from cimis.data.validation import check_3d, check_finite

    transform = model_space_transforms(preprocessing, with_label=False)
    images = []
    for path in paths:
        image = read_image(path)
        check_3d(image, str(path))
        check_finite(image, str(path))
        images.append(transform({"image": sitk_to_metatensor(image)})["image"])
    return images


def import_model(
    source: str | Path, out: str | Path, classes: Sequence[str] | None = None, fold: int | None = None,
    volumes: Sequence[str | Path] | None = None, overrides=None, device: str = "auto", overwrite: bool = False,
    on_stage: Callable[[str], None] | None = None,
) -> tuple[Path, ModelCard]:
    """Import ``source`` into the model folder ``out``; returns the folder and its card.

    ``on_stage`` is called with ``reading``, ``converting``, ``prototypes`` (with ``volumes`` only) and
    ``saving`` as each begins (the worker's import job reports them and checks for a cancel there).
    """
    from cimis.device import resolve_device
    from cimis.incremental.prototypes import confident_prototypes

    stage = on_stage or (lambda name: None)
    out = Path(out)
    check_model_output(out, overwrite)
    stage("reading")
    model = read_source(Path(source), fold, overrides)
    if overrides is not None and getattr(overrides, "classes_named", False):
        classes = None  # --classes named the channels of a bundle without names: keep them all
    stage("converting")
    net, card = import_source(model, classes, str(source))
    del model  # the source's weights are in ``net`` now; a 117-class model's copy is large
    prototypes = None
    if volumes:
        stage("prototypes")
        run_on = resolve_device(device)
        images = model_space_images(volumes, card.preprocessing)
        prototypes = confident_prototypes(net.to(run_on), images, card.preprocessing.patch_size, run_on)
        net = net.cpu()
        card.history[0]["prototypes"] = {"volumes": [str(v) for v in volumes], "targets": "confident predictions"}
    else:
        card.history[0]["prototypes"] = "computed by the first learn step from its own images"
    stage("saving")
    return save_model(out, net, card, overwrite=overwrite, prototypes=prototypes), card
