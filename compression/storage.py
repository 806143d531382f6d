"""Trained codecs (and split models) as blocks in the content-addressed block store.

A codec is one block (its ``state_dict``: encoder, filter, decoder) plus a small JSON-safe
description that a model manifest can carry in ``extra["codecs"]``::

    {"format": "edgesplit-codec-v1", "kind": "fmap", "kwargs": {"channels": 256, "r": 1, ...},
     "block": "<sha256 id>", "budgets": [4, 8, ...], "width": 256}

``add_manifest_codec`` names a stored codec in a model's manifest (``extra["codecs"][name]``),
optionally with its cut and measured points for the planner; a link spec ``{"codec": name}``
then deploys it.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from edgesplit.partitioner import BlockStore, ModelManifest

from .codecs import Codec, create_codec
from .errors import CodecError
from .splitnets import SplitNet, create_splitnet

CODEC_FORMAT = "edgesplit-codec-v1"
SPLITNET_FORMAT = "edgesplit-splitnet-v1"


def save_codec(store: BlockStore, codec: Codec) -> dict[str, Any]:
    """Store the codec's tensors as one block.

    Args:
        store: the block store.
        codec: a codec made by ``create_codec``.
    Returns:
        Its JSON-safe description, for ``load_codec`` and manifests.
    """
    bid = store.put(codec.state_dict())
    return {"format": CODEC_FORMAT, "kind": codec.kind, "kwargs": codec.config(), "block": bid,
            "budgets": list(codec.budgets), "width": int(getattr(codec, "width", 0))}


def _load_state(module: nn.Module, tensors: Mapping[str, torch.Tensor], what: str) -> None:
    want = module.state_dict()
    if set(want) != set(tensors) or any(want[k].shape != tensors[k].shape for k in want):
        diff = sorted(set(want) ^ set(tensors)) or [k for k in want if want[k].shape != tensors[k].shape]
        raise CodecError(f"stored block for {what} does not fit its description (mismatched tensors: "
                         f"{diff[:6]}); the description and block were not saved together")
    module.load_state_dict(dict(tensors), strict=True)


def load_codec(store: BlockStore, desc: Mapping[str, Any], device: str | torch.device = "cpu") -> Codec:
    """Rebuild a codec from its description and its block (hash verified by the store).

    Args:
        store: the block store holding the block.
        desc: what ``save_codec`` returned.
        device: where to put it.
    Returns:
        The codec in eval mode.
    """
    if not isinstance(desc, Mapping) or desc.get("format") != CODEC_FORMAT:
        raise CodecError(f"not a codec description (format must be {CODEC_FORMAT!r}): {str(desc)[:200]}")
    kind, kwargs, bid = desc.get("kind"), desc.get("kwargs"), desc.get("block")
    if not isinstance(kind, str) or not isinstance(kwargs, Mapping) or not isinstance(bid, str):
        raise CodecError(f"codec description needs 'kind' (str), 'kwargs' (map) and 'block' (id): {str(desc)[:200]}")
    codec = create_codec(kind, **dict(kwargs))
    _load_state(codec, store.get(bid), f"codec {kind!r}")
    return codec.to(device).eval()


def add_manifest_codec(store: BlockStore, model: str, name: str, desc: Mapping[str, Any],
                       cut: int | None = None, points: list[list[Any]] | None = None,
                       **info: Any) -> ModelManifest:
    """Name a stored codec in ``model``'s manifest (``extra["codecs"][name]``); the manifest is rewritten atomically.

    Args:
        store: the block store holding the model and the codec's block.
        model: the model's name in the store.
        name: the link codec's name (what a link spec's ``codec`` says); an existing one is replaced.
        desc: what ``save_codec`` returned.
        cut: the block index the codec was trained for (blocks ``[0, cut)`` send).
        points: ``[[budget, bytes_per_sample, accuracy_cost], ...]``: with ``cut``, the planner may choose it.
        info: more JSON-safe facts to keep beside it (how it was trained).
    Returns:
        The new manifest.
    """
    if not isinstance(name, str) or not 0 < len(name) <= 64 or name == "raw":
        raise CodecError(f"a codec name is 1..64 characters and not 'raw', got {name!r}")
    if not isinstance(desc, Mapping) or desc.get("format") != CODEC_FORMAT or not store.has(str(desc.get("block"))):
        raise CodecError(f"codec {name!r}: not a description of a codec stored in {store.root} "
                         "(save it with save_codec first)")
    entry = dict(desc)
    if cut is not None:
        entry["cut"] = int(cut)
    if points is not None:
        entry["points"] = [list(p) for p in points]
    entry.update(info)
    store.manifest(model)  # an unknown or malformed model name fails here, before any lock file is made
    with _manifest_lock(store, model):  # read-modify-write: two registrations must not lose one another
        m = store.manifest(model)
        if cut is not None and not 1 <= cut < m.n_blocks:
            raise CodecError(f"cut {cut} is not a block index in 1..{m.n_blocks - 1} of {model}")
        codecs = {**(m.extra.get("codecs") or {}), name: entry}
        store.put_manifest(ModelManifest(m.name, m.recipe, m.input_shape, m.blocks, {**m.extra, "codecs": codecs}))
        return store.manifest(model)


@contextlib.contextmanager
def _manifest_lock(store: BlockStore, model: str) -> Iterator[None]:
    """An exclusive advisory lock on ``model``'s manifest (POSIX ``flock``; elsewhere, none)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename still keeps the file whole
        yield
        return
    path = store.root / "models" / f".{model}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def save_splitnet(store: BlockStore, net: SplitNet) -> dict[str, Any]:
    """Store a split model as three blocks (client, server, codec).

    Returns:
        ``{"format", "name", "kwargs", "client", "server", "codec"}`` (JSON-safe).
    """
    return {"format": SPLITNET_FORMAT, "name": net.name, "kwargs": dict(net.config),
            "client": store.put(net.client.state_dict()), "server": store.put(net.server.state_dict()),
            "codec": save_codec(store, net.codec)}


def load_splitnet(store: BlockStore, desc: Mapping[str, Any]) -> SplitNet:
    """Rebuild a split model saved by ``save_splitnet`` (in train mode, as ``create_splitnet``)."""
    if not isinstance(desc, Mapping) or desc.get("format") != SPLITNET_FORMAT:
        raise CodecError(f"not a split-model description (format must be {SPLITNET_FORMAT!r}): {str(desc)[:200]}")
    net = create_splitnet(str(desc.get("name")), **dict(desc.get("kwargs") or {}))
    _load_state(net.client, store.get(desc["client"]), f"{net.name} client")
    _load_state(net.server, store.get(desc["server"]), f"{net.name} server")
    codec = load_codec(store, desc["codec"])
    if codec.config() != net.codec.config() or codec.kind != net.codec.kind:
        raise CodecError(f"stored codec {codec.kind}{codec.config()} does not match split model {net.name}")
    net.codec = codec
    return net.train()
