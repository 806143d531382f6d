"""Limits that stop a flood: what one message may make a receiver allocate, the batch cap, the rate limiter.

A codec header sets the size of the tensors the receiver builds (full width, then the
decoder's output), so a small message with few kept channels under a huge claimed shape
must be refused before anything that size is allocated. Everything here is pure: no sockets.
"""
from __future__ import annotations

import math
import resource
import time

import msgpack
import pytest
import torch

from edgesplit.compression import Codec, WireFormatError, WireLimits, create_codec, list_codecs
from edgesplit.compression import wire
from edgesplit.runtime import protocol as P
from edgesplit.runtime.errors import ConfigError, ProtocolError
from edgesplit.runtime.security.ratelimit import RateLimiter

torch.set_num_threads(1)
DTYPES = ("fp32", "fp16", "int8")


def _crafted(codec: str, shape: list[int], kept: list[int], meta: dict, axis: int = 1) -> tuple[dict, list[bytes]]:
    """A header claiming ``shape`` with only ``kept`` channels sent, and int8 frames of exactly the implied length."""
    header = {"v": wire.WIRE_VERSION, "codec": codec, "dtype": "int8", "shape": shape, "axis": axis,
              "kept": kept, "meta": meta}
    n_values = math.prod(shape) // shape[axis] * len(kept)
    return header, [bytes(n_values), b"\x00\x00\x80\x3f" * len(kept)]  # values, one fp32 scale 1.0 per channel


@pytest.fixture
def no_big_allocation(monkeypatch):
    """Fail if the full-width tensor is built at all; after the test, check it was quick and RSS did not jump."""
    def boom(*args, **kwargs):
        raise AssertionError("the receiver allocated the full-width tensor of a header it should have refused")

    monkeypatch.setattr(wire, "_scatter", boom)
    rss0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    yield
    assert time.perf_counter() - t0 < 2.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 128 * 1024  # KiB on Linux: < 128 MiB


# --- 1. what a codec header may make the receiver allocate ----------------------------------------------
@pytest.mark.timeout(20)
def test_few_kept_channels_under_a_huge_shape_are_refused(no_big_allocation):
    # 4 of 256 channels under 2**28 full-width elements: a 4 MiB message that used to decode to 1 GiB (then 1 GiB more)
    codec = create_codec("fmap", channels=256, r=1)
    header, frames = _crafted("fmap", [1, 256, 1024, 1024], [0, 1, 2, 3], {"out_hw": [1024, 1024]})
    with pytest.raises(WireFormatError, match=f"{2 ** 28} elements, more than the limit {wire.MAX_DECODED_ELEMENTS}"):
        codec.decode(msgpack.unpackb(msgpack.packb(header)), frames)


@pytest.mark.timeout(20)
def test_decoder_output_above_the_cap_is_refused_before_decoding(no_big_allocation):
    # full width 2**25 passes, but r=3 triples H and W: the decoder would write ~3e8 elements
    codec = create_codec("fmap", channels=256, r=3)
    header, frames = _crafted("fmap", [1, 256, 512, 256], [0, 1, 2, 3], {"out_hw": [1532, 764]})
    want = 256 * 1532 * 764
    with pytest.raises(WireFormatError, match=f"to \\[1, 256, 1532, 764\\]: {want} elements, more than the limit "
                                              f"{wire.MAX_DECODED_ELEMENTS}"):
        codec.decode(header, frames)


@pytest.mark.timeout(20)
def test_token_decoder_output_above_the_cap_is_refused(no_big_allocation):
    # 8 channels on the wire, 1024 out of the decoder: 2**20 elements received become 2**27
    codec = create_codec("tokens", dim=1024, enc_dim=8)
    header, frames = _crafted("tokens", [1, 1 << 17, 8], [0, 1, 2, 3], {}, axis=2)
    with pytest.raises(WireFormatError, match=f"{1 << 27} elements, more than the limit"):
        codec.decode(header, frames)


class _BareCodec(Codec):
    """A codec that checks nothing of its own: the wire's expansion bound must still hold."""

    kind = "bare"


