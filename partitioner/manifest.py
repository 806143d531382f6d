"""Model manifest: the skeleton recipe plus the ordered list of blocks, as JSON."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ManifestError

MANIFEST_VERSION = 1


def _json_kind(value: object) -> str:
    """JSON's name for a decoded value's type: 'a list', 'a string', 'null', ..."""
    if value is None:
        return "null"
    kinds = {bool: "a boolean", list: "a list", str: "a string", int: "a number", float: "a number"}
    return kinds.get(type(value), f"a {type(value).__name__}")


@dataclass(frozen=True)
class BlockEntry:
    """One block of a model as the manifest records it (sizes per sample, fp32 activations)."""

    name: str
    id: str
    n_params: int
    size_bytes: int
    out_shape: list[int]  # per sample, without the batch dimension
    act_bytes: int  # bytes of the block's output per sample
    forward_ms: float | None = None  # measured on the partitioning machine, batch 1


@dataclass(frozen=True)
class ModelManifest:
    """Everything needed to rebuild a model from a block store alone."""

    name: str
    recipe: dict[str, Any]
    input_shape: list[int]  # per sample, e.g. [3, 224, 224]
    blocks: list[BlockEntry]
    extra: dict[str, Any] = field(default_factory=dict)  # codecs, class-wise layout, ...

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def size_bytes(self) -> int:
        return sum(b.size_bytes for b in self.blocks)

    def block_index(self, name: str) -> int:
        for i, b in enumerate(self.blocks):
            if b.name == name:
                return i
        raise ManifestError(f"model {self.name} has no block named {name!r}")

    def to_json(self) -> str:
        return json.dumps({"version": MANIFEST_VERSION, **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "ModelManifest":
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):  # a list or a number has no .pop(key, default): say what it is instead
                raise ManifestError(f"not a model manifest: the top level is {_json_kind(raw)}, not an object")
            if raw.pop("version", None) != MANIFEST_VERSION:
                raise ManifestError(f"manifest version is not {MANIFEST_VERSION}")
            raw["blocks"] = [BlockEntry(**b) for b in raw["blocks"]]
            return cls(**raw)
        except ManifestError:  # already says what is wrong (it is a ValueError too)
            raise
        except (ValueError, TypeError, KeyError) as e:
            raise ManifestError(f"malformed model manifest: {e}") from None
