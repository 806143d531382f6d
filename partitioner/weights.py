"""Where a partitioned model's weights come from, and how its inputs are preprocessed.

Three sources, recorded in the manifest (``extra["weights"]``) so nobody mistakes a
random-init model's outputs for predictions: ``random`` (timm's init), ``pretrained``
(timm's hub), ``file`` (a user's safetensors or PyTorch checkpoint, with its SHA-256).

A user's file is never unpickled: safetensors holds no code, and a PyTorch checkpoint is
read with ``torch.load(weights_only=True)``, which rebuilds tensors and plain containers
only (a pickle can otherwise run any code on load). timm's own ``load_checkpoint`` is
weights-only in recent releases (1.0.31 here) but not in every release we accept, and on a
mismatch it raises torch's many-line error; so we read the file ourselves.

Errors are :class:`UsageError` (the user named a wrong model, kwarg or file) with one line
that says what to do.
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import os
import pickle
import struct
import warnings
from typing import Any

import torch
from torch import nn

from .errors import UsageError

# checkpoint keys that wrap a state dict, in timm's order of preference (EMA weights first)
WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
# prefixes that DDP and torch.compile add to every key
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
SHOW_KEYS = 4  # keys named per kind of mismatch in an error line
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive
PICKLE_PROTOCOLS = range(2, 6)  # a legacy torch.save (or a bare pickle) starts with 0x80 and its protocol
# what torch.load raises on a file that has a torch file's first bytes but is damaged or truncated
DAMAGED_TORCH = (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError,
                 struct.error)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def create_timm_model(arch: str, kwargs: dict[str, Any], pretrained: bool = False) -> nn.Module:
    """``timm.create_model`` in eval mode, with every user mistake turned into one line.

    Args:
        arch: timm model name.
        kwargs: ``create_model`` keywords (``--kwarg``).
        pretrained: fetch timm's pretrained weights from the hub.
    Raises:
        UsageError: unknown name, keywords the model does not take, no weights or no network.
    """
    import timm

    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        raise UsageError(f"timm has no model {arch!r}" + (f"; similar: {', '.join(close)}" if close else "")
                         + "; list them with `python -c \"import timm; print(timm.list_models('vit*'))\"`")
    try:
        return timm.create_model(arch, pretrained=pretrained, **kwargs).eval()
    except OSError as e:  # hub or download: no network, no cache, HF_HUB_OFFLINE, a proxy refusing
        raise UsageError(f"could not download pretrained weights for {arch} (no network or no hub access? "
                         f"{type(e).__name__}: {_first_line(e)}); download them elsewhere and pass "
                         "--weights FILE") from None
    except RuntimeError as e:
        if pretrained and "pretrained" in str(e).lower():
            raise UsageError(f"timm has no pretrained weights for {arch} ({_first_line(e)}); drop --pretrained "
                             "or pass --weights FILE") from None
        raise UsageError(f"cannot build {arch} with {kwargs}: {_first_line(e)}") from None
    except (TypeError, ValueError, AssertionError, KeyError) as e:  # timm asserts on constructor invariants
        raise UsageError(f"cannot build {arch} with --kwarg {kwargs}: {type(e).__name__}: {_first_line(e)}") from None


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _torch_load(path: str) -> Any:
    """A PyTorch checkpoint through the weights-only unpickler (argparse.Namespace allowed, as timm does:
    timm's training checkpoints keep their ``args`` in one, and rebuilding it runs no code).

    torch's warnings (e.g. "Detected pickle protocol 4") are silenced: the caller turns every outcome
    into one line of its own, and torch's advice on a refusal is to load the file unsafely.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not hasattr(torch.serialization, "safe_globals"):  # torch < 2.5: weights-only, no allowances
            return torch.load(path, map_location="cpu", weights_only=True)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)


def sniff_format(path: str) -> str:
    """``"safetensors"``, ``"torch"`` (zip or legacy pickle) or ``""`` from a file's first bytes, not its name.

    safetensors: an 8-byte little-endian header length that fits the file, then a JSON object.
    """
    with open(path, "rb") as f:
        head = f.read(9)
        size = os.fstat(f.fileno()).st_size
    if len(head) == 9 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    if head.startswith(ZIP_MAGIC) or (len(head) >= 2 and head[0] == 0x80 and head[1] in PICKLE_PROTOCOLS):
        return "torch"
    return ""


