"""Content-addressed block store: ``<root>/blocks/<id>.safetensors`` and ``<root>/models/<name>.json``.

A block's id is the SHA-256 of a canonical encoding of its tensors (sorted names, dtype,
shape, raw little-endian bytes), so blocks that models share are stored once. Files are
safetensors (never pickle), written to a temporary name and renamed into place, so a
half-written block is never visible under its id. Every read re-hashes the tensors.
"""
from __future__ import annotations

import hashlib
import os
import re
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import BlockHashMismatch, ManifestError, MissingBlocksError
from .manifest import ModelManifest

BLOCK_SUFFIX = ".safetensors"
ID_HEX_CHARS = 64
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's raw bytes as a view (no copy for a contiguous CPU tensor: hashing runs at sha256's speed)."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the raw 16-bit words
        t = t.view(torch.int16)
    return memoryview(t.numpy().reshape(-1)).cast("B")  # 1-D first: cast refuses 0-d and empty shapes


def block_id(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of the canonical encoding of a block's tensors.

    Args:
        tensors: name -> tensor, as in a block's ``state_dict``.
    Returns:
        64 hex characters; equal tensors (names, dtypes, shapes, bytes) give equal ids.
    """
    h = hashlib.sha256(b"edgesplit-block-v1")
    for name in sorted(tensors):
        t = tensors[name]
        for part in (name.encode(), str(t.dtype).encode(), ",".join(map(str, t.shape)).encode()):
            h.update(struct.pack("<Q", len(part)))
            h.update(part)
        data = _tensor_bytes(t)
        h.update(struct.pack("<Q", len(data)))
        h.update(data)
    return h.hexdigest()


def _check_id(bid: str) -> str:
    if len(bid) != ID_HEX_CHARS or any(c not in "0123456789abcdef" for c in bid):
        raise ValueError(f"block id must be {ID_HEX_CHARS} lowercase hex characters, got {bid!r}")
    return bid


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class BlockStore:
    """Blocks and manifests under one directory; safe to share between processes."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        (self.root / "blocks").mkdir(parents=True, exist_ok=True)
        (self.root / "models").mkdir(parents=True, exist_ok=True)

    # --- blocks ----------------------------------------------------------------------
    def path(self, bid: str) -> Path:
        """Where block ``bid`` lives (whether or not it exists)."""
        return self.root / "blocks" / f"{_check_id(bid)}{BLOCK_SUFFIX}"

    def has(self, bid: str) -> bool:
        return self.path(bid).is_file()

    def put(self, tensors: dict[str, torch.Tensor]) -> str:
        """Store a block (once) and return its id."""
        bid = block_id(tensors)
        if not self.has(bid):
            plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
            atomic_write(self.path(bid), st_save(plain, metadata={"edgesplit_id": bid}))
        return bid

    def read_bytes(self, bid: str) -> bytes:
        """The raw safetensors file of a block, for shipping it to a peer."""
        try:
            return self.path(bid).read_bytes()
        except FileNotFoundError:
            raise MissingBlocksError(f"block {bid} is not in store {self.root}", [bid]) from None

    def decode(self, bid: str, data: bytes, source: str = "<bytes>") -> dict[str, torch.Tensor]:
        """Parse safetensors bytes and check they hash to ``bid``."""
        try:
            tensors = st_load(data)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise BlockHashMismatch(f"block {bid} from {source} is corrupt or truncated ({e}); "
                                    "delete it and partition/fetch the model again") from None
        actual = block_id(tensors)
        if actual != bid:
            raise BlockHashMismatch(f"block from {source} hashes to {actual}, expected {bid}; "
                                    "the file is corrupt: delete it and partition/fetch the model again")
        return tensors

    def get(self, bid: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Load a block's tensors, verifying the hash.

        Raises:
            MissingBlocksError: the block is not in this store.
            BlockHashMismatch: the file is corrupt or truncated (the message names it).
        """
        tensors = self.decode(bid, self.read_bytes(bid), source=str(self.path(bid)))
        return tensors if str(device) == "cpu" else {k: v.to(device) for k, v in tensors.items()}

    def put_bytes(self, bid: str, data: bytes) -> None:
        """Store a block received as raw file bytes, after checking its hash."""
        self.decode(bid, data)
        if not self.has(bid):
            atomic_write(self.path(bid), data)

    def block_ids(self) -> list[str]:
        return sorted(p.name[: -len(BLOCK_SUFFIX)] for p in (self.root / "blocks").glob(f"*{BLOCK_SUFFIX}"))

    def size_bytes(self) -> int:
        """Bytes of all stored block files (what sharing saves shows up here)."""
        return sum(self.path(b).stat().st_size for b in self.block_ids())

    # --- manifests -------------------------------------------------------------------
    def _manifest_path(self, name: str) -> Path:
        if not MODEL_NAME.fullmatch(name):
            raise ManifestError(f"bad model name {name!r}: use letters, digits and . _ + - (at most 128)")
        return self.root / "models" / f"{name}.json"

    def put_manifest(self, manifest: ModelManifest) -> Path:
        path = self._manifest_path(manifest.name)
        atomic_write(path, manifest.to_json().encode())
        return path

    def manifest(self, name: str) -> ModelManifest:
        path = self._manifest_path(name)
        if not path.is_file():
            raise ManifestError(f"no model {name!r} in store {self.root}; known: {self.list_models()}. "
                                "Create it with `edgesplit partition`.")
        return ModelManifest.from_json(path.read_text())

    def list_models(self) -> list[str]:
        return sorted(ModelManifest.from_json(p.read_text()).name for p in (self.root / "models").glob("*.json"))

    def missing(self, manifest: ModelManifest) -> list[str]:
        """Ids of the manifest's blocks that this store lacks."""
        return [b.id for b in manifest.blocks if not self.has(b.id)]
