"""Inputs for ``edgesplit infer``: a .npy array as is, or an image preprocessed exactly as timm does.

A model is only as good as its preprocessing: a ViT trained with mean/std 0.5, bicubic
resizing and a 0.9 center crop gives other answers on ImageNet-normalised bilinear input.
So ``edgesplit partition`` stores timm's eval data config in the manifest
(``extra["data_config"]``) and images go through ``timm.data.create_transform`` with it.
Without one (a model stored by an older edgesplit, or not from timm) an image is resized
to the input and ImageNet-normalised, as before.

Everything a user can get wrong is an :class:`InputFileError` (one line, exit status 2),
found before the request is sent: a directory, an .npz archive, non-numeric values, a shape
that is not the model's, an image Pillow cannot read or one above its decompression-bomb cap
(``PIL.Image.MAX_IMAGE_PIXELS``, about 89 megapixels: Pillow only warns up to twice that, we
refuse), and an ``--output`` whose directory is missing or read-only.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgesplit.partitioner.errors import UsageError

from .errors import BadInput

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash", "border")
NUMERIC_KINDS = "biuf"  # numpy dtype kinds taken as input: bool, int, uint, float (cast to float32)


class InputFileError(BadInput, UsageError):
    """The input file cannot be read, or does not fit the model: the user's to fix (exit status 2)."""


def load_input(path: str, input_shape: list[int], data_config: dict | None = None) -> torch.Tensor:
    """A float32 batch ``(B, *input_shape)`` from a .npy file or an image.

    Args:
        path: a .npy array (one sample, or a batch with the leading batch dimension; object
            arrays are refused, never unpickled) or an image (.png, .jpg, ... : anything Pillow reads).
        input_shape: the model's per-sample input, e.g. ``[3, 224, 224]``.
        data_config: timm's eval preprocessing from the manifest (input_size, interpolation,
            mean, std, crop_pct, crop_mode); None: resize and ImageNet-normalise.
    Returns:
        The batch, float32 on the CPU.
    Raises:
        InputFileError: missing or unreadable file (or a directory, an .npz archive, non-numeric
            values), an array whose shape is not the model's, Pillow absent, an image above
            Pillow's decompression-bomb cap (``Image.MAX_IMAGE_PIXELS``, about 89 megapixels:
            refused, not just warned about), or an image for a model that does not take RGB images.
    """
    p = check_input_file(path)
    if p.suffix.lower() == ".npy":
        return check_batch(p, _load_npy(p), list(input_shape))
    return _load_image(p, list(input_shape), data_config).unsqueeze(0)  # (3, H, W) -> (1, 3, H, W)


def check_input_file(path: str) -> Path:
    """``path`` if it names a file; checked before connecting, so a typo costs no round trip."""
    p = Path(path)
    if p.is_dir():
        raise InputFileError(f"input {p} is a directory, not a file (--input takes a .npy array or an image)")
    if not p.is_file():
        raise InputFileError(f"input file {p} does not exist")
    return p


