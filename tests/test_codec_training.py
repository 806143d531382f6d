"""Compression-aware split training: schedules, split backprop, byte accounting, the CLI.

Tiny models (VGG11 at width 4, a 2-block ViT) on a digits subset, so the file runs in seconds.
The accuracy and traffic figures of the paper's schedules are measured in
``benchmarks/compression.py``, not here.
"""
from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from edgesplit.compression import (
    CodecError,
    budget_penalty,
    load_codec,
    load_splitnet,
    save_splitnet,
)
from edgesplit.compression import cli_train
from edgesplit.compression.data import Dataset, load_digits_split
from edgesplit.compression.splitnets import create_splitnet, list_splitnets
from edgesplit.compression.evaluation import evaluate
from edgesplit.compression.filters import reset_deprune
from edgesplit.compression.training import (
    MIX,
    Phase,
    SplitTrainer,
    TrainConfig,
    parse_phases,
    schedule_phases,
    widen_decoder,
)
from edgesplit.partitioner import BlockStore

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    d = load_digits_split()
    return Dataset(d.x_train[:400], d.y_train[:400], d.x_test[:200], d.y_test[:200], d.num_classes)


def _tiny(name: str = "vgg11", seed: int = 0):
    torch.manual_seed(seed)
    if name == "vgg11":
        return create_splitnet("vgg11", width=4)  # cut: 32 channels at 4x4
    return create_splitnet("vit", patch_px=8, dim=32, depth=2, heads=2, cut=1)  # cut: 17 tokens x 32


# --- schedules ----------------------------------------------------------------------------------
@pytest.mark.timeout(10)
def test_schedules_match_the_paper():
    assert list_splitnets() == ["vgg11", "vit"]
    assert schedule_phases("deprune", 22) == [Phase(15, 4), Phase(7, None, reset=True)]  # Fig. 6
    assert schedule_phases("prune", 20, full_epochs=30) == [Phase(30), Phase(10, 32), Phase(10, 4)]  # Fig. 10
    assert schedule_phases("prune", 8, full_epochs=0) == [Phase(4, 32), Phase(4, 4)]
    assert schedule_phases("none", 5) == [Phase(5)]
    assert schedule_phases("fixed", 5, budget=8, wire_dtype="int8") == [Phase(5, 8, "int8")]
    assert parse_phases("b4:15, reset, full:7") == schedule_phases("deprune", 22)
    assert parse_phases("full:3,b32/int8:2,mix:1") == [Phase(3), Phase(2, 32, "int8"), Phase(1, MIX)]
    assert [p.label for p in parse_phases("full:1,b4:1,b8/int8:1,mix:1")] == [
        "full/fp32", "b4/fp16", "b8/int8", "mix/fp16"]
    # fractions of an epoch
    assert parse_phases("b4:11.5,reset,full:0.5") == schedule_phases("deprune", 12, full_epochs=0.5)
    assert schedule_phases("prune", 3, full_epochs=0, mid_epochs=0.25) == [Phase(0.25, 32), Phase(2.75, 4)]
    assert parse_phases("b32:.25")[0].epochs == 0.25
    assert parse_phases("b4:11,reset,full:1@1e-4") == schedule_phases("deprune", 12, full_epochs=1, full_lr=1e-4)
    assert parse_phases("b4/int8:2@0.003")[0] == Phase(2, 4, "int8", lr=0.003)
    for bad in ("b4", "x:3", "full:2,reset", "", "b4/fp64:2", "b4:0", "full:0.0"):
        with pytest.raises(CodecError):
            parse_phases(bad)
    with pytest.raises(CodecError, match="unknown schedule"):
        schedule_phases("anneal", 3)
    for kw in ({"full_epochs": 3}, {"full_epochs": 0}):
        with pytest.raises(CodecError, match="finish"):
            schedule_phases("deprune", 3, **kw)
    with pytest.raises(CodecError, match="b=32 phase"):
        schedule_phases("prune", 2, mid_epochs=3)