def read_state_dict(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """A state dict from a safetensors file or a PyTorch/timm checkpoint, never unpickled in full.

    Args:
        path: ``.safetensors``, or a ``torch.save`` file (``.pth``, ``.pt``, ``.bin``, ``.pth.tar``, ...).
    Returns:
        (name -> tensor, the wrapper key it was under, or "" for a bare state dict).
    Raises:
        UsageError: missing, a directory, neither format by its first bytes, damaged, pickled objects other
            than tensors (torch's advice to load it unsafely is never passed on), no state dict inside.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if os.path.isdir(path):
        raise UsageError(f"weights file {path} is a directory; give the checkpoint file inside it")
    if not os.path.exists(path):
        raise UsageError(f"weights file {path} does not exist")
    try:
        kind = sniff_format(path)
    except OSError as e:
        raise UsageError(f"cannot read weights file {path}: {e.strerror or e}") from None
    if kind == "safetensors" or path.endswith(".safetensors"):
        try:
            return load_file(path), ""
        except (SafetensorError, OSError, ValueError) as e:
            raise UsageError(f"{path} is not a readable safetensors file ({_first_line(e)})") from None
    if not kind:
        raise UsageError(f"{path} is not a checkpoint (neither safetensors nor a torch file); give a "
                         ".safetensors state_dict or a torch.save file")
    try:
        ckpt = _torch_load(path)
    except pickle.UnpicklingError:  # torch's text advises loading it unsafely: never quoted
        raise UsageError(f"{path} holds pickled objects beyond tensors; edgesplit reads checkpoints weights-only and "
                         "never unpickles code: re-save it as safetensors "
                         "(safetensors.torch.save_file(model.state_dict(), 'w.safetensors'))") from None
    except DAMAGED_TORCH as e:
        raise UsageError(f"{path} starts like a torch file but cannot be read ({type(e).__name__}); is it truncated "
                         "or damaged? Re-save it, as safetensors if you can") from None
    key = next((k for k in WRAPPER_KEYS if isinstance(ckpt, dict) and isinstance(ckpt.get(k), dict)), "")
    state = ckpt[key] if key else ckpt
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{path} holds no state dict (expected name -> tensor, possibly under one of "
                         f"{list(WRAPPER_KEYS)}; found {type(state).__name__})")
    clean = {}
    for name, tensor in state.items():
        for prefix in WRAPPER_PREFIXES:
            name = name.removeprefix(prefix)
        clean[name] = tensor
    return clean, key


def _some(keys: list[str]) -> str:
    more = f" (+{len(keys) - SHOW_KEYS} more)" if len(keys) > SHOW_KEYS else ""
    return ", ".join(keys[:SHOW_KEYS]) + more


def load_weights(model: nn.Module, path: str, arch: str = "the model") -> dict[str, Any]:
    """Load a weights file into ``model`` (every key and shape must match); return the manifest's record of it.

    Raises:
        UsageError: the file is unreadable, or its names or shapes differ from the model's (a few are named).
    """
    state, key = read_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in set(own) & set(state)
                    if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        parts = [f"missing {len(missing)}: {_some(missing)}" if missing else "",
                 f"unexpected {len(unexpected)}: {_some(unexpected)}" if unexpected else "",
                 f"shape (file vs model) {len(shapes)}: {_some(shapes)}" if shapes else ""]
        raise UsageError(f"weights {path} do not fit {arch}: " + "; ".join(p for p in parts if p)
                         + ". Were they saved from this model with the same --kwarg values?")
    model.load_state_dict(state, strict=True)
    return {"source": "file", "file": os.path.basename(path), "file_sha256": file_sha256(path),
            **({"file_key": key} if key else {})}


def pretrained_record(model: nn.Module) -> dict[str, Any]:
    """The manifest's record of timm hub weights: which tag and hub id they came from."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {"source": "pretrained", "tag": cfg.get("tag"), "hf_hub_id": cfg.get("hf_hub_id"), "url": cfg.get("url")}


def timm_data_config(model: nn.Module, input_shape: list[int]) -> dict[str, Any] | None:
    """timm's eval preprocessing for ``model`` (resize, crop, mean, std), JSON-safe, or None if it has none.

    ``input_size`` is the model's real input, not its pretrained config's: timm's
    ``resolve_data_config`` reads the config, which still says 224 for a ViT built with
    ``img_size=32``. None when the channel count does not match the config's mean (a
    1-channel model built from an RGB config): images cannot be preprocessed for it.
    """
    from timm.data import resolve_data_config

    if getattr(model, "pretrained_cfg", None) is None or len(input_shape) != 3:
        return None
    cfg = resolve_data_config({"input_size": tuple(int(v) for v in input_shape)}, model=model)
    if len(cfg["mean"]) != input_shape[0] or len(cfg["std"]) != input_shape[0]:
        return None
    return {"input_size": [int(v) for v in cfg["input_size"]], "interpolation": str(cfg["interpolation"]),
            "mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]],
            "crop_pct": float(cfg["crop_pct"]), "crop_mode": str(cfg["crop_mode"])}
