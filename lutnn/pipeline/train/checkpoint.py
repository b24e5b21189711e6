"""Epoch checkpoints holding everything needed to continue a run bit-for-bit."""
from __future__ import annotations

import pickle
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...faults import fault_point
from ...io import atomic_path


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read back; the message names the file."""


def rng_state() -> dict[str, Any]:
    """All RNG states as tensors and plain tuples, so checkpoints load with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_checkpoint(path: Path, state: dict[str, Any], best_path: Path | None = None) -> None:
    """Write ``path`` (and a copy at ``best_path``) atomically: temp files, then renames.

    ``best_path`` is renamed before ``path``. A kill between the two renames leaves ``path`` one
    epoch behind; the resumed run redoes that epoch exactly and rewrites ``best_path``. (The other
    order left a stale ``best.pt`` that no later epoch would replace.)
    """
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        if best_path is None:
            fault_point("checkpoint_tmp")
        else:
            with atomic_path(best_path) as best_tmp:
                shutil.copyfile(tmp, best_tmp)
                fault_point("checkpoint_tmp")
            fault_point("checkpoint_best")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """``torch.load`` on CPU, weights only; a truncated or corrupt file is a one-line :class:`CheckpointError`.

    ``torch.load`` does not check the zip's CRC-32s (a flipped bit loads as a wrong weight), so the
    archive is verified first; files in the legacy non-zip format are loaded unchecked.
    """
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
            if bad is not None:
                raise CheckpointError(f"{path}: corrupt checkpoint (CRC mismatch in {bad})")
        return torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({why})") from None