@pytest.mark.timeout(20)
def test_expansion_of_kept_channels_is_bounded_for_any_codec(no_big_allocation):
    # one channel of 2**20 received: a 4-byte value frame that would decode to 4 MiB (and to 1 GiB at 2**28)
    header, frames = _crafted("bare", [1, 1 << 20, 1], [7], {})
    with pytest.raises(WireFormatError, match=f"keeps 1 of {1 << 20} channels: {1 << 20}x expansion .* limit "
                                              f"{wire.MAX_EXPANSION}"):
        _BareCodec().decode(header, frames)
    with pytest.raises(WireFormatError, match="expansion"):
        wire.parse_header(header)


@pytest.mark.timeout(20)
def test_limits_are_exact_and_tunable():
    torch.manual_seed(0)
    codec = create_codec("fmap", channels=16, r=2)
    x = torch.rand(2, 16, 6, 6)
    header, frames = codec.encode(x, budget=4, wire_dtype="int8")
    n_out, n_full = x.numel(), math.prod(header["shape"])
    assert codec.decode(header, frames, WireLimits(max_decoded_elements=n_out, max_elements=n_full,
                                                   max_expansion=4)).shape == x.shape
    with pytest.raises(WireFormatError, match=f"{n_out} elements, more than the limit {n_out - 1}"):
        codec.decode(header, frames, WireLimits(max_decoded_elements=n_out - 1))
    with pytest.raises(WireFormatError, match=f"{n_full} elements, more than the limit {n_full - 1}"):
        codec.decode(header, frames, WireLimits(max_elements=n_full - 1))
    with pytest.raises(WireFormatError, match="4x expansion of the received values, more than the limit 3"):
        codec.decode(header, frames, WireLimits(max_expansion=3))
    # what a legitimate codec sends is within the defaults: 4096 channels at budget 4
    assert 4096 // 4 <= wire.MAX_EXPANSION and wire.DEFAULT_LIMITS.max_elements == wire.MAX_DECODED_ELEMENTS


def _cases() -> dict[str, list[tuple[Codec, torch.Tensor]]]:
    torch.manual_seed(3)
    return {
        "identity": [(create_codec("identity"), torch.randn(2, 6, 5)), (create_codec("identity"), torch.randn(7))],
        "fmap": [(create_codec("fmap", channels=16, r=r), torch.rand(2, 16, 7, 9)) for r in (1, 2, 3)]
        + [(create_codec("fmap", channels=16, r=2, enc_channels=8), torch.rand(1, 16, 5, 4))],
        "tokens": [(create_codec("tokens", dim=16), torch.randn(2, 5, 16)),
                   (create_codec("tokens", dim=16, enc_dim=8), torch.randn(1, 3, 16))],
    }


@pytest.mark.timeout(60)
def test_every_codec_still_round_trips_within_the_limits():
    cases = _cases()
    assert sorted(cases) == list_codecs()  # a new codec needs a case here
    for kind, pairs in cases.items():
        for codec, x in pairs:
            for budget in (None, *codec.budgets):
                for dtype in DTYPES:
                    header, frames = codec.encode(x, budget=budget, wire_dtype=dtype)
                    header = msgpack.unpackb(msgpack.packb(header))
                    predicted = codec.decoded_shape(wire.parse_header(header))
                    out = codec.decode(header, [bytes(f) for f in frames])
                    assert out.shape == x.shape == predicted, (kind, codec.config(), budget, dtype)
                    assert torch.equal(out, codec(x, budget, dtype)), (kind, codec.config(), budget, dtype)


# --- 2. the batch cap ----------------------------------------------------------------------------------
@pytest.mark.timeout(10)
def test_check_batch_refuses_above_max_batch():
    assert P.MAX_BATCH == 64
    for shape in ((), (1,), (64, 3, 224, 224), torch.Size([64, 197, 192]), [0, 5]):
        P.check_batch(shape)
    for shape in ((65,), torch.Size([65, 3]), [10 ** 6, 1], [-1, 3]):
        with pytest.raises(ProtocolError, match=f"batch {shape[0]} .*not an int in \\[0, MAX_BATCH 64\\]"):
            P.check_batch(shape)
    for shape in (None, 7, "64", {"a": 1}, [1.5], ["1"], [True]):  # a codec link's cmeta["shape"] is untrusted
        with pytest.raises(ProtocolError, match="bad message"):
            P.check_batch(shape)


