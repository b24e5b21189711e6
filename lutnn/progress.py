"""One progress-bar factory so every long loop looks and behaves the same."""
from __future__ import annotations

import os
from typing import Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str, total: int | None = None, **kwargs) -> Iterable[T]:
    """tqdm bar, silenced by ``LUTNN_NO_PROGRESS=1`` (CI logs, worker processes)."""
    disable = kwargs.pop("disable", False) or os.environ.get("LUTNN_NO_PROGRESS") == "1"
    return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, leave=False, disable=disable, **kwargs)
