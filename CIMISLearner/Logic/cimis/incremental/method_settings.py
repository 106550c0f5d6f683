"""Per-method step settings, read from a versioned file: head init, loss weights, learning-rate factor.

The file (``method_settings.json`` beside this module by default) gives, for each strategy, the value of
every setting it uses and where that value came from. :func:`resolve_options` fills the step options a
caller left unset (``None``) from it, so ``cimis learn``, the worker and the benchmark all start a method
from the same values; options set explicitly win. ``cimis bench --tune`` writes a file of the same form.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

from cimis.errors import CimisError

FORMAT = "cimis-method-settings/1"
DEFAULT_PATH = Path(__file__).with_name("method_settings.json")
# StepOptions fields a method's settings may give (None in StepOptions means "the method's setting").
OPTION_KEYS = ("head_init", "lambda_f", "lambda_o", "lambda_p", "kd_weight", "feature_kd_weight", "pod_features",
               "pod_logits")
# Not a loss option: the step's learning rate is this times step 0's (or the benchmark's step rate).
LEARNING_RATE_FACTOR = "learning_rate_factor"
KEYS = OPTION_KEYS + (LEARNING_RATE_FACTOR,)


@dataclass(frozen=True)
class MethodSettings:
    """``values[method][key]``, ``sources[method][key]`` and ``main_weight[method]`` (the weight the tuning
    grid varies; absent for methods without one)."""

    values: dict
    sources: dict
    main_weight: dict
    path: str

    def of(self, method: str) -> dict:
        return dict(self.values.get(method, {}))

    def learning_rate_factor(self, method: str) -> float:
        return float(self.values.get(method, {}).get(LEARNING_RATE_FACTOR, 1.0))

    def to_json(self) -> dict:
        return {"format": FORMAT, "methods": {m: {k: {"value": v, "source": self.sources[m][k]} for k, v in keys.items()}
                                              for m, keys in self.values.items()},
                "main_weight": dict(self.main_weight)}


def load_method_settings(path: str | Path | None = None) -> MethodSettings:
    """Read and check a settings file (default: the versioned one). Refuses unknown methods and keys, a value
    without its source, and weights that are not numbers of at least 0."""
    from cimis.incremental.strategies import STRATEGIES

    path = Path(path) if path else DEFAULT_PATH
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CimisError(f"cannot read method settings {path}: {exc}", "give a cimis-method-settings JSON file") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("methods"), dict):
        raise CimisError(f"{path} is not a {FORMAT} file", "give a file of the form of cimis/incremental/method_settings.json")
    values, sources = {}, {}
    for method, entries in data["methods"].items():
        if method not in STRATEGIES:
            raise CimisError(f"{path}: unknown method {method!r}", f"methods: {', '.join(STRATEGIES)}")
        values[method], sources[method] = {}, {}
        for key, entry in entries.items():
            if key not in KEYS:
                raise CimisError(f"{path}: unknown setting {key!r} of {method}", f"settings: {', '.join(KEYS)}")
            if not isinstance(entry, dict) or "value" not in entry or not str(entry.get("source", "")).strip():
                raise CimisError(f"{path}: {method}.{key} must be {{\"value\": ..., \"source\": \"where it came from\"}}")
            values[method][key] = _checked(path, method, key, entry["value"])
            sources[method][key] = str(entry["source"])
    main_weight = dict(data.get("main_weight", {}))
    for method, key in main_weight.items():
        if key not in OPTION_KEYS:
            raise CimisError(f"{path}: main weight {key!r} of {method} is not a loss weight")
    return MethodSettings(values, sources, main_weight, str(path))


def _checked(path: Path, method: str, key: str, value):
    if key == "head_init":
        if value not in ("balanced", "random"):
            raise CimisError(f"{path}: {method}.head_init must be balanced or random, not {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise CimisError(f"{path}: {method}.{key} must be a number of at least 0, not {value!r}")
    if key == LEARNING_RATE_FACTOR and value == 0:
        raise CimisError(f"{path}: {method}.{key} must be positive")
    return float(value)


def resolve_options(strategy: str, options, settings: MethodSettings | None = None):
    """``options`` (a :class:`~cimis.incremental.base.StepOptions`) with every unset per-method field taken
    from ``settings`` (default: the versioned file). Fields the method has no setting for stay unset."""
    settings = settings or load_method_settings()
    given = settings.of(strategy)
    filled = {k: given[k] for k in OPTION_KEYS if getattr(options, k) is None and k in given}
    return replace(options, **filled) if filled else options


def parse_option_overrides(pairs: list[str] | None) -> dict:
    """``["kd_weight=1.25", "head_init=random", "pseudo_labels=false"]`` -> a dict for StepOptions."""
    from cimis.incremental.base import StepOptions

    known = {f.name for f in fields(StepOptions)}
    out = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in known:
            raise CimisError(f"bad step option {pair!r}", f"write KEY=VALUE with KEY one of {', '.join(sorted(known))}")
        try:
            value = json.loads(text)
        except ValueError:
            value = text.strip()
        out[key] = value
    return out
