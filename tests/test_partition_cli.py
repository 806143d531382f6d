"""``edgesplit partition`` / ``inspect``: refusals before any write, honest weights, timm's preprocessing,
and a coordinator that starts past one broken manifest.

A small ViT (img_size 32, patch 4: 14 blocks) keeps each partition under a few seconds on a CPU.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from edgesplit.partitioner import BlockStore, load_model
from edgesplit.partitioner.errors import UsageError
from edgesplit.runtime import cli

EDGESPLIT = [sys.executable, "-m", "edgesplit.runtime.cli"]
VIT = "vit_tiny_patch16_224"
VIT_KW = ["--kwarg", "img_size=32", "--kwarg", "patch_size=4"]
VIT_BLOCKS = 14  # embed + 12 blocks + head
ATOL = 1e-5  # stored blocks vs the source model, fp32 on one machine


def _vit(seed: int = 0) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(VIT, pretrained=False, img_size=32, patch_size=4).eval()


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else ["<absent>"]


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """An existing directory with a file in it: a refused partition must leave it exactly so."""
    root = tmp_path / "store"
    root.mkdir()
    (root / "keep.txt").write_text("untouched")
    return root


@pytest.mark.timeout(120)
@pytest.mark.parametrize("flags, says", [
    (["--split", "4,99"], "1..13"),
    (["--split", "0"], "1..13"),
    (["--split", "8,4"], "strictly increasing"),
    (["--split", "4,4"], "strictly increasing"),
    (["--split", "4,x"], "4,x"),
    (["--stages", "20"], "1..14"),
    (["--stages", "-1"], "1..14"),
    (["--stages", "0"], "1..14"),
    (["--split", ","], "empty item"),
    (["--split", "4,,8"], "empty item"),
    (["--split", "4,8,"], "empty item"),
    (["--split", ""], "empty item"),
    (["--name", "no spaces"], "--name"),
])
def test_bad_split_or_stages_is_one_line_and_writes_nothing(store_dir, tmp_path, capsys, flags, says):
    fresh = tmp_path / "fresh"
    for root in (store_dir, fresh):
        before = _listing(root)
        assert cli.main(["partition", VIT, *VIT_KW, "--store", str(root), "--no-profile", *flags]) == 2
        line = _one_line_error(capsys.readouterr().err)
        assert says in line and line.startswith("edgesplit partition: error:")
        assert _listing(root) == before


@pytest.mark.timeout(120)
@pytest.mark.parametrize("args, says", [
    ([VIT + "x"], "no model"),
    ([VIT, "--kwarg", "no_such_keyword=1"], "no_such_keyword"),
    ([VIT, "--kwarg", "=3"], "KEY=VALUE"),
    (["efficientnet_b0"], "cannot split"),
])
def test_unknown_model_or_bad_kwarg_is_one_line(store_dir, capsys, args, says):
    before = _listing(store_dir)
    assert cli.main(["partition", *args, "--store", str(store_dir), "--no-profile"]) == 2
    assert says in _one_line_error(capsys.readouterr().err)
    assert _listing(store_dir) == before


@pytest.mark.timeout(60)
def test_inspect_of_a_missing_store_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert cli.main(["inspect", VIT, "--store", str(missing)]) == 2
    assert str(missing) in _one_line_error(capsys.readouterr().err)
    assert not missing.exists()
    with pytest.raises(UsageError, match="no block store"):
        BlockStore(missing, create=False)
    assert not missing.exists()


@pytest.mark.timeout(180)
def test_weights_file_gives_the_source_models_outputs(tmp_path, capsys):
    from safetensors.torch import save_file

    src = _vit(seed=7)
    st = tmp_path / "w.safetensors"
    save_file(src.state_dict(), st)
    store = tmp_path / "store"
    assert cli.main(["partition", VIT, *VIT_KW, "--store", str(store), "--no-profile", "--split", "5,9",
                     "--weights", str(st)]) == 0
    captured = capsys.readouterr()
    assert "random weights" not in captured.err and "weights: file" in captured.out
    bs = BlockStore(store)
    m = bs.manifest(VIT)
    assert m.extra["splits"] == [5, 9]
    assert m.extra["weights"] == {"source": "file", "file": "w.safetensors",
                                  "file_sha256": hashlib.sha256(st.read_bytes()).hexdigest()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(load_model(bs, m)(x), src(x), atol=ATOL)

    # the same weights as a timm-style checkpoint (wrapped, DDP prefixes): read weights-only, same blocks
    ckpt = tmp_path / "w.pth.tar"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, ckpt)
    assert cli.main(["partition", VIT, *VIT_KW, "--store", str(store), "--no-profile", "--name", "from-pth",
                     "--weights", str(ckpt)]) == 0
    m2 = bs.manifest("from-pth")
    assert [b.id for b in m2.blocks] == [b.id for b in m.blocks]
    assert m2.extra["weights"]["file_key"] == "state_dict"


class _Boom:
    """A pickle that runs a command when unpickled: what a weights file must never be allowed to do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.timeout(180)
