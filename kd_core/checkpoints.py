"""Weights from files users bring: a pretrained teacher, a student's initialisation.

Files are read with `torch.load(weights_only=True)`, so nothing in them is unpickled as code.
The common wrappers are unpacked: a bare state dict, `{"state_dict": ...}`, `{"model": ...}`
(RepDistiller, mdistiller), `{"net": ...}`, or any key given as `key`; a `module.` prefix from
DataParallel/DDP is dropped. Every mismatch is one `CheckpointError` naming the file and the
problem.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

WRAPPER_KEYS = ("state_dict", "model", "net", "model_state_dict", "student", "teacher")
SHOWN = 5  # keys listed in a message


class CheckpointError(ValueError):
    """A weights file that cannot be used: unreadable, not a state dict, or not this model's."""


def sha256_file(path: str | Path) -> str:
    """The file's content hash (hex): stage keys use it, so a changed file is never reused stale."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def load_tensors(path: str | Path) -> Any:
    """`torch.load(path, weights_only=True)`: tensors and plain containers, never code.

    Raises CheckpointError naming the file when it is missing, unreadable or truncated, or holds
    a pickled object whose loading could run code (torch's own message, which suggests
    `weights_only=False`, is never shown).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if found is None:  # not a pickle of objects: garbage or a damaged file
            raise CheckpointError(f"checkpoint {path}: unreadable or truncated (not a PyTorch file)") from None
        raise CheckpointError(f"checkpoint {path}: refused, it holds a pickled object ({found.group(1)}) whose "
                              "loading could run code; save a plain state dict (tensors only)") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise CheckpointError(f"checkpoint {path}: unreadable or truncated ({type(error).__name__})") from None


def read_state_dict(path: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict in `path` (unwrapped, `module.` prefix removed).

    Raises CheckpointError when the file is missing, unreadable or truncated, would need
    unpickling code, or holds no state dict (under `key`, when given).
    """
    path = Path(path)
    loaded = load_tensors(path)
    if key is not None:
        if not isinstance(loaded, Mapping) or key not in loaded:
            found = ", ".join(map(repr, list(loaded)[:SHOWN])) if isinstance(loaded, Mapping) else type(loaded).__name__
            raise CheckpointError(f"checkpoint {path}: no key {key!r} (found {found})")
        loaded = loaded[key]
    elif isinstance(loaded, Mapping) and not _is_state_dict(loaded):
        loaded = next((loaded[k] for k in WRAPPER_KEYS if _is_state_dict(loaded.get(k))), loaded)
    if not _is_state_dict(loaded):
        raise CheckpointError(f"checkpoint {path}: no state dict found (give checkpoint_key: the key that "
                              "holds it)")
    if all(k.startswith("module.") for k in loaded):
        loaded = {k.removeprefix("module."): v for k, v in loaded.items()}
    return dict(loaded)


def _listed(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, *,
                 new_head: bool = False) -> list[str]:
    """Load `state` into `model`, strictly; returns notes for the log.

    With `new_head`, classifier weights (`head.*`) whose shapes differ are left as initialised
    (a new head for another class count), and a note says so. Raises CheckpointError naming
    missing keys, unexpected keys and shape mismatches (the first few of each).
    """
    own = model.state_dict()
    mismatched = sorted(k for k in state.keys() & own.keys() if state[k].shape != own[k].shape)
    notes, kept_own = [], set()
    if new_head and mismatched and all(k.startswith("head.") for k in mismatched):
        notes.append(f"{source}: new classifier head ({', '.join(mismatched)}: the class count differs)")
        kept_own, mismatched = set(mismatched), []
        state = {k: v for k, v in state.items() if k not in kept_own}
    missing = sorted(own.keys() - state.keys() - kept_own)
    unexpected = sorted(state.keys() - own.keys())
    problems = [f"{state[k].shape[0]} classes in the checkpoint, {own[k].shape[0]} in the data"
                for k in mismatched if k.startswith("head.") and k.endswith("fc.weight")]
    if mismatched:
        problems.append("shape mismatch " + _listed(
            [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched]))
    if missing:
        problems.append(f"missing keys {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listed(unexpected)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the architecture: {'; '.join(problems)}")
    model.load_state_dict({**own, **state})
    return notes
