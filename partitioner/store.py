"""Content-addressed block store: ``<root>/blocks/<id>.safetensors`` and ``<root>/models/<name>.json``.

A block's id is the SHA-256 of a canonical encoding of its tensors (sorted names, dtype,
shape, raw little-endian bytes), so blocks that models share are stored once. Files are
safetensors (never pickle), written to a temporary name and renamed into place, so a
half-written block is never visible under its id.

Integrity without SHA-256 on the load path: SHA-256 runs at about 1-2 GB/s, slower than a
page-cache read, so it is checked when a block enters the store (``put``, ``put_bytes``)
and the file's xxh3-128 digest (tens of GB/s) is recorded then in a sidecar,
``<id>.xxh3``. ``get`` reads the file once, hashing each chunk as it lands, and returns
nothing unless the digest matches the sidecar. A mismatch, a missing sidecar (a block from
an older store, or copied in by hand) or a bad one sends the load down the SHA-256 path,
which decides: corrupt -> ``BlockHashMismatch``; intact -> the sidecar is (re)written.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import xxhash
from safetensors.torch import save as st_save

from .blockfile import PREFIX_BYTES, BlockFormatError, BlockLayout, header_length, parse_header, tensors_from
from .errors import BlockHashMismatch, ManifestError, MissingBlocksError, UsageError
from .manifest import ModelManifest
from .reader import READ_CHUNK_BYTES, ChunkReader, ReadRateCap, file_size, host_buffer, read_to_device

log = logging.getLogger("edgesplit.store")

BLOCK_SUFFIX = ".safetensors"
DIGEST_SUFFIX = ".xxh3"  # sidecar: the verified file's fast digest
DIGEST_TAG = "edgesplit-xxh3-128-v1"
ID_HEX_CHARS = 64
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
BLOCK_FILE = re.compile(rf"[0-9a-f]{{{ID_HEX_CHARS}}}{re.escape(BLOCK_SUFFIX)}")


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's raw bytes as a view (no copy for a contiguous CPU tensor: hashing runs at sha256's speed)."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())  # raw bytes whatever the dtype (numpy lacks bfloat16, float8)


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


@dataclass(frozen=True)
class _Digest:
    """A sidecar's content: the verified file's size and xxh3-128 digest."""

    size_bytes: int
    xxh3_hex: str

    def line(self, bid: str) -> bytes:
        return f"{DIGEST_TAG} {bid} {self.size_bytes} {self.xxh3_hex}\n".encode()

    @classmethod
    def parse(cls, text: str, bid: str) -> "_Digest | None":
        parts = text.split()
        if (len(parts) != 4 or parts[0] != DIGEST_TAG or parts[1] != bid or not parts[2].isdigit()
                or len(parts[3]) != 32 or any(c not in "0123456789abcdef" for c in parts[3])):
            return None
        return cls(int(parts[2]), parts[3])


def read_manifest(path: str | os.PathLike[str]) -> ModelManifest:
    """The manifest in file ``path``.

    Raises:
        ManifestError: unreadable or malformed; the message names the file.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeError) as e:
        raise ManifestError(f"cannot read manifest file {path}: {e}") from None
    try:
        return ModelManifest.from_json(text)
    except ManifestError as e:
        raise ManifestError(f"manifest file {path}: {e}") from None


def _bytes_tensor(data: bytes | bytearray | memoryview) -> torch.Tensor:
    """A uint8 CPU tensor holding a copy of ``data`` (writable, unlike a view of ``bytes``)."""
    out = torch.empty(len(data), dtype=torch.uint8)
    out.numpy()[:] = np.frombuffer(data, dtype=np.uint8)
    return out


