"""PyTorch checkpoint files (``.pt``, ``.pth``, ``.bin``), loaded only with ``weights_only=True``.

A pickle can run any code while it loads; torch's ``weights_only`` unpickler refuses
every global outside its allow-list. We never load any other way: a refusal becomes an
:class:`UnsafeCheckpointError` that names the global and says how to re-save the file.
Zip-format files are memory-mapped, so listing names or reading one tensor does not
read the rest.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from modelfuse.errors import CheckpointError, UnsafeCheckpointError

#: keys under which training scripts nest the model's state_dict, tried in this order
UNWRAP_KEYS = ("state_dict", "model_state_dict", "model", "module")
#: top-level entries that hold training state rather than weights
TRAINING_STATE_KEYS = frozenset(
    {"optimizer", "optimizer_state_dict", "optimizer_states", "lr_scheduler", "scheduler", "scaler"}
)

_GLOBAL = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")
_OPERAND = re.compile(r"Unsupported operand (\d+)")
_REASON = re.compile(r"(WeightsUnpickler error: [^\n]*|Trying to load unsupported [^\n]*)")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load the named tensors in a PyTorch file safely (``weights_only=True``, mmap for zip files)."""
    is_zip = zipfile.is_zipfile(path)
    if not is_zip:
        try:
            with open(path, "rb") as f:
                start = f.read(4)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read this file ({exc})") from exc
        if start == b"PK\x03\x04":
            raise CheckpointError(
                f"{path}: cannot read this PyTorch file: it starts as a zip archive (torch.save's format) "
                "but its end is missing or damaged (truncated download?). Re-download or re-save it."
            )
        if start[:1] != b"\x80":  # every torch.save output is a zip archive or starts with a pickle PROTO
            raise CheckpointError(
                f"{path}: not a PyTorch checkpoint: it is neither a zip archive (torch.save's format) nor a "
                "pickle. Check the file, or re-download or re-save it."
            )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():
            raise unsafe_error(path, exc) from exc
        raise CheckpointError(
            f"{path}: cannot read this PyTorch file ({exc}). It is damaged or not a PyTorch checkpoint; "
            "re-download or re-save it."
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError) as exc:
        raise CheckpointError(
            f"{path}: cannot read this PyTorch file ({type(exc).__name__}: {exc}). It is damaged or not "
            "a PyTorch checkpoint; re-download or re-save it."
        ) from exc
    return tensors_from_object(obj, str(path))


def unsafe_error(path: Path, exc: BaseException) -> UnsafeCheckpointError:
    """Turn torch's weights_only refusal into a message that says what, why and how to fix."""
    text = str(exc)
    found = _GLOBAL.search(text)
    operand = _OPERAND.search(text)
    if found:
        name = found.group(1)
        what = f"it references the global {name}, which is not on torch's weights_only allow-list"
        last = name.rsplit(".", 1)[-1]
        if last[:1].isupper():
            what += (
                f" (the file holds a pickled {last} object, e.g. a whole model saved with "
                "torch.save(model) rather than its state_dict)"
            )
    elif operand:
        what = (
            f"it uses pickle operation {operand.group(1)}, which torch's weights_only loader does not allow "
            "(the file is damaged, not a state_dict, or made to run code)"
        )
    else:
        reason = _REASON.search(text)
        what = (
            f"torch's weights_only loader rejected it ({reason.group(1) if reason else text.splitlines()[0]})"
        )
    return UnsafeCheckpointError(
        f"{path}: refused to unpickle this file: {what}. Loading it could execute arbitrary code. "
        "If you trust where it came from, load it in that trusted environment and re-save the weights "
        "as a state_dict with torch.save(model.state_dict(), path) or as safetensors "
        "(modelfuse.io.save_state_dict(model, 'model.safetensors'))."
    )


def _has_tensor(obj: Mapping) -> bool:
    return any(
        isinstance(v, torch.Tensor) or (isinstance(v, Mapping) and _has_tensor(v)) for v in obj.values()
    )


def tensors_from_object(obj: object, where: str) -> dict[str, torch.Tensor]:
    """The named tensors in a loaded checkpoint object.

    A dict holding the weights under ``state_dict``/``model_state_dict``/``model``/``module``
    is unwrapped; nested dicts are flattened with dotted names; anything that is not a
    tensor (epochs, hyper-parameters, optimizer state) is left out.
    """
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        kind = "a single tensor" if isinstance(obj, torch.Tensor) else f"a {type(obj).__name__}"
        raise CheckpointError(
            f"{where}: holds {kind}, not a dict of named tensors (a state_dict). "
            "Re-save it with torch.save(model.state_dict(), path)."
        )
    unwrapped = True
    while unwrapped:
        unwrapped = False
        for key in UNWRAP_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and _has_tensor(inner):
                obj, unwrapped = inner, True
                break
    out: dict[str, torch.Tensor] = {}
    _flatten(obj, "", out, where, top=True)
    if not out:
        keys = ", ".join(repr(k) for k in list(obj)[:10]) or "none"
        raise CheckpointError(
            f"{where}: holds no tensors (top-level keys: {keys}). Expected a state_dict: a dict "
            "of parameter names to tensors, e.g. saved with torch.save(model.state_dict(), path)."
        )
    return out


def _flatten(obj: Mapping, prefix: str, out: dict[str, torch.Tensor], where: str, *, top: bool) -> None:
    for key, value in obj.items():
        if not isinstance(key, str) or (
            top and key in TRAINING_STATE_KEYS and not isinstance(value, torch.Tensor)
        ):
            continue
        name = prefix + key
        if isinstance(value, torch.Tensor):
            if name in out:
                raise CheckpointError(f"{where}: the tensor name {name!r} occurs twice after flattening")
            out[name] = value
        elif isinstance(value, Mapping):
            _flatten(value, name + ".", out, where, top=False)