# --- split backprop -------------------------------------------------------------------------------
def _grads(net) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", ["vgg11", "vit"])
@pytest.mark.parametrize("budget", [None, 4])
def test_split_backprop_equals_one_graph(digits, name, budget):
    """The client/server halves with a detached link give the gradients of one autograd graph."""
    net = _tiny(name)
    ref = copy.deepcopy(net)
    x, y = digits.x_train[:16], digits.y_train[:16]
    dtype = "fp32" if budget is None else "fp16"
    trainer = SplitTrainer(net, digits, TrainConfig(lr=0.0, weight_decay=0.0, progress=False))
    ce, _, _, _ = trainer._step(x, y, budget, dtype, penalize=budget is not None)
    split = _grads(net)

    loss = F.cross_entropy(ref(x, budget, dtype), y)  # straight-through link in one graph
    if budget is not None:
        loss = loss + budget_penalty(ref.codec.filter_logits, budget)
    loss.backward()
    whole = _grads(ref)
    assert ce == pytest.approx(float(F.cross_entropy(ref(x, budget, dtype), y).detach()), rel=1e-4)
    assert split.keys() == whole.keys()
    client_scale = max(float(g.abs().max()) for n, g in whole.items() if n.startswith(("client", "codec.encoder")))
    for n in split:
        if budget is None:  # fp32 both ways: identical up to float summation order
            assert torch.allclose(split[n], whole[n], rtol=1e-4, atol=1e-7), n
        elif n.startswith(("server", "codec.decoder")):  # the server saw identical inputs
            assert torch.allclose(split[n], whole[n], rtol=1e-4, atol=1e-7), n
        else:  # the client got the gradient back as fp16 (conv biases before BN: ~0 either way)
            assert torch.allclose(split[n], whole[n], rtol=1e-2, atol=1e-3 * client_scale), n


# --- accounting, filter handling, learning ------------------------------------------------------------
@pytest.mark.timeout(20)
def test_bytes_counted_per_direction_match_the_formula(digits):
    small = Dataset(digits.x_train[:64], digits.y_train[:64], digits.x_test[:32], digits.y_test[:32], 10)
    net = _tiny("vgg11")
    trainer = SplitTrainer(net, small, TrainConfig(batch_size=16, count_headers=False, progress=False))
    full, b4, b8 = trainer.run(parse_phases("full:1,b4:1,b8/int8:1"))
    steps = 4  # 64 samples / 16
    assert full.act_bytes == full.grad_bytes == steps * 16 * 32 * 4 * 4 * 4  # N x C x H x W x fp32
    assert b4.act_bytes == b4.grad_bytes == steps * 16 * 4 * 4 * 4 * 2  # 4 channels, fp16 both ways
    assert b8.act_bytes == steps * (16 * 8 * 4 * 4 * 1 + 8 * 4)  # int8 codes + one fp32 scale per channel
    assert b8.grad_bytes == steps * 16 * 8 * 4 * 4 * 2  # gradients return as fp16
    assert b8.cum_bytes == sum(r.act_bytes + r.grad_bytes for r in (full, b4, b8))
    with_headers = SplitTrainer(_tiny("vgg11"), small, TrainConfig(batch_size=16, progress=False))
    (h4,) = with_headers.run(parse_phases("b4:1"))
    assert 0 < h4.act_bytes - b4.act_bytes < steps * 200  # a msgpack header per message, small


@pytest.mark.timeout(20)
def test_deprune_resets_then_freezes_the_filter(digits):
    small = Dataset(digits.x_train[:64], digits.y_train[:64], digits.x_test[:32], digits.y_test[:32], 10)
    net = _tiny("vgg11")
    p0 = net.codec.filter_logits.detach().clone()
    seen = []
    trainer = SplitTrainer(net, small, TrainConfig(batch_size=16, progress=False))
    trainer.run(parse_phases("b4:1,reset,full:1,mix:1"),
                on_epoch=lambda r: seen.append(net.codec.filter_logits.detach().clone()))
    after_b4, after_full, after_mix = seen
    assert not torch.equal(after_b4, p0)  # the compressed phase trains p
    opened = after_b4 >= 0.9
    assert bool((after_full[opened] == 15.0).all())  # reset: kept channels fully open ...
    assert bool(((after_full[~opened] >= 0) & (after_full[~opened] < 3)).all())  # ... others U(0, 3)
    assert torch.equal(after_mix, after_full)  # frozen in uncompressed and mix phases
    labels = [r.label for r in trainer.history]
    assert labels == ["b4/fp16", "full/fp32", "mix/fp16"]