class BlockStore:
    """Blocks and manifests under one directory; safe to share between processes.

    Args:
        root: the store's directory (created if absent, unless ``create`` is false).
        read_rate_bps: cap on the rate block files are read at (bytes/s, every reader of this
            instance together), to emulate a board's storage on a faster machine; None: no cap.
        chunk_bytes: bytes per read call (and per step of the cap).
        create: make the directory if it is absent; false opens an existing store only and
            creates nothing (``edgesplit inspect`` of a mistyped path must not leave one behind).
    Raises:
        UsageError: ``create`` is false and ``root`` is not a store, or the directory cannot be made.
    """

    def __init__(self, root: str | os.PathLike[str], read_rate_bps: float | None = None,
                 chunk_bytes: int = READ_CHUNK_BYTES, create: bool = True) -> None:
        self.root = Path(root)
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        if not create:
            if not self.root.is_dir():
                raise UsageError(f"no block store at {self.root} (no such directory); create one with "
                                 f"`edgesplit partition MODEL --store {self.root}`")
            if not (self.root / "models").is_dir():
                raise UsageError(f"{self.root} is not a block store (it has no models/ directory)")
        else:
            try:
                (self.root / "blocks").mkdir(parents=True, exist_ok=True)
                (self.root / "models").mkdir(parents=True, exist_ok=True)
            except OSError as e:  # a file in the way, no permission
                raise UsageError(f"cannot use {self.root} as a block store: {e.strerror or e}") from None
        self.read_rate_bps, self.chunk_bytes = read_rate_bps, int(chunk_bytes)
        self._cap = ReadRateCap(read_rate_bps) if read_rate_bps is not None else None

    # --- blocks ----------------------------------------------------------------------
    def path(self, bid: str) -> Path:
        """Where block ``bid`` lives (whether or not it exists)."""
        return self.root / "blocks" / f"{_check_id(bid)}{BLOCK_SUFFIX}"

    def digest_path(self, bid: str) -> Path:
        """Where block ``bid``'s fast-digest sidecar lives."""
        return self.root / "blocks" / f"{_check_id(bid)}{DIGEST_SUFFIX}"

    def has(self, bid: str) -> bool:
        return self.path(bid).is_file()

    def discard(self, bid: str) -> None:
        """Remove a block's file and sidecar (a corrupt copy, before fetching it again)."""
        self.path(bid).unlink(missing_ok=True)
        self.digest_path(bid).unlink(missing_ok=True)

    def put(self, tensors: dict[str, torch.Tensor]) -> str:
        """Store a block (once) and return its id."""
        bid = block_id(tensors)
        if not self.has(bid):
            plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
            self._write(bid, st_save(plain, metadata={"edgesplit_id": bid}))
        return bid

    def put_bytes(self, bid: str, data: bytes) -> None:
        """Store a block received as raw file bytes, after checking its hash."""
        self.decode(bid, data)
        if not self.has(bid):
            self._write(bid, data)

    def _write(self, bid: str, data: bytes) -> None:
        """The file, then its sidecar: a crash in between leaves a block that loads by SHA-256."""
        atomic_write(self.path(bid), data)
        atomic_write(self.digest_path(bid), _Digest(len(data), xxhash.xxh3_128_hexdigest(data)).line(bid))

    def read_bytes(self, bid: str) -> bytes:
        """The raw safetensors file of a block, for shipping it to a peer (paced by the read cap)."""
        try:
            with open(self.path(bid), "rb", buffering=0) as f:
                if self._cap is None:
                    return f.read()
                return ChunkReader(f, self._cap, self.chunk_bytes).read(file_size(f))
        except FileNotFoundError:
            raise MissingBlocksError(f"block {bid} is not in store {self.root}", [bid]) from None
        except EOFError as e:
            raise BlockHashMismatch(f"block {bid} file {self.path(bid)} shrank while being read ({e})") from None

    def decode(self, bid: str, data: bytes, source: str = "<bytes>") -> dict[str, torch.Tensor]:
        """Parse safetensors bytes and check they hash to ``bid`` (full SHA-256)."""
        try:
            n = len(data)
            layout = parse_header(data[PREFIX_BYTES:PREFIX_BYTES + header_length(data[:PREFIX_BYTES], n)], n)
        except BlockFormatError as e:
            raise self._corrupt(bid, source, e) from None
        try:
            tensors = tensors_from(layout, _bytes_tensor(memoryview(data)[layout.data_start:]))
        except BlockFormatError as e:
            raise self._corrupt(bid, source, e) from None
        self._check_sha(bid, tensors, source)
        return tensors

    def get(self, bid: str, device: str | torch.device = "cpu", into: torch.Tensor | None = None
            ) -> dict[str, torch.Tensor]:
        """Load a block's tensors onto ``device``, checked against the file verified at write time.

        ``into``: a uint8 CPU buffer of at least :meth:`file_bytes` to read into instead of fresh
        memory (a cache reusing an evicted block's memory: no page faults); the tensors are then
        views into it. Ignored for other devices and on the SHA-256 path.

        Raises:
            MissingBlocksError: the block is not in this store.
            BlockHashMismatch: the file is corrupt or truncated (the message names it).
        """
        dev = torch.device(device)
        known = self._read_digest(bid)
        if known is not None:
            tensors = self._load_fast(bid, dev, known, into)
            if tensors is not None:
                return tensors
            log.warning("block %s: file %s does not match its digest sidecar; checking it with SHA-256",
                        bid[:12], self.path(bid))
        return self._load_checked(bid, dev)

    def verify(self, bid: str) -> None:
        """Re-hash a block file with SHA-256 whatever its sidecar says (and rewrite the sidecar).

        Raises:
            MissingBlocksError, BlockHashMismatch: as ``get``.
        """
        self._load_checked(bid, torch.device("cpu"))

    def file_bytes(self, bid: str) -> int:
        """Size of a block's file (what loading it into host memory takes, header included)."""
        try:
            return self.path(bid).stat().st_size
        except FileNotFoundError:
            raise MissingBlocksError(f"block {bid} is not in store {self.root}", [bid]) from None

    def _load_fast(self, bid: str, dev: torch.device, known: _Digest, into: torch.Tensor | None = None
                   ) -> dict[str, torch.Tensor] | None:
        """One read, hashed per chunk; None when the bytes are not the ones the sidecar vouches for."""
        digest = xxhash.xxh3_128()
        with self._open(bid) as f:
            n = file_size(f)
            if n != known.size_bytes:
                return None
            reader = ChunkReader(f, self._cap, self.chunk_bytes, digest)
            layout, data = self._read(bid, reader, n, dev, into)
        if digest.hexdigest() != known.xxh3_hex:
            return None
        try:
            tensors = tensors_from(layout, data)
        except BlockFormatError:
            return None  # the SHA-256 path decides
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)  # the staged copies have landed
        return tensors

    def _load_checked(self, bid: str, dev: torch.device) -> dict[str, torch.Tensor]:
        """Read to host memory, check the SHA-256 block id, write the sidecar, then move to ``dev``."""
        digest = xxhash.xxh3_128()
        with self._open(bid) as f:
            n = file_size(f)
            layout, data = self._read(bid, ChunkReader(f, self._cap, self.chunk_bytes, digest), n,
                                      torch.device("cpu"))
        try:
            tensors = tensors_from(layout, data)
        except BlockFormatError as e:
            raise self._corrupt(bid, str(self.path(bid)), e) from None
        self._check_sha(bid, tensors, str(self.path(bid)))
        try:
            atomic_write(self.digest_path(bid), _Digest(n, digest.hexdigest()).line(bid))
        except OSError as e:  # a read-only store still loads, through SHA-256 every time
            log.warning("block %s verified, but its digest sidecar cannot be written (%s)", bid[:12], e)
        if dev.type != "cpu":
            data = data.to(dev)
        return tensors_from(layout, data)

    def _read(self, bid: str, reader: ChunkReader, n: int, dev: torch.device, into: torch.Tensor | None = None
              ) -> tuple[BlockLayout, torch.Tensor]:
        """The layout and the data region, in one buffer on ``dev`` (or raise: corrupt).

        On the host the whole file lands in one buffer, read exactly as a raw read would,
        and the header is parsed from it; for a device the header is read first, and only
        the data region is streamed over.
        """
        try:
            if dev.type == "cpu":
                usable = into is not None and into.dtype == torch.uint8 and into.device.type == "cpu" \
                    and into.is_contiguous() and into.numel() >= n
                buf = into[:n] if usable else host_buffer(n)
                view = memoryview(buf.numpy())
                reader.read_into(view)
                header_end = PREFIX_BYTES + header_length(view[:PREFIX_BYTES], n)
                layout = parse_header(bytes(view[PREFIX_BYTES:header_end]), n)
                return layout, buf[layout.data_start:]
            prefix = reader.read(min(n, PREFIX_BYTES))
            layout = parse_header(reader.read(header_length(prefix, n)), n)
            return layout, read_to_device(reader, layout.data_bytes, dev)
        except (BlockFormatError, EOFError) as e:
            raise self._corrupt(bid, str(self.path(bid)), e) from None

    def _open(self, bid: str) -> BinaryIO:
        try:
            return open(self.path(bid), "rb", buffering=0)
        except FileNotFoundError:
            raise MissingBlocksError(f"block {bid} is not in store {self.root}", [bid]) from None

    def _read_digest(self, bid: str) -> _Digest | None:
        try:
            with open(self.digest_path(bid), "rb", buffering=0) as f:
                text = f.read(256).decode("ascii", errors="replace")  # a valid line is ~140 bytes
        except OSError:
            return None
        return _Digest.parse(text, bid)

    @staticmethod
    def _corrupt(bid: str, source: str, e: Exception) -> BlockHashMismatch:
        return BlockHashMismatch(f"block {bid} from {source} is corrupt or truncated ({e}); "
                                 "delete it and partition/fetch the model again")

    @staticmethod
    def _check_sha(bid: str, tensors: dict[str, torch.Tensor], source: str) -> None:
        try:
            actual = block_id(tensors)
        except (TypeError, ValueError, RuntimeError, UnicodeError) as e:  # names or dtypes no honest block has
            raise BlockHashMismatch(f"block from {source} cannot be hashed ({type(e).__name__}: {str(e)[:200]}); "
                                    "the file is corrupt: delete it and partition/fetch the model again") from None
        if actual != bid:
            raise BlockHashMismatch(f"block from {source} hashes to {actual}, expected {bid}; "
                                    "the file is corrupt: delete it and partition/fetch the model again")

    def block_ids(self) -> list[str]:
        """Ids of stored blocks (not sidecars, not a crashed writer's temporary files)."""
        blocks = self.root / "blocks"
        if not blocks.is_dir():  # a read-only open of a store that holds manifests only
            return []
        return sorted(p.name[: -len(BLOCK_SUFFIX)] for p in blocks.iterdir() if BLOCK_FILE.fullmatch(p.name))

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
        """Model ``name``'s manifest.

        Raises:
            ManifestError: no such model, or its file is malformed (the message names the file).
        """
        path = self._manifest_path(name)
        if not path.is_file():
            raise ManifestError(f"no model {name!r} in store {self.root}; known: {self.list_models()}. "
                                "Create it with `edgesplit partition`.")
        manifest = read_manifest(path)
        if manifest.name != name:
            raise ManifestError(f"manifest file {path} holds model {manifest.name!r}, not {name!r}; "
                                "the file name must be the model name")
        return manifest

    def scan_models(self) -> tuple[list[str], list[tuple[Path, str]]]:
        """Every manifest file, sorted into the usable and the broken, so one bad file cannot hide the rest.

        Returns:
            (names of the models whose manifests read, [(file, what is wrong with it)] for the others).
        """
        good, bad = [], []
        for path in sorted((self.root / "models").glob("*.json")):
            try:
                manifest = read_manifest(path)
            except ManifestError as e:
                bad.append((path, str(e)))
                continue
            if manifest.name != path.stem:
                bad.append((path, f"manifest file {path} holds model {manifest.name!r}; the file name must be the "
                                  "model name"))
            else:
                good.append(manifest.name)
        return good, bad

    def list_models(self) -> list[str]:
        """Names of the models whose manifests read (``scan_models`` also names the broken files)."""
        return self.scan_models()[0]

    def missing(self, manifest: ModelManifest) -> list[str]:
        """Ids of the manifest's blocks that this store lacks."""
        return [b.id for b in manifest.blocks if not self.has(b.id)]
