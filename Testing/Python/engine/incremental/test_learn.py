"""`learn_step` end to end on tiny phantoms: every strategy runs, grows the model and keeps its history."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cimis.data.manifest import Manifest
from cimis.data.phantom import write_phantom_dataset
from cimis.data.preprocess import PreprocessConfig
from cimis.errors import CimisError
from cimis.incremental.learn import learn_step
from cimis.incremental.strategies import STRATEGIES
from cimis.model.modelfile import load_model, load_prototypes
from cimis.model.network import NetworkConfig
from cimis.train import TrainConfig, train_model

TINY_NET = NetworkConfig(filters=[4, 8, 16], kernel_sizes=[3, 3, 3], strides=[1, 2, 2])
TINY_PREPROCESS = PreprocessConfig(spacing=[8.0, 8.0, 8.0], patch_size=[32, 32, 16])
BASE = ["spleen", "liver", "aorta", "left kidney"]
NEW = ["right kidney", "stomach"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("learn")
    manifest_path = write_phantom_dataset(out / "ds", num_cases=4, spacing=(8.0, 8.0, 8.0), seed=11, progress=False)
    manifest = Manifest.load(manifest_path)
    model = train_model(manifest, out / "base", classes=manifest.classes.subset(BASE), network=TINY_NET,
                        preprocess=TINY_PREPROCESS, config=TrainConfig(iterations=3, device="cpu", val_every=3),
                        progress=False)
    return manifest, model


def _step_config():
    return TrainConfig(iterations=2, device="cpu", val_every=2, checkpoint_every=2, learning_rate=1e-4)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_learns_a_step(base, tmp_path, strategy):
    manifest, model = base
    old_net, old_card = load_model(model)
    new_model = learn_step(model, manifest, tmp_path / strategy, NEW, strategy, _step_config(), progress=False)
    net, card = load_model(new_model)
    assert card.classes.names == old_card.classes.names + NEW
    assert net.num_channels == len(BASE) + len(NEW) + 1
    assert [h["kind"] for h in card.history] == ["train", "learn"]
    assert card.history[-1]["strategy"] == strategy and card.history[-1]["new_classes"] == NEW
    # Validation reports the classes whose labels the step uses: the new ones (joint: all of them).
    validated = set(card.history[-1]["validation"][-1]["dice"])
    assert validated == (set(BASE + NEW) if strategy == "joint" else set(NEW))
    prototypes, valid = load_prototypes(new_model)
    assert prototypes.shape == (net.num_channels, TINY_NET.feature_dim)
    assert valid[0]  # background is always present
    if strategy != "joint":
        # Old weights were the starting point: the backbone moved only by a few small steps.
        old = dict(old_net.named_parameters())
        drift = max((p - old[n]).abs().max().item() for n, p in net.named_parameters() if n in old and p.shape == old[n].shape)
        assert drift < 0.05


def test_base_model_has_prototypes_of_its_classes(base):
    _, model = base
    prototypes, valid = load_prototypes(model)
    assert valid.all() and prototypes.shape == (len(BASE) + 1, TINY_NET.feature_dim)
    assert torch.isfinite(prototypes).all()


def test_existing_class_name_is_refused(base, tmp_path):
    manifest, model = base
    with pytest.raises(CimisError, match="already has a class named 'liver'"):
        learn_step(model, manifest, tmp_path / "x", ["liver"], "ft", _step_config(), progress=False)


def test_unknown_strategy_and_class_are_refused(base, tmp_path):
    manifest, model = base
    with pytest.raises(CimisError, match="unknown strategy"):
        learn_step(model, manifest, tmp_path / "x", NEW, "magic", _step_config(), progress=False)
    with pytest.raises(CimisError, match="not in the dataset"):
        learn_step(model, manifest, tmp_path / "x", ["appendix"], "ft", _step_config(), progress=False)


@pytest.mark.parametrize("strategy, head_init", [("pgcd-dapd", None), ("pgcd-dapd", "balanced"), ("mib", None)])
def test_new_channels_start_as_the_strategy_or_the_option_says(base, tmp_path, strategy, head_init):
    from cimis.incremental.base import StepOptions

    manifest, model = base
    config = TrainConfig(iterations=1, device="cpu", val_every=1, checkpoint_every=1, learning_rate=1e-7)
    new_model = learn_step(model, manifest, tmp_path / "step", NEW, strategy, config,
                           StepOptions(head_init=head_init), progress=False)
    net, card = load_model(new_model)
    weight = net.head.conv.weight.detach()[:, :, 0, 0, 0]
    n_old = len(BASE) + 1
    balanced = head_init == "balanced" or (head_init is None and strategy == "mib")
    # init-balanced copies the background channel into each new one; the default init does not.
    copies_background = torch.allclose(weight[n_old:], weight[0].expand(len(NEW), -1), atol=1e-4)
    assert copies_background == balanced
    # The card records the head init used: the option's, or the method settings' when none was given.
    assert card.history[-1]["options"]["head_init"] == ("balanced" if balanced else "random")


def test_unknown_head_init_is_refused():
    from cimis.incremental.base import StepOptions

    with pytest.raises(CimisError, match="unknown head init"):
        StepOptions(head_init="zeros")


@pytest.mark.parametrize("weight", [-0.1, float("nan")])
def test_a_negative_loss_weight_is_refused(weight):
    from cimis.incremental.base import StepOptions

    with pytest.raises(CimisError, match="lambda_f must be a number of at least 0"):
        StepOptions(lambda_f=weight)


def test_a_step_defaults_to_step_zeros_budget_and_learning_rate(base):
    from cimis.incremental.learn import default_step_config
    from cimis.model.modelfile import load_card

    _, model = base
    step0 = load_card(model).history[0]["config"]
    config = default_step_config(load_card(model))
    assert (config.iterations, config.learning_rate) == (step0["iterations"], step0["learning_rate"])


def test_learn_command_passes_its_options_to_the_step(base, tmp_path, capsys):
    from cimis.cli import main

    manifest, model = base
    code = main(["learn", "--model", str(model), "--manifest", str(manifest.save(tmp_path / "m.json")),
                 "--out", str(tmp_path / "run"), "--new-classes", ",".join(NEW), "--off", "spatial_weight",
                 "--head-init", "balanced", "--lambda-f", "0.2", "--option", "lambda_o=0.5", "--iterations", "2",
                 "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    step = load_model(tmp_path / "run" / "model")[1].history[-1]
    assert step["strategy"] == "pgcd-dapd" and step["config"]["iterations"] == 2
    options = step["options"]
    assert (options["spatial_weight"], options["head_init"], options["lambda_f"]) == (False, "balanced", 0.2)
    assert (options["lambda_o"], options["lambda_p"]) == (0.5, 0.1)  # given, and from the method settings

    # A settings file sets a method's weights and learning rate; the card shows what was used.
    settings = {"format": "cimis-method-settings/1", "methods": {"mib": {
        "head_init": {"value": "random", "source": "test"}, "kd_weight": {"value": 1.25, "source": "test"},
        "learning_rate_factor": {"value": 0.5, "source": "test"}}}}
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    code = main(["learn", "--model", str(model), "--manifest", str(tmp_path / "m.json"), "--strategy", "mib",
                 "--out", str(tmp_path / "run_mib"), "--new-classes", ",".join(NEW), "--method-settings",
                 str(tmp_path / "settings.json"), "--iterations", "1", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    step = load_model(tmp_path / "run_mib" / "model")[1].history[-1]
    assert (step["options"]["kd_weight"], step["options"]["head_init"]) == (1.25, "random")
    step0_lr = load_model(model)[1].history[0]["config"]["learning_rate"]
    assert step["config"]["learning_rate"] == pytest.approx(0.5 * step0_lr)

    # The command line refuses a negative weight itself (argparse exits), before any step starts.
    with pytest.raises(SystemExit) as exited:
        main(["learn", "--model", str(model), "--manifest", str(tmp_path / "m.json"),
              "--out", str(tmp_path / "run2"), "--lambda-f", "-1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "--lambda-f: expected a number of at least 0" in err and "Traceback" not in err
    assert not (tmp_path / "run2").exists()