def test_wrong_or_unsafe_weights_file_is_one_line(store_dir, tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    before = _listing(store_dir)
    other = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("resnet10t", pretrained=False).state_dict(), other)
    assert cli.main(["partition", VIT, *VIT_KW, "--store", str(store_dir), "--weights", str(other)]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "do not fit" in line and "missing" in line and "unexpected" in line and "bn1.bias" in line

    big = tmp_path / "vit224.safetensors"  # right names, other shapes (224 px, patch 16)
    save_file(timm.create_model(VIT, pretrained=False).state_dict(), big)
    assert cli.main(["partition", VIT, *VIT_KW, "--store", str(store_dir), "--weights", str(big)]) == 2
    assert "pos_embed (1, 197, 192) vs (1, 65, 192)" in _one_line_error(capsys.readouterr().err)

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": _Boom(marker)}, evil)
    assert cli.main(["partition", VIT, *VIT_KW, "--store", str(store_dir), "--weights", str(evil)]) == 2
    assert "never unpickles" in _one_line_error(capsys.readouterr().err)
    assert not marker.exists()

    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint")
    assert cli.main(["partition", VIT, *VIT_KW, "--store", str(store_dir), "--weights", str(junk)]) == 2
    _one_line_error(capsys.readouterr().err)
    assert _listing(store_dir) == before


@pytest.mark.timeout(120)
def test_pretrained_offline_is_one_line_naming_the_case(store_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "th")}
    before = _listing(store_dir)
    out = subprocess.run([*EDGESPLIT, "partition", "resnet10t", "--pretrained", "--store", str(store_dir)],
                         capture_output=True, text=True, timeout=110, env=env)
    assert out.returncode == 2, out.stderr
    line = _one_line_error(out.stderr)
    assert "could not download pretrained weights for resnet10t" in line and "--weights FILE" in line
    assert _listing(store_dir) == before


@pytest.mark.timeout(60)
def test_random_weights_are_said_and_recorded(tmp_path):
    out = subprocess.run([*EDGESPLIT, "partition", "resnet10t", "--store", str(tmp_path / "s"), "--no-profile"],
                         capture_output=True, text=True, timeout=55)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "random weights (no --pretrained/--weights): outputs are meaningless"
    assert "weights: random" in out.stdout and "block" in out.stdout  # the table stays on stdout
    m = BlockStore(tmp_path / "s", create=False).manifest("resnet10t")
    assert m.extra["weights"] == {"source": "random"}


