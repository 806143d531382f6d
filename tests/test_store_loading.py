"""Fast block loading: views into one read buffer, the xxh3 sidecar, the SHA-256 fallback, the read cap.

Real files in a temporary store, corrupted byte by byte; no mocks.
"""
from __future__ import annotations

import json
import struct
import time

import pytest
import torch
from safetensors.torch import save as st_save

from edgesplit.partitioner import BlockHashMismatch, BlockStore, MissingBlocksError, block_id
from edgesplit.partitioner.blockfile import BlockFormatError, parse_header
from edgesplit.partitioner.reader import ReadRateCap


def odd_block() -> dict[str, torch.Tensor]:
    """Every dtype and shape corner the loader must round-trip bit for bit."""
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(33, 17, generator=g),
        "f16": torch.randn(5, 7, generator=g).half(),
        "bf16": torch.randn(3, 9, generator=g).to(torch.bfloat16),
        "i8": torch.randint(-128, 127, (11,), dtype=torch.int8, generator=g),
        "i64": torch.arange(-5, 6, dtype=torch.int64),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(4, 0, 3),
        "flags": torch.tensor([True, False, True]),
        "big": torch.randn(600_000, generator=g),  # > 2 MiB: the huge-page buffer path
    }


def craft(entries: dict, data: bytes, metadata: dict | None = None) -> bytes:
    """A safetensors file with a hand-written header (to build hostile ones)."""
    header = json.dumps({**({"__metadata__": metadata} if metadata else {}), **entries}).encode()
    return struct.pack("<Q", len(header)) + header + data


def flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_round_trip_every_dtype_and_shape(tmp_path):
    store = BlockStore(tmp_path)
    block = odd_block()
    bid = store.put(block)
    assert store.digest_path(bid).is_file()
    assert store.block_ids() == [bid]  # the sidecar is not a block
    got = store.get(bid)
    assert set(got) == set(block)
    for name, t in block.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name
    assert block_id(got) == bid
    big = got["big"]
    assert all(t.untyped_storage().data_ptr() == big.untyped_storage().data_ptr()
               for t in got.values() if t.numel())  # views into one buffer: no per-tensor copy
    got["f32"].add_(1)  # writable, and writing one tensor leaves its neighbours alone
    assert torch.equal(got["f16"], block["f16"])


def test_flipped_data_byte_is_caught(tmp_path):
    store = BlockStore(tmp_path)
    bid = store.put(odd_block())
    path = store.path(bid)
    flip(path, path.stat().st_size - 1000)  # inside "big"'s bytes or a neighbour's
    with pytest.raises(BlockHashMismatch, match=str(path)):
        store.get(bid)
    with pytest.raises(BlockHashMismatch):
        store.verify(bid)


@pytest.mark.parametrize("needle", [b'"f16"', b'"data_offsets"', b'"shape":[33'])
def test_flipped_header_byte_is_caught(tmp_path, needle):
    store = BlockStore(tmp_path)
    bid = store.put(odd_block())
    path = store.path(bid)
    at = path.read_bytes().index(needle) + len(needle) - 2  # a name, a key, a size digit
    flip(path, at)
    with pytest.raises(BlockHashMismatch, match=bid):
        store.get(bid)


def test_flipped_length_prefix_and_truncation_are_caught(tmp_path):
    store = BlockStore(tmp_path)
    bid = store.put(odd_block())
    path = store.path(bid)
    good = path.read_bytes()
    flip(path, 6)  # the header length's high bytes: points past the file
    with pytest.raises(BlockHashMismatch, match="corrupt or truncated"):
        store.get(bid)
    for n in (len(good) - 1, len(good) // 2, 20, 3, 0):
        path.write_bytes(good[:n])
        with pytest.raises(BlockHashMismatch, match="corrupt or truncated"):
            store.get(bid)
    path.write_bytes(good)  # restored: loads again
    assert block_id(store.get(bid)) == bid


def test_missing_sidecar_loads_by_sha256_and_gets_one(tmp_path):
    store = BlockStore(tmp_path)
    block = {"w": torch.randn(64, 64), "b": torch.zeros(64, dtype=torch.float16)}
    bid = store.put(block)
    sidecar = store.digest_path(bid)
    line = sidecar.read_bytes()
    sidecar.unlink()  # a block written by an older store
    assert torch.equal(store.get(bid)["w"], block["w"])
    assert sidecar.read_bytes() == line  # rewritten, same digest
    sidecar.write_bytes(b"garbage\n")  # a damaged sidecar is ignored, then replaced
    assert torch.equal(store.get(bid)["b"], block["b"])
    assert sidecar.read_bytes() == line


def test_stale_sidecar_of_an_intact_block_is_repaired(tmp_path):
    """A block copied in by hand, serialized differently: same tensors, other bytes."""
    store = BlockStore(tmp_path)
    block = {"w": torch.randn(8, 8)}
    bid = store.put(block)
    other = st_save({"w": block["w"]}, metadata={"note": "re-serialized"})
    store.path(bid).write_bytes(other)
    assert torch.equal(store.get(bid)["w"], block["w"])  # SHA-256 says intact
    assert store.get(bid)["w"].shape == (8, 8)  # and the fast path now vouches for the new bytes
    assert str(len(other)) in store.digest_path(bid).read_text()


def test_put_bytes_writes_the_sidecar(tmp_path):
    src, dst = BlockStore(tmp_path / "a"), BlockStore(tmp_path / "b")
    bid = src.put(odd_block())
    dst.put_bytes(bid, src.read_bytes(bid))
    assert dst.digest_path(bid).read_bytes() == src.digest_path(bid).read_bytes()
    assert dst.block_ids() == [bid]
    with pytest.raises(MissingBlocksError):
        dst.get("0" * 64)


F32_4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}


