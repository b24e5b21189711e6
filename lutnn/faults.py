"""Fault injection: ``LUTNN_FAULT=<point>[@N]`` SIGKILLs the process the N-th time ``<point>`` is reached.

The pipeline promises that re-running a killed command finishes the run with the same results as an
uninterrupted one; ``tests/test_faults.py`` proves it by killing a subprocess at each point below. A
real ``SIGKILL`` (not an exception) is used so that no ``finally`` block, atexit handler or buffered
write gets a chance to tidy up, exactly as with an OOM kill or a pre-empted node.

Points: ``teacher_step``, ``lut_step`` (after an optimiser step), ``calibrated`` (rows captured,
before k-means), ``kmeans_layer`` (after a layer's k-means), ``checkpoint_tmp`` (temp files written,
nothing renamed), ``checkpoint_best`` (``best.pt`` renamed, ``last.pt`` not yet), ``eval_model``
(before each model of the final evaluation), ``results_tmp`` (results written to a temp file).
"""
from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "LUTNN_FAULT"
_hits: Counter[str] = Counter()


def fault_point(name: str) -> None:
    """Kill this process here if ``$LUTNN_FAULT`` names this point (and this is its N-th hit)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, nth = spec.partition("@")
    if point != name:
        return
    _hits[name] += 1
    if _hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
