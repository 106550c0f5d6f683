"""The methods a benchmark compares: the strategies of METHOD.md section 8 and ablated variants of them.

A method name is a strategy name (``ft``, ``pgcd-dapd``, ...), optionally followed by switches of METHOD.md
section 7 turned off: ``pgcd-dapd-no-spatial-weight`` is ``pgcd-dapd`` with ``spatial_weight`` off.
"""

from __future__ import annotations

from dataclasses import dataclass

from cimis.errors import CimisError
from cimis.incremental.base import StepOptions
from cimis.incremental.strategies import STRATEGIES

# Table order: the upper bound, the lower bound, the baselines, our method.
DEFAULT_METHODS = ("joint", "ft", "pseudo-labels", "lwf", "ilt", "mib", "plop", "pgcd-dapd")
# METHOD.md section 7's ablation switches (StepOptions fields), each on in pgcd-dapd.
ABLATION_SWITCHES = ("pseudo_labels", "spatial_weight", "channel_weight", "output_term", "dapd_global", "dapd_local",
                     "dynamic_background")
_NO = "-no-"


@dataclass(frozen=True)
class Method:
    """A benchmark method: a strategy plus the ablation switches it turns off."""

    name: str
    strategy: str
    off: tuple[str, ...] = ()

    def options(self) -> StepOptions:
        return StepOptions.from_json({switch: False for switch in self.off})


def parse_method(name: str) -> Method:
    """The method called ``name``: ``STRATEGY`` or ``STRATEGY-no-SWITCH[-no-SWITCH...]``."""
    text = name.strip()
    strategy, *switches = text.split(_NO)
    if strategy not in STRATEGIES:
        raise CimisError(f"unknown method {name!r}",
                         f"use one of {', '.join(DEFAULT_METHODS)}, optionally with -no-SWITCH "
                         f"(switches: {', '.join(s.replace('_', '-') for s in ABLATION_SWITCHES)})")
    off = []
    for switch in switches:
        key = switch.replace("-", "_")
        if key not in ABLATION_SWITCHES:
            raise CimisError(f"method {name!r} turns off an unknown switch {switch!r}",
                             f"switches: {', '.join(s.replace('_', '-') for s in ABLATION_SWITCHES)}")
        off.append(key)
    return Method(text, strategy, tuple(off))


def parse_methods(names: list[str]) -> list[Method]:
    """Methods by name, refusing an empty list and repeats."""
    methods = [parse_method(n) for n in names if n.strip()]
    if not methods:
        raise CimisError("no method to benchmark", f"name some of {', '.join(DEFAULT_METHODS)}")
    seen = [m.name for m in methods]
    repeated = sorted({n for n in seen if seen.count(n) > 1})
    if repeated:
        raise CimisError(f"methods {repeated} are listed twice")
    return methods


def inert_switches(options: StepOptions | None = None) -> tuple[str, ...]:
    """Switches that change nothing under ``options`` (pgcd-dapd's method settings when None): the channel
    weight only weighs the feature term, which is off by default (lambda_f = 0, docs/method.md)."""
    from cimis.incremental.method_settings import resolve_options

    options = resolve_options("pgcd-dapd", options or StepOptions())
    return ("channel_weight",) if options.lambda_f == 0 else ()


def ablation_methods() -> list[str]:
    """``pgcd-dapd`` with every switch on, then with each switch of METHOD.md section 7 off in turn; a switch
    that changes nothing under the default options (:func:`inert_switches`) is not run."""
    inert = inert_switches()
    return ["pgcd-dapd"] + [f"pgcd-dapd{_NO}{s.replace('_', '-')}" for s in ABLATION_SWITCHES if s not in inert]