@pytest.mark.timeout(20)
def test_fractional_phases_and_evaluation_points(digits):
    small = Dataset(digits.x_train[:128], digits.y_train[:128], digits.x_test[:32], digits.y_test[:32], 10)
    net = _tiny("vgg11")
    trainer = SplitTrainer(net, small, TrainConfig(batch_size=16, evals_per_epoch=4, progress=False))
    recs = trainer.run(parse_phases("b16:0.25,b4:0.5,reset,full:0.375"))  # 8 steps per epoch
    assert [r.epoch for r in recs] == [0.25, 0.5, 0.75, 1, 1.125]  # every 2 steps, and at phase ends
    assert [r.steps for r in recs] == [2, 4, 6, 8, 9]
    assert [r.label for r in recs] == ["b16/fp16", "b4/fp16", "b4/fp16", "full/fp32", "full/fp32"]
    assert recs[-1].cum_bytes == sum(r.act_bytes + r.grad_bytes for r in recs)
    # one epoch of data is one permutation, carried across phases: the same samples as one phase
    a = SplitTrainer(_tiny("vgg11"), small, TrainConfig(batch_size=16, progress=False))
    b = SplitTrainer(_tiny("vgg11"), small, TrainConfig(batch_size=16, evals_per_epoch=2, progress=False))
    (ra,) = a.run(parse_phases("full:1"))
    rb = b.run(parse_phases("full:0.25,full:0.75"))
    assert [r.epoch for r in rb] == [0.25, 0.5, 1]
    assert ra.train_ce == pytest.approx((2 * rb[0].train_ce + 2 * rb[1].train_ce + 4 * rb[2].train_ce) / 8, rel=1e-5)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", ["vgg11", "vit"])
def test_widening_at_the_reset_keeps_the_function(digits, name):
    cfg = (TrainConfig(lr=0.05, momentum=0.9, batch_size=32, progress=False) if name == "vgg11" else
           TrainConfig(lr=3e-3, optimizer="adamw", batch_size=32, progress=False))
    net = _tiny(name)
    trainer = SplitTrainer(net, digits, cfg)
    trainer.run(parse_phases("b4:8"))
    at_b4 = evaluate(net, digits.x_test, digits.y_test, 4, "fp32")
    plain = copy.deepcopy(net)
    reset_deprune(plain.codec.filter_logits)
    silenced = widen_decoder(net.codec, 4)
    reset_deprune(net.codec.filter_logits)
    assert silenced == net.codec.width - 4
    widened = evaluate(net, digits.x_test, digits.y_test, None, "fp32")
    assert abs(widened - at_b4) <= 2.0  # the kept channels' scale moves from sigmoid(p)^3 to ~1, nothing else
    assert at_b4 > 40  # it learned something (chance is 10 %)
    assert evaluate(plain, digits.x_test, digits.y_test, None, "fp32") < at_b4 - 10  # untrained channels as noise
    # the trainer does it at a reset after a compressed phase when asked
    net2 = _tiny(name)
    tr2 = SplitTrainer(net2, digits, TrainConfig(batch_size=32, lr=1e-3, widen_at_reset=True, progress=False))
    tr2.run(parse_phases("b4:0.5"))
    kept = net2.codec.mask(4)[0]
    tr2.run(parse_phases("reset,full:0.03"))  # one step
    first = next(m for m in net2.codec.decoder.modules() if isinstance(m, (torch.nn.Linear, torch.nn.ConvTranspose2d)))
    dim = 0 if isinstance(first, torch.nn.ConvTranspose2d) else 1
    norms = first.weight.detach().transpose(0, dim).reshape(net2.codec.width, -1).abs().sum(1)
    others = torch.ones(net2.codec.width, dtype=torch.bool)
    others[kept] = False
    assert float(norms[others].max()) < 0.1 * float(norms[kept].min())  # one step from zero, not untrained


@pytest.mark.timeout(10)
def test_cosine_per_phase_restarts_the_learning_rate(digits):
    small = Dataset(digits.x_train[:64], digits.y_train[:64], digits.x_test[:32], digits.y_test[:32], 10)
    seen = []
    for schedule in ("cosine", "cosine_phase"):
        trainer = SplitTrainer(_tiny("vgg11"), small, TrainConfig(batch_size=16, lr=0.1, lr_schedule=schedule,
                                                                   progress=False))
        lrs = []
        orig = trainer._step
        trainer._step = lambda *a, **k: (lrs.append(trainer.opt_server.param_groups[0]["lr"]), orig(*a, **k))[1]
        trainer.run(parse_phases("b4:1,full:1"))  # 4 steps each
        seen.append(lrs)
    assert seen[0][0] == pytest.approx(0.1) and seen[0][4] < 0.06  # one decay over both phases
    assert seen[1][0] == pytest.approx(0.1) and seen[1][4] == pytest.approx(0.1)  # each phase from lr
    trainer = SplitTrainer(_tiny("vgg11"), small, TrainConfig(batch_size=16, lr=0.1, progress=False))
    trainer.run(parse_phases("b4:1,full:1@0.002"))  # a phase's own learning rate (constant schedule)
    assert trainer.opt_client.param_groups[0]["lr"] == pytest.approx(0.002)
    trainer.run(parse_phases("full:1"))
    assert trainer.opt_client.param_groups[0]["lr"] == pytest.approx(0.1)
    with pytest.raises(CodecError, match="lr schedule"):
        SplitTrainer(_tiny("vgg11"), small, TrainConfig(lr_schedule="step", progress=False)).run(parse_phases("full:1"))


