"""Fault points for the fault-injection tests (docs/worker-protocol.md): the worker pauses where
``CIMIS_WORKER_PAUSE_AT`` says, so that a test can ``kill -9`` it exactly there."""

from __future__ import annotations

import os
import time

from cimis.worker.events import EventStream

PAUSE_ENV = "CIMIS_WORKER_PAUSE_AT"  # fault-injection tests: "POINT[,POINT]" pauses there (docs/worker-protocol.md)
PAUSE_SECONDS = 120.0


def pause_point(point: str, events: EventStream) -> None:
    """For fault-injection tests: when ``CIMIS_WORKER_PAUSE_AT`` names ``point``, report it and wait, so
    a test can ``kill -9`` the worker exactly there. Does nothing otherwise."""
    wanted = os.environ.get(PAUSE_ENV, "")
    if point in {p.strip() for p in wanted.split(",") if p.strip()}:
        events.emit("paused", point=point)
        time.sleep(PAUSE_SECONDS)