def check_output(path: str) -> str:
    """The file ``np.save(path, ...)`` will write (it adds ``.npy``), checked before the request is sent.

    A result is only worth computing if it can be kept: a missing or read-only directory is
    the user's to fix, and saying so after the request ran would waste it.

    Raises:
        InputFileError: the directory is missing or not writable, or the path is a directory.
    """
    out = Path(path if path.endswith(".npy") else path + ".npy")
    where = out.parent
    if out.is_dir():
        raise InputFileError(f"--output {out} is a directory; give a file name, e.g. {out / 'out.npy'}")
    if not where.is_dir():
        raise InputFileError(f"--output {path}: directory {where} does not exist; make it first or save elsewhere")
    if not os.access(where, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise InputFileError(f"--output {path}: {out if out.exists() else where} is not writable; save elsewhere")
    return str(out)


def check_batch(p: Path, x: torch.Tensor, input_shape: list[int]) -> torch.Tensor:
    """``x`` as a batch ``(B, *input_shape)`` (one sample gains the batch dimension); a misfit is refused here,
    before anything is sent, rather than by the first stage after a round trip."""
    if list(x.shape) == input_shape:
        x = x.unsqueeze(0)  # (*input_shape) -> (1, *input_shape)
    if x.dim() > 0 and x.shape[0] == 0:
        raise InputFileError(f"{p} holds an empty batch (shape {list(x.shape)}); give at least one sample")
    if list(x.shape[1:]) != input_shape:
        batch = ", ".join(["B", *map(str, input_shape)])
        raise InputFileError(f"{p} holds an array of shape {list(x.shape)}, but the model takes {input_shape} per "
                             f"sample: give one sample {input_shape} or a batch [{batch}]")
    return x


def _load_npy(p: Path) -> torch.Tensor:
    try:
        arr = np.load(p, allow_pickle=False)
    except ValueError as e:
        if "Object arrays" in str(e):
            raise InputFileError(f"{p} is not a plain .npy array (it holds Python objects); object arrays are "
                                 "refused, never unpickled") from None
        if "pickled" in str(e):  # numpy's guess for any file without the .npy header
            raise InputFileError(f"{p} is not an .npy array (no .npy header; pickles are refused, never "
                                 "unpickled); save one with np.save") from None
        raise InputFileError(f"{p} is not a valid .npy file ({e})") from None
    except (OSError, EOFError) as e:
        raise InputFileError(f"cannot read {p}: {e}") from None
    if not isinstance(arr, np.ndarray):  # np.load opens a zip (.npz) whatever the file is called
        close = getattr(arr, "close", None)
        if close is not None:
            close()
        raise InputFileError(f"{p} is an .npz archive, not an .npy array; save one array with np.save")
    if arr.dtype.kind not in NUMERIC_KINDS:
        raise InputFileError(f"{p} holds {arr.dtype} values; the model takes numbers (bool, int, uint or float "
                             "arrays; not complex, strings, objects or records)")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def _open_rgb(p: Path) -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise InputFileError("reading images needs Pillow: pip install 'edgesplit[images]' (or pass a .npy "
                             "array)") from None
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that, then decodes anyway: an image that
        # large is refused here too, so the cap is Pillow's own (about 89 megapixels)
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(p) as img:
                return img.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise InputFileError(f"image {p} is too large to read safely ({e}); scale it down (the model "
                                 "takes a few hundred pixels a side)") from None
        except (OSError, ValueError, SyntaxError) as e:  # PIL.UnidentifiedImageError is an OSError; broken
            raise InputFileError(f"cannot read image {p}: {e}") from None  # chunks raise the other two


def _load_image(p: Path, input_shape: list[int], data_config: dict | None) -> torch.Tensor:
    if len(input_shape) != 3 or input_shape[0] != 3:
        raise InputFileError(f"the model's input is {input_shape}, not an RGB image; pass a .npy array")
    img = _open_rgb(p)
    if data_config is None:
        return _imagenet_resize(img, input_shape)
    from timm.data import create_transform

    cfg = check_data_config(data_config, input_shape)
    x = create_transform(**cfg, is_training=False)(img)  # PIL (W, H) -> (3, H, W) float, normalised
    if list(x.shape) != input_shape:
        raise InputFileError(f"preprocessing {p} with {cfg} gave {list(x.shape)}, but the model takes "
                             f"{input_shape}; partition the model again")
    return x.float()


def _imagenet_resize(img: Any, input_shape: list[int]) -> torch.Tensor:
    """The fallback without a data config: bilinear resize to the input, ImageNet mean/std."""
    from PIL import Image

    img = img.resize((input_shape[2], input_shape[1]), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def check_data_config(cfg: Any, input_shape: list[int]) -> dict[str, Any]:
    """The manifest's data config as ``create_transform`` keywords, checked (it came over the wire).

    Raises:
        InputFileError: a key or value timm would not take, or an input size other than the model's.
    """
    def bad(why: str) -> InputFileError:
        return InputFileError(f"the model's data config {cfg!r} is unusable ({why}); partition the model again")

    if not isinstance(cfg, dict):
        raise bad("not a map")
    size, mean, std = cfg.get("input_size"), cfg.get("mean"), cfg.get("std")
    if not (isinstance(size, (list, tuple)) and len(size) == 3 and all(isinstance(v, int) for v in size)):
        raise bad("input_size is not [C, H, W]")
    if list(size) != input_shape:
        raise bad(f"input_size {list(size)} is not the model's input {input_shape}")
    for name, vals in (("mean", mean), ("std", std)):
        if not (isinstance(vals, (list, tuple)) and len(vals) == 3
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)):
            raise bad(f"{name} is not 3 numbers")
    if any(v <= 0 for v in std):
        raise bad("std must be positive")
    interpolation = cfg.get("interpolation", "bilinear")
    crop_pct, crop_mode = cfg.get("crop_pct"), cfg.get("crop_mode", "center")
    if interpolation not in INTERPOLATIONS:
        raise bad(f"interpolation is not one of {INTERPOLATIONS}")
    if crop_mode not in CROP_MODES:
        raise bad(f"crop_mode is not one of {CROP_MODES}")
    if crop_pct is not None and not (isinstance(crop_pct, (int, float)) and 0 < crop_pct <= 1):
        raise bad("crop_pct is not in (0, 1]")
    return {"input_size": tuple(size), "interpolation": interpolation, "mean": tuple(float(v) for v in mean),
            "std": tuple(float(v) for v in std), "crop_pct": crop_pct, "crop_mode": crop_mode}