# --- 3. the per-peer rate limiter ----------------------------------------------------------------------
@pytest.mark.timeout(10)
def test_rate_limiter_allows_a_burst_then_refuses():
    rl = RateLimiter(rate_per_s=10, burst=5)
    assert [rl.allow(b"a", 100.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert rl.refused == 2
    assert not rl.allow(b"a", 100.05)  # half a token
    assert rl.allow(b"a", 100.1)  # one token back after 1/rate s
    assert rl.refused == 3
    assert rl.tokens(b"a", 1e6) == 5.0  # a long silence refills up to burst, not beyond
    assert sum(rl.allow(b"a", 1e6) for _ in range(20)) == 5


@pytest.mark.timeout(20)
def test_rate_limiter_holds_the_rate_over_simulated_time():
    rl = RateLimiter(rate_per_s=10, burst=5)
    allowed = sum(rl.allow("peer", i / 1000) for i in range(100_000))  # 1000 tries/s for 100 s
    assert 5 + 1000 - 1 <= allowed <= 5 + 1000
    assert rl.refused == 100_000 - allowed
    rl2 = RateLimiter(rate_per_s=250.5, burst=2)  # burst 2: a refill between two tries never spills over
    allowed = sum(rl2.allow("peer", i / 1000) for i in range(20_000))  # fractional rate, 20 s
    assert abs(allowed - (2 + 250.5 * 20)) <= 1


@pytest.mark.timeout(10)
def test_rate_limiter_peers_are_independent():
    rl = RateLimiter(rate_per_s=1, burst=3)
    assert sum(rl.allow(b"flooder", 5.0) for _ in range(1000)) == 3
    assert [rl.allow(b"other", 5.0) for _ in range(4)] == [True] * 3 + [False]
    assert rl.allow("flooder", 5.0)  # str and bytes ids are different peers
    assert rl.refused == 997 + 1


@pytest.mark.timeout(20)
def test_rate_limiter_memory_is_bounded_and_forgetting_is_safe():
    rl = RateLimiter(rate_per_s=1, burst=2, max_peers=100)
    assert rl.allow(b"kept", 0.0) and rl.allow(b"kept", 0.0) and not rl.allow(b"kept", 0.0)
    assert rl.allow(b"old", 0.0)
    for i in range(10_000):
        rl.allow(i.to_bytes(4, "big"), 0.0)
        if i % 50 == 0:
            rl.allow(b"kept", 0.0)  # seen recently: stays remembered (and stays empty)
        assert len(rl) <= 100
    assert len(rl) == 100 and b"kept" in rl and b"old" not in rl
    assert not rl.allow(b"kept", 0.0)  # still limited: a remembered peer is not reset
    assert rl.tokens(b"old", 0.0) == 2.0 and rl.allow(b"old", 0.0)  # forgotten = a new peer: a full bucket


@pytest.mark.timeout(10)
def test_rate_limiter_clock_going_back_and_bad_arguments():
    rl = RateLimiter(rate_per_s=1, burst=1)
    assert rl.allow(b"a", 10.0) and not rl.allow(b"a", 5.0)  # no refill from a clock that went back
    assert not rl.allow(b"a", 10.5) and rl.allow(b"a", 11.0)  # measured from 10.0, not from 5.0
    for kwargs in ({"rate_per_s": 0, "burst": 1}, {"rate_per_s": math.inf, "burst": 1},
                   {"rate_per_s": 1, "burst": 0}, {"rate_per_s": 1, "burst": 1.5},
                   {"rate_per_s": 1, "burst": 1, "max_peers": 0}, {"rate_per_s": True, "burst": 1}):
        with pytest.raises(ConfigError):
            RateLimiter(**kwargs)
