"""`edgesplit train-codec MODEL`: a codec for a user's partitioned model, trained without labels, and attached live.

A tiny timm ViT (4 blocks, 32 wide, 16x16 inputs) is partitioned into a store; the CLI trains a
tokens codec at one of its cuts on digits (1 epoch: a smoke run, not an accuracy claim; the
accuracy figure is benchmarks/codec_user.py), stores it as a block, names it in the manifest;
then a real 2-worker cluster serves the model on a raw link, and `edgesplit link --codec`
attaches the codec while requests stream: none is lost, the next ones cross the link smaller.
"""
from __future__ import annotations

import threading

import pytest
import torch

from edgesplit.compression import load_codec
from edgesplit.compression.distill import folder_images
from edgesplit.partitioner import BlockStore, block_id, build_blocks, load_model, partition, timm_recipe
from edgesplit.runtime import cli
from edgesplit.runtime import protocol as P

ARCH = "vit_tiny_patch16_224"
KWARGS = {"img_size": 16, "patch_size": 4, "depth": 4, "embed_dim": 32, "num_heads": 2, "num_classes": 10}
CUT = 3  # block index: embed + blocks.0-1 send, blocks.2-3 + head receive
TOKENS, DIM = 17, 32  # 16 patches + class token, embedding width


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # 2 shared cores


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny ViT in a store, and `train-codec tiny --cut 3 --images digits` run once on it."""
    import timm

    root = tmp_path_factory.mktemp("user-store")
    store = BlockStore(root)
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, **KWARGS).eval()
    partition(model, "tiny", timm_recipe(ARCH, **KWARGS), store, profile=False)
    argv = ["train-codec", "tiny", "--store", str(root), "--cut", str(CUT), "--images", "digits", "--epochs", "1",
            "--train-limit", "512", "--threads", "1", "--no-progress", "--seed", "1"]
    return {"root": root, "rc": cli.main(argv), "model": model}


@pytest.mark.timeout(120)
def test_cli_trains_stores_and_registers_a_codec(trained, capsys):
    assert trained["rc"] == 0
    store = BlockStore(trained["root"])
    desc = store.manifest("tiny").extra["codecs"]["cut3"]
    assert desc["cut"] == CUT and desc["kind"] == "tokens" and desc["budgets"] == [4, 8, 16]
    assert [p[0] for p in desc["points"]] == [4, 8, 16, None]  # the planner's candidates at fp16
    assert all(p[1] > 0 and p[2] >= 0 for p in desc["points"]) and desc["trained"]["images"].startswith("digits")
    assert block_id(store.get(desc["block"])) == desc["block"]  # content-addressed: the tensors hash to the id
    store.verify(desc["block"])
    codec = load_codec(store, desc)
    h = torch.randn(2, TOKENS, DIM)
    header, frames = codec.encode(h, budget=8, wire_dtype="int8")
    assert header["kept"] and len(header["kept"]) == 8
    assert codec.decode(header, frames).shape == (2, TOKENS, DIM)
    assert sum(f.nbytes for f in frames) == 2 * TOKENS * 8 + 8 * 4  # int8 values + one fp32 scale per channel


@pytest.mark.timeout(60)
def test_png_folder_and_data_config(tmp_path, trained, capsys):
    from PIL import Image

    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(24):
        px = (torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(px).save(folder / f"{i:02d}.png")
    (folder / "notes.txt").write_text("not an image")
    rc = cli.main(["train-codec", "tiny", "--store", str(trained["root"]), "--cut", "2", "--images",
                   str(tmp_path / "imgs"), "--epochs", "2", "--batch-size", "8", "--budgets", "8,16", "--name",
                   "pngs", "--threads", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "22 training and 2 held-out inputs from 24 images" in out
    desc = BlockStore(trained["root"]).manifest("tiny").extra["codecs"]
    assert {"cut3", "pngs"} <= set(desc) and desc["pngs"]["cut"] == 2 and desc["pngs"]["trained"]["budgets"] == [8, 16]
    assert [p[0] for p in desc["pngs"]["points"]] == [8, 16, None]
    # the manifest's timm data config decides the preprocessing: here identity stats, no crop
    (tmp_path / "two").mkdir()
    Image.new("RGB", (40, 40), (51, 102, 255)).save(tmp_path / "two" / "one.png")
    Image.new("RGB", (40, 40), (0, 0, 0)).save(tmp_path / "two" / "two.png")
    imgs = folder_images(tmp_path / "two", [3, 16, 16], {"mean": [0, 0, 0], "std": [1, 1, 1], "crop_pct": 1.0}, seed=0)
    both = torch.cat([imgs.x_train, imgs.x_test])
    colours = sorted(tuple(round(float(v), 4) for v in x[:, 0, 0]) for x in both)
    assert colours == [(0.0, 0.0, 0.0), (0.2, 0.4, 1.0)] and both.shape == (2, 3, 16, 16)
    assert torch.allclose(both, both[:, :, :1, :1].expand(-1, -1, 16, 16))


@pytest.mark.timeout(60)
def test_cli_refuses_what_does_not_fit(trained, capsys):
    root = str(trained["root"])
    assert cli.main(["train-codec", "tiny", "--store", root, "--images", "digits"]) == 2
    assert "needs --cut K" in capsys.readouterr().err
    assert cli.main(["train-codec", "tiny", "--store", root, "--cut", "6", "--images", "digits"]) == 2
    assert "1..5" in capsys.readouterr().err
    assert cli.main(["train-codec", "tiny", "--store", root, "--cut", "2", "--images", "digits", "--kind",
                     "fmap"]) == 2
    assert "use --kind tokens" in capsys.readouterr().err
    assert cli.main(["train-codec", "--model", "vgg11", "--images", "digits"]) == 2
    assert "--images applies to MODEL" in capsys.readouterr().err
    assert cli.main(["train-codec", "tiny", "--model", "vit", "--store", root]) == 2
    assert "--model applies to the built-in" in capsys.readouterr().err


@pytest.mark.timeout(240)
def test_link_codec_attaches_live_on_a_cluster(trained, capsys):
    """Raw link first; `edgesplit link --codec` while requests stream; the codec is on the link after it."""
    from edgesplit.runtime.cluster import LocalCluster, LocalClusterConfig

    root = trained["root"]
    store = BlockStore(root)
    manifest = store.manifest("tiny")
    desc = manifest.extra["codecs"]["cut3"]
    codec = load_codec(store, desc)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        ref = load_model(store, manifest)(x)
        h = build_blocks(store, manifest, 0, CUT)(x)
        header, frames = codec.encode(h, budget=8, wire_dtype="int8")
        ref_coded = build_blocks(store, manifest, CUT, manifest.n_blocks)(codec.decode(header, frames))
    coded_bytes = sum(P.to_wire(f)[0].nbytes for f in frames)

    lc = LocalCluster(LocalClusterConfig(workers=2, port=0, torch_threads=1), store=root)
    lc.start(timeout_s=120)
    try:
        cl = lc.client(timeout_ms=60_000)
        try:
            cl.deploy("tiny", stages=[("w0", 0, CUT), ("w1", CUT, manifest.n_blocks)])
            f = cl.submit("tiny", x, trace=True)
            assert float((f.result(timeout=60) - ref).abs().max()) <= 1e-5  # raw fp32 link: the unsplit output
            raw_bytes = f.info.trace[0][6]
            assert raw_bytes == TOKENS * DIM * 4
            assert cl.set_link("tiny", 0)["codec"] == "raw"

            results, errors = [], []

            def stream() -> None:
                futs = [cl.submit("tiny", x) for _ in range(24)]
                for fut in futs:
                    try:
                        results.append(fut.result(timeout=60))
                    except Exception as e:  # noqa: BLE001  (collected: the test asserts there are none)
                        errors.append(e)

            t = threading.Thread(target=stream)
            t.start()
            rc = cli.main(["link", "--coordinator", lc.endpoint, "--model", "tiny", "--cut", "0", "--codec", "cut3",
                           "--budget", "8", "--wire-dtype", "int8"])
            t.join(timeout=90)
            out = capsys.readouterr().out
            assert rc == 0, out
            assert not errors and len(results) == 24  # nothing lost while the stages were re-deployed
            assert "codec=cut3" in out and "budget=8" in out and "wire_dtype=int8" in out
            size = store.file_bytes(desc["block"])
            assert f"w0 {size} B" in out and f"w1 {size} B" in out  # each worker fetched the codec's block only

            now = cl.set_link("tiny", 0)  # the sending worker's own account of the link
            assert now["codec"] == "cut3" and now["budget"] == 8 and now["wire_dtype"] == "int8"
            f = cl.submit("tiny", x, trace=True)
            y = f.result(timeout=60)
            assert f.info.trace[0][6] == coded_bytes and coded_bytes * 10 < raw_bytes  # wire bytes fell
            assert float((y - ref_coded).abs().max()) < 1e-4  # encoder on w0, decoder on w1, as simulated here

            back = cl.set_link("tiny", 0, codec="raw", redeploy=True)
            assert back["codec"] == "raw" and set(back["redeployed"]["fetched_bytes"].values()) == {0}
            f = cl.submit("tiny", x, trace=True)
            assert float((f.result(timeout=60) - ref).abs().max()) <= 1e-5 and f.info.trace[0][6] == raw_bytes

            capsys.readouterr()
            assert cli.main(["link", "--coordinator", lc.endpoint, "--model", "tiny", "--cut", "0", "--codec",
                             "nosuch"]) != 0
            assert "nosuch" in capsys.readouterr().err
            f = cl.submit("tiny", x, trace=True)  # a failed attach leaves the link as it was
            assert float((f.result(timeout=60) - ref).abs().max()) <= 1e-5 and f.info.trace[0][6] == raw_bytes
            alive = lc.alive()
            assert all(alive.values()), alive
        finally:
            cl.close()
    finally:
        lc.stop()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["tokens", "fmap"])
def test_pca_init_is_a_nested_reconstruction(kind):
    """Before any training, full width is almost the identity and each larger budget reconstructs better."""
    from edgesplit.compression import create_codec
    from edgesplit.compression.distill import pca_init

    g = torch.Generator().manual_seed(0)
    d = 32 if kind == "tokens" else 16
    basis = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d)  # a decaying spectrum
    if kind == "tokens":
        h = torch.randn(64, TOKENS, d, generator=g) @ basis.T + 3.0  # (N, T, D)
        codec = create_codec("tokens", dim=d)
    else:  # a CNN's activation after ReLU: non-negative
        h = torch.relu(torch.einsum("nhwc,dc->ndhw", torch.randn(32, 6, 6, d, generator=g), basis) + 1.0)
        codec = create_codec("fmap", channels=d)
    budgets = [*codec.budgets, None]
    assert pca_init(codec, h, budgets)
    with torch.no_grad():
        errors = [float((codec(h, b, "fp32") - h).pow(2).mean() / h.var()) for b in budgets]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01, errors
    strided = create_codec("fmap", channels=d, r=2)  # a strided encoder has no centre tap to start from
    assert not pca_init(strided, torch.rand(2, d, 6, 6), budgets)