def _stderr_on_a_terminal(argv: list[str], timeout_s: float) -> tuple[int, str]:
    """Run ``edgesplit ARGV`` with stderr on a pseudo-terminal (100 columns); its exit status and stderr."""
    import fcntl
    import pty
    import struct
    import termios

    main_fd, sub_fd = pty.openpty()
    fcntl.ioctl(sub_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    proc = subprocess.Popen([*EDGESPLIT, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=sub_fd)
    os.close(sub_fd)
    out = b""
    try:
        while chunk := os.read(main_fd, 4096):
            out += chunk
    except OSError:  # EIO: the terminal's other end closed
        pass
    finally:
        os.close(main_fd)
    return proc.wait(timeout=timeout_s), out.decode(errors="replace")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pseudo-terminal sizes are set the Linux way")
@pytest.mark.timeout(120)
def test_progress_bar_on_a_terminal_only(tmp_path):
    argv = ["partition", VIT, *VIT_KW, "--store", str(tmp_path / "s")]
    rc, err = _stderr_on_a_terminal(argv, 100)
    assert rc == 0 and "storing and timing blocks: 100%" in err and f"{VIT_BLOCKS}/{VIT_BLOCKS}" in err
    rc, err = _stderr_on_a_terminal([*argv, "--quiet", "--no-profile"], 100)
    assert rc == 0 and "%|" not in err and "outputs are meaningless" in err


def _png(path: Path, h: int = 61, w: int = 47) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.timeout(120)
def test_data_config_is_timms_and_images_go_through_its_transform(tmp_path):
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from edgesplit.runtime.inputs import load_input

    png = _png(tmp_path / "img.png")
    store = tmp_path / "s"
    # an unmodified model: the stored config is exactly timm's
    assert cli.main(["partition", "resnet10t", "--store", str(store), "--no-profile"]) == 0
    m = BlockStore(store).manifest("resnet10t")
    ref_cfg = resolve_data_config({}, model=timm.create_model("resnet10t", pretrained=False))
    cfg = m.extra["data_config"]
    assert cfg == {k: list(v) if isinstance(v, tuple) else v for k, v in ref_cfg.items()}
    ref = create_transform(**ref_cfg, is_training=False)(Image.open(png).convert("RGB")).unsqueeze(0)
    x = load_input(str(png), m.input_shape, cfg)
    assert x.shape == (1, 3, 176, 176) and torch.equal(x, ref)

    # built with kwargs: the config follows the model's real input (timm's own still says 224)
    assert cli.main(["partition", VIT, *VIT_KW, "--store", str(store), "--no-profile"]) == 0
    m = BlockStore(store).manifest(VIT)
    cfg = m.extra["data_config"]
    assert cfg["input_size"] == m.input_shape == [3, 32, 32]
    assert (cfg["mean"], cfg["std"], cfg["interpolation"], cfg["crop_pct"]) == ([0.5] * 3, [0.5] * 3, "bicubic", 0.9)
    ref = create_transform(**resolve_data_config({"input_size": (3, 32, 32)}, model=_vit()), is_training=False)(
        Image.open(png).convert("RGB")).unsqueeze(0)
    x = load_input(str(png), m.input_shape, cfg)
    assert x.shape == (1, 3, 32, 32) and torch.equal(x, ref)
    assert not torch.allclose(load_input(str(png), m.input_shape), x)  # the ImageNet fallback differs


@pytest.mark.timeout(60)
def test_load_input_refusals(tmp_path, monkeypatch):
    from edgesplit.runtime.errors import BadInput
    from edgesplit.runtime.inputs import load_input

    np.save(tmp_path / "one.npy", np.ones((3, 8, 8)))
    assert load_input(str(tmp_path / "one.npy"), [3, 8, 8]).shape == (1, 3, 8, 8)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BadInput, match="object arrays are refused"):
        load_input(str(tmp_path / "obj.npy"), [3, 8, 8])
    png = _png(tmp_path / "img.png")
    cfg = {"input_size": [3, 16, 16], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3,
           "crop_pct": 0.9, "crop_mode": "center"}
    with pytest.raises(UsageError, match=r"input_size \[3, 16, 16\] is not the model's input \[3, 32, 32\]"):
        load_input(str(png), [3, 32, 32], cfg)
    with pytest.raises(UsageError, match="not an RGB image"):
        load_input(str(png), [1, 32, 32], None)
    with pytest.raises(UsageError, match="does not exist"):
        load_input(str(tmp_path / "absent.png"), [3, 32, 32])
    monkeypatch.setitem(sys.modules, "PIL", None)  # Pillow not installed
    with pytest.raises(UsageError, match=r"pip install 'edgesplit\[images\]'"):
        load_input(str(png), [3, 16, 16], cfg)


@pytest.mark.timeout(150)
def test_coordinator_starts_past_a_broken_manifest_and_names_it(tmp_path):
    from edgesplit.partitioner import partition
    from edgesplit.runtime.cluster import LocalCluster, LocalClusterConfig
    from edgesplit.runtime.dummy import build_dummy, dummy_recipe
    from edgesplit.runtime.errors import UnknownModel

    root = tmp_path / "store"
    store = BlockStore(root)
    partition(build_dummy(n_blocks=3), "dummy3", dummy_recipe(3), store, input_shape=[4], profile=False)
    (root / "models" / "broken.json").write_text('{"version": 1, "name": "broken", "blocks": [')
    assert store.scan_models()[0] == ["dummy3"] and store.list_models() == ["dummy3"]

    with LocalCluster(LocalClusterConfig(workers=1, port=0, torch_threads=1), store=root,
                      coordinator_args=["--no-replan"]) as lc:
        assert lc.alive()["coordinator"]
        deadline = time.monotonic() + 10
        while "broken.json" not in lc.log_tail("coordinator") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "broken.json" in lc.log_tail("coordinator")
        cl = lc.client()
        cl.deploy("dummy3", n_stages=1)
        assert torch.equal(cl.infer("dummy3", torch.zeros(1, 4)), torch.full((1, 4), 3.0))
        with pytest.raises(UnknownModel, match="broken.json"):
            cl.route("broken")
        assert [m["name"] for m in cl.models()] == ["dummy3"]


@pytest.mark.timeout(60)
def test_classwise_refusals_come_before_the_store_and_training(tmp_path, capsys):
    """Each is refused in about a second: no training run (--epochs 50), no ``<name>.full`` stored first."""
    from safetensors.torch import save_file

    junk, other = tmp_path / "junk.bin", tmp_path / "other.safetensors"
    junk.write_bytes(b"\x00not a checkpoint at all")
    save_file({"w": torch.zeros(2)}, other)
    store = tmp_path / "store"
    for flags, says in [(["--classwise", "11", "--weights", str(other)], "--classwise 11: digits has 10 classes, "
                                                                           "so 1..10"),
                        (["--classwise", "-1"], "1..10 class groups"),
                        (["--classwise", "0"], "1..10 class groups"),
                        (["--classwise", "2", "--split", "3"], "drop --split/--stages"),
                        (["--classwise", "2", "--weights", str(junk)], "is not a checkpoint"),
                        (["--classwise", "2", "--weights", str(other)], "do not fit resnet18")]:
        t0 = time.perf_counter()
        assert cli.main(["partition", "resnet18", "--store", str(store), "--epochs", "50", *flags]) == 2, flags
        assert says in _one_line_error(capsys.readouterr().err), flags
        assert not store.exists() and time.perf_counter() - t0 < 15, flags


@pytest.mark.timeout(60)
def test_classwise_refuses_a_model_it_cannot_prune_before_training(tmp_path, capsys):
    assert cli.main(["partition", "resnet50", "--store", str(tmp_path / "s"), "--classwise", "2"]) == 2
    assert "plain BasicBlock" in _one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "s").exists()


