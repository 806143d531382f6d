"""Content-addressed block store: dedup, hashing, corruption, atomicity."""
import os

import pytest
import timm
import torch

from edgesplit.partitioner import (BlockHashMismatch, BlockStore, ManifestError, MissingBlocksError, block_id,
                                   build_blocks, partition, timm_recipe)

VIT_KW = {"img_size": 32, "patch_size": 4, "depth": 10, "num_classes": 10}


def test_block_id_is_canonical():
    a = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3)}
    b = {"b": torch.zeros(3), "w": torch.arange(6.0).reshape(2, 3)}
    assert block_id(a) == block_id(b)  # order of names does not matter
    assert block_id(a) != block_id({**a, "b": torch.zeros(3, dtype=torch.float16)})  # dtype does
    assert block_id(a) != block_id({**a, "w": torch.arange(6.0).reshape(3, 2)})  # shape does
    assert block_id(a) != block_id({"W": a["w"], "b": a["b"]})  # names do
    assert len(block_id(a)) == 64


@pytest.mark.timeout(60)
def test_block_id_encoding_is_pinned_for_every_shape_and_dtype():
    """The id is sha256 over (name, dtype, shape, raw bytes), each length-prefixed: spelled out here."""
    import hashlib
    import struct

    def reference(tensors):
        h = hashlib.sha256(b"edgesplit-block-v1")
        for name in sorted(tensors):
            t = tensors[name].contiguous()
            raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
            for part in (name.encode(), str(t.dtype).encode(), ",".join(map(str, t.shape)).encode(), raw):
                h.update(struct.pack("<Q", len(part)) + part)
        return h.hexdigest()

    g = torch.Generator().manual_seed(0)
    odd = {"scalar": torch.tensor(3.0), "empty": torch.zeros(2, 0, 3), "flags": torch.tensor([True, False]),
           "bf16": torch.randn(3, 4, generator=g).to(torch.bfloat16), "t": torch.randn(4, 5, generator=g).t(),
           "i64": torch.arange(6), "f16": torch.randn(7, generator=g).half()}
    assert block_id(odd) == reference(odd)


def test_shared_blocks_stored_once(tmp_path):
    """Two ViTs sharing their first 8 transformer blocks store those blocks once."""
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT_KW).eval()
    tuned = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT_KW).eval()
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():  # "fine-tune" the top: blocks 8, 9 and the head change
        for name, p in tuned.named_parameters():
            if name.startswith(("blocks.8.", "blocks.9.", "norm.", "head.")):
                p.add_(0.01)
    store = BlockStore(tmp_path)
    ma = partition(base, "base", timm_recipe("vit_tiny_patch16_224", **VIT_KW), store, profile=False)
    files_a, bytes_a = len(store.block_ids()), store.size_bytes()
    mb = partition(tuned, "tuned", timm_recipe("vit_tiny_patch16_224", **VIT_KW), store, profile=False)
    assert ma.n_blocks == mb.n_blocks == 12  # embed + 10 blocks + head
    shared = [a.id for a, b in zip(ma.blocks, mb.blocks) if a.id == b.id]
    assert len(shared) == 9  # embed and blocks.0-7
    assert [b.name for b in ma.blocks if b.id in shared] == ["embed"] + [f"blocks.{i}" for i in range(8)]
    # the store grew by the 3 changed blocks only: files and bytes
    assert len(store.block_ids()) == files_a + 3
    changed = [b.id for b in mb.blocks if b.id not in shared]
    assert store.size_bytes() == bytes_a + sum(store.path(i).stat().st_size for i in changed)
    assert len(store.block_ids()) == 2 * 12 - 9


@pytest.mark.timeout(60)
def test_flipped_byte_is_detected(tmp_path):
    model = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    store = BlockStore(tmp_path)
    man = partition(model, "r18", timm_recipe("resnet18", num_classes=3), store, input_shape=[3, 32, 32], profile=False)
    target = man.blocks[2]
    path = store.path(target.id)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the tensor payload
    path.write_bytes(bytes(data))
    with pytest.raises(BlockHashMismatch, match=str(path)):
        store.get(target.id)
    with pytest.raises(BlockHashMismatch):
        build_blocks(store, man, 0, 4)
    # truncation is named too
    path.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(BlockHashMismatch, match="corrupt or truncated"):
        store.get(target.id)


def test_missing_block_and_manifest_errors(tmp_path):
    store = BlockStore(tmp_path)
    bid = store.put({"x": torch.ones(2)})
    os.remove(store.path(bid))
    with pytest.raises(MissingBlocksError, match=bid):
        store.get(bid)
    with pytest.raises(ManifestError, match="edgesplit partition"):
        store.manifest("nope")
    with pytest.raises(ManifestError, match="bad model name"):
        store.manifest("../etc/passwd")


def test_put_bytes_verifies_and_writes_atomically(tmp_path):
    src, dst = BlockStore(tmp_path / "a"), BlockStore(tmp_path / "b")
    bid = src.put({"w": torch.randn(4, 4)})
    data = src.read_bytes(bid)
    with pytest.raises(BlockHashMismatch):
        dst.put_bytes(bid, data[:-5])
    assert not dst.has(bid) and not list((tmp_path / "b" / "blocks").iterdir())  # nothing half-written left
    dst.put_bytes(bid, data)
    assert torch.equal(dst.get(bid)["w"], src.get(bid)["w"])