@pytest.mark.parametrize("entries, data, error", [
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 32]}}, bytes(16), "out of range"),
    ({"a": F32_4, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16), "overlaps"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16), "gap"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(16), "cover 8 bytes"),
    ({"a": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 16]}}, bytes(16), "needs"),
    ({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, bytes(16), "non-negative"),
    ({"a": {"dtype": "F32", "shape": [True] * 4, "data_offsets": [0, 16]}}, bytes(16), "non-negative"),
    ({"a": {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}}, bytes(4), "at most 64"),
    ({"a": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}}, bytes(16), "unknown dtype"),
    ({"a": {**F32_4, "extra": 1}}, bytes(16), "exactly"),
    ({"a": F32_4, "__metadata__": {"k": 1}}, bytes(16), "__metadata__"),
])
def test_hostile_headers_are_refused(tmp_path, entries, data, error):
    blob = craft(entries, data)
    with pytest.raises(BlockFormatError, match=error):
        parse_header(blob[8:8 + struct.unpack("<Q", blob[:8])[0]], len(blob))
    store = BlockStore(tmp_path)  # and through the store, as a block copied in by hand
    bid = "ab" * 32
    store.path(bid).write_bytes(blob)
    with pytest.raises(BlockHashMismatch, match=error):
        store.get(bid)


def test_header_length_cap_and_duplicates(tmp_path):
    store = BlockStore(tmp_path)
    bid = "cd" * 32
    store.path(bid).write_bytes(struct.pack("<Q", 1 << 40) + bytes(64))
    with pytest.raises(BlockHashMismatch, match="exceeds"):
        store.get(bid)
    dup = b'{"a":' + json.dumps(F32_4).encode() + b',"a":' + json.dumps(F32_4).encode() + b"}"
    store.path(bid).write_bytes(struct.pack("<Q", len(dup)) + dup + bytes(16))
    with pytest.raises(BlockHashMismatch, match="twice"):
        store.get(bid)


def test_misaligned_tensor_is_copied_not_refused(tmp_path):
    """Valid safetensors from another writer may misalign a tensor: it loads, as a copy."""
    i8 = torch.arange(3, dtype=torch.int8)
    f32 = torch.tensor([1.5, -2.0])
    entries = {"i8": {"dtype": "I8", "shape": [3], "data_offsets": [0, 3]},
               "f32": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]}}
    bid = block_id({"i8": i8, "f32": f32})
    store = BlockStore(tmp_path)
    store.path(bid).write_bytes(craft(entries, i8.numpy().tobytes() + f32.numpy().tobytes()))
    got = store.get(bid)
    assert torch.equal(got["i8"], i8) and torch.equal(got["f32"], f32)


def test_read_rate_cap_is_respected(tmp_path):
    block = {"w": torch.zeros(1_000_000)}  # 4 MB
    bid = BlockStore(tmp_path).put(block)
    size = BlockStore(tmp_path).path(bid).stat().st_size
    capped = BlockStore(tmp_path, read_rate_bps=20e6, chunk_bytes=1 << 20)
    t0 = time.perf_counter()
    assert torch.equal(capped.get(bid)["w"], block["w"])
    took = time.perf_counter() - t0
    assert took >= size / 20e6 * 0.99, f"{size} B in {took:.3f} s beats the 20 MB/s cap"
    t0 = time.perf_counter()
    assert len(capped.read_bytes(bid)) == size
    assert time.perf_counter() - t0 >= size / 20e6 * 0.99
    with pytest.raises(ValueError, match="positive"):
        BlockStore(tmp_path, read_rate_bps=0)


def test_rate_cap_is_shared_and_not_banked():
    """Two readers share the device's rate; idle time earns no burst."""
    cap = ReadRateCap(1e6)
    t0 = time.perf_counter()
    due_a, due_b = cap.reserve(10_000), cap.reserve(10_000)
    assert due_b - due_a == pytest.approx(0.01, rel=1e-6)
    time.sleep(0.05)
    t1 = time.perf_counter()
    assert cap.reserve(10_000) >= t1 + 0.01 * (1 - 1e-6)  # a fresh start, no credit from the idle 50 ms
    assert due_a - t0 >= 0.0099


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")
def test_cuda_load_is_staged_and_verified(tmp_path):
    store = BlockStore(tmp_path, chunk_bytes=1 << 20)  # several staging chunks per block
    block = odd_block()
    bid = store.put(block)
    got = store.get(bid, device="cuda")
    for name, t in block.items():
        assert got[name].is_cuda and torch.equal(got[name].cpu(), t), name
    flip(store.path(bid), store.path(bid).stat().st_size - 1000)
    with pytest.raises(BlockHashMismatch):
        store.get(bid, device="cuda")