@pytest.mark.timeout(60)
def test_weights_refusals_say_what_the_file_is_and_never_advise_unsafe_loading(tmp_path):
    import pickle
    import warnings

    from edgesplit.partitioner.weights import read_state_dict

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"state_dict": _Boom(marker)}, protocol=4))  # torch warns about protocol 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UsageError) as e:
            read_state_dict(str(evil))
    assert not caught and not marker.exists()
    text = str(e.value)
    assert "holds pickled objects beyond tensors" in text and "never unpickles code" in text
    assert "safetensors.torch.save_file" in text and "weights_only" not in text and "Re-running" not in text
    assert "\n" not in text

    noise = tmp_path / "noise.pth"
    noise.write_bytes(bytes(range(7, 250)) * 4)
    with pytest.raises(UsageError, match=r"is not a checkpoint \(neither safetensors nor a torch file\)"):
        read_state_dict(str(noise))
    with pytest.raises(UsageError, match="is a directory"):
        read_state_dict(str(tmp_path))
    with pytest.raises(UsageError, match="does not exist"):
        read_state_dict(str(tmp_path / "absent.pth"))
    cut = tmp_path / "cut.pth"
    torch.save({"w": torch.zeros(3)}, tmp_path / "whole.pth")
    cut.write_bytes((tmp_path / "whole.pth").read_bytes()[:100])
    with pytest.raises(UsageError, match="truncated or damaged"):
        read_state_dict(str(cut))
    named = tmp_path / "w.bin"  # safetensors is recognised by its content, whatever the name
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, named)
    assert torch.equal(read_state_dict(str(named))[0]["w"], torch.ones(2))


@pytest.mark.timeout(30)
def test_inspect_of_a_json_file_that_is_not_a_manifest_names_it(tmp_path, capsys):
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    assert cli.main(["inspect", str(listing)]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert f"manifest file {listing}: not a model manifest: the top level is a list" in line