@pytest.mark.timeout(30)
def test_split_training_learns_digits_at_budget_4(digits):
    net = _tiny("vgg11")
    trainer = SplitTrainer(net, digits, TrainConfig(lr=0.05, momentum=0.9, batch_size=32, progress=False))
    recs = trainer.run(parse_phases("full:3,b4:3"), eval_points=[(4, "int8")])
    assert recs[-1].test_acc > 40.0, [r.test_acc for r in recs]  # chance is 10 %
    assert recs[-1].extra_acc["b4/int8"] > 40.0
    assert recs[-1].weight_sum < recs[2].weight_sum  # the penalty pulls sum sigmoid(p)^2 towards b


@pytest.mark.timeout(20)
def test_identity_codec_trains_only_uncompressed(digits):
    from edgesplit.compression import create_codec

    net = _tiny("vgg11")
    net.codec = create_codec("identity")
    with pytest.raises(CodecError, match="no filter"):
        SplitTrainer(net, digits, TrainConfig(progress=False)).run(parse_phases("b4:1"))


# --- storage and the CLI -------------------------------------------------------------------------------
@pytest.mark.timeout(20)
def test_split_model_round_trips_through_the_store(tmp_path, digits):
    store = BlockStore(tmp_path / "s")
    net = _tiny("vit")
    net.train()(digits.x_train[:8])  # move BN statistics
    desc = save_splitnet(store, net)
    assert json.loads(json.dumps(desc)) == desc
    back = load_splitnet(store, desc).eval()
    net.eval()
    x = digits.x_test[:5]
    with torch.no_grad():
        assert torch.equal(back(x, 4, "int8"), net(x, 4, "int8"))
    with pytest.raises(CodecError, match="unknown split model"):
        load_splitnet(store, {**desc, "name": "resnet"})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgesplit train-codec")
    cli_train.add_arguments(parser)
    return parser


@pytest.mark.timeout(10)
def test_cli_help_explains_every_option():
    parser = _parser()
    for action in parser._actions:
        assert action.help and len(action.help) > 10, action.option_strings
    text = parser.format_help()
    for flag in ("--schedule", "--phases", "--store", "--init", "--wire-dtype", "deprune", "prune"):
        assert flag in text


@pytest.mark.timeout(40)
def test_cli_trains_stores_and_continues(tmp_path, capsys):
    store, out1, out2 = tmp_path / "store", tmp_path / "full.json", tmp_path / "prune.json"
    common = ["--model", "vgg11", "--width", "4", "--train-limit", "128", "--batch-size", "32", "--no-progress",
              "--threads", "1", "--store", str(store)]
    assert cli_train.run(_parser().parse_args(common + ["--schedule", "none", "--epochs", "1", "--out", str(out1)])) == 0
    res = json.loads(out1.read_text())
    assert len(res["history"]) == 1 and res["history"][0]["label"] == "full/fp32"
    assert {r["budget"] for r in res["table"]} == {None, 4, 8, 16}
    codec = load_codec(BlockStore(store), res["codec"])
    assert codec.kind == "fmap" and codec.width == 32
    # prune from the stored uncompressed model: no uncompressed phase, b=32 is the full width here
    args = common + ["--schedule", "prune", "--epochs", "2", "--mid-budget", "16", "--init", str(out1),
                     "--out", str(out2)]
    assert cli_train.run(_parser().parse_args(args)) == 0
    res2 = json.loads(out2.read_text())
    assert [h["label"] for h in res2["history"]] == ["b16/fp16", "b4/fp16"]
    assert res2["history"][0]["extra_acc"].keys() == {"b4/fp16"}
    capsys.readouterr()
    assert cli_train.run(_parser().parse_args(common + ["--dim", "64"])) == 2
    assert "--dim applies to --model vit" in capsys.readouterr().err
