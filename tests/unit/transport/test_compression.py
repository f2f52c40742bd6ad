"""Chunk compression: frames round-trip, bad frames are refused, and the "auto" rule."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from flctl.core.errors import IntegrityError, InvalidInputError, LimitExceededError
from flctl.transport import (
    CODEC_NONE,
    CODEC_ZSTD,
    CODEC_ZSTD_SHUFFLE,
    CODECS,
    COMPRESSING_CODECS,
    DEFAULT_LINK_BYTES_PER_S,
    LinkMeter,
    choose_codec,
    compress_chunk,
    compress_chunks,
    decompress_chunk,
    negotiate_codecs,
    should_compress,
)
from flctl.transport._compression import _shuffle4
from flctl.transport.grpc import is_loopback_peer

MiB = 1 << 20
LOOPBACK = 750 * MiB
rng = np.random.default_rng(0)
#: Float32 weights as a model holds them: random, barely compressible.
FLOAT32 = (rng.standard_normal(MiB // 4) * 0.02).astype(np.float32).tobytes()
#: bfloat16 values (the top halves of float32 ones): a quarter of their bytes compress away.
BF16 = (np.frombuffer(FLOAT32, np.uint32) >> 16).astype(np.uint16).tobytes()


@settings(max_examples=100, deadline=None)
@given(
    data=st.binary(max_size=5000),
    codec=st.sampled_from(COMPRESSING_CODECS),
    level=st.sampled_from([1, 3, 19]),
)
def test_round_trip(data: bytes, codec: str, level: int) -> None:
    frame = compress_chunk(data, level, codec=codec)
    assert decompress_chunk(frame, max_size=len(data), codec=codec) == data


def test_shuffle_groups_byte_planes_and_keeps_a_ragged_tail() -> None:
    assert _shuffle4(b"abcdABCDxy") == b"aAbBcCdDxy"
    frame = compress_chunk(memoryview(FLOAT32), codec=CODEC_ZSTD_SHUFFLE)
    assert decompress_chunk(frame, max_size=len(FLOAT32), codec=CODEC_ZSTD_SHUFFLE) == FLOAT32
    # the point of the shuffle: float32 shrinks about twice as much
    plain = len(compress_chunk(FLOAT32))
    assert len(frame) < plain - (len(FLOAT32) - plain)


@pytest.mark.parametrize("codec", COMPRESSING_CODECS)
def test_a_corrupt_frame_is_an_integrity_error(codec: str) -> None:
    frame = bytearray(compress_chunk(FLOAT32, codec=codec))
    frame[len(frame) // 2] ^= 0xFF
    with pytest.raises(IntegrityError, match="not a valid zstd frame"):
        decompress_chunk(bytes(frame), max_size=len(FLOAT32), codec=codec)


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"not a zstd frame at all",
        compress_chunk(FLOAT32)[:-100],  # truncated
        compress_chunk(b"abc") + b"trailing",  # more than one frame's bytes
        compress_chunk(b"abc") * 2,  # two frames in one chunk
    ],
    ids=["empty", "garbage", "truncated", "trailing", "two-frames"],
)
def test_malformed_frames_are_refused(bad: bytes) -> None:
    with pytest.raises(IntegrityError, match="not a valid zstd frame"):
        decompress_chunk(bad, max_size=len(FLOAT32))


def test_a_frame_larger_than_allowed_is_refused_before_decompressing() -> None:
    bomb = compress_chunk(bytes(64 * MiB))  # ~2 KiB on the wire
    assert len(bomb) < 64 * 1024
    with pytest.raises(LimitExceededError, match=f"declares {64 * MiB} bytes, more than the"):
        decompress_chunk(bomb, max_size=MiB)
    assert decompress_chunk(compress_chunk(bytes(MiB)), max_size=MiB) == bytes(MiB)


def test_frames_must_declare_their_size_and_codecs_must_be_known() -> None:
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(b"abc")
    with pytest.raises(InvalidInputError, match="does not declare its content size"):
        decompress_chunk(unsized, max_size=10)
    with pytest.raises(InvalidInputError, match="unknown codec 'lz4'"):
        decompress_chunk(compress_chunk(b"abc"), max_size=10, codec="lz4")
    with pytest.raises(ValueError, match="level must be in 1..19"):
        compress_chunk(b"abc", 0)
    with pytest.raises(ValueError, match="codec must be one of"):
        compress_chunk(b"abc", codec=CODEC_NONE)


def test_negotiation() -> None:
    assert negotiate_codecs("auto", list(CODECS)) == list(CODECS)
    assert negotiate_codecs("auto", ["none", "zstd", "brotli"]) == ["none", "zstd"]
    assert negotiate_codecs("auto", []) == ["none"]  # an older client: raw only
    assert negotiate_codecs("zstd", list(CODECS)) == ["none", "zstd"]
    assert negotiate_codecs("none", list(CODECS)) == ["none"]


def test_auto_keeps_float32_raw_on_loopback() -> None:
    decision = should_compress(FLOAT32, LOOPBACK)
    assert decision.codec == "none", decision.reason
    assert "would not pay" in decision.reason
    # the assumed rate before any transfer was measured is the loopback one
    assert choose_codec("auto", FLOAT32).codec == "none"
    assert DEFAULT_LINK_BYTES_PER_S == LOOPBACK


def test_auto_never_compresses_what_shrinks_by_less_than_the_margin() -> None:
    # plain zstd saves ~8 % on float32: below the 10 % margin however slow the link
    decision = should_compress(FLOAT32, 1 * MiB, codecs=[CODEC_ZSTD])
    assert decision.codec == "none", decision.reason
    assert 0.85 < decision.ratio < 0.97


def test_auto_compresses_where_it_pays() -> None:
    slow = 20 * MiB
    zeros = should_compress(bytes(MiB), slow, codecs=[CODEC_ZSTD])
    assert zeros.codec == "zstd" and zeros.ratio < 0.01 and zeros.speedup > 10, zeros.reason
    bf16 = should_compress(BF16, slow)
    assert bf16.codec != "none" and bf16.ratio < 0.8, bf16.reason
    # on a slow link the byte shuffle is what makes float32 worth compressing
    float32 = should_compress(FLOAT32, slow)
    assert float32.codec == CODEC_ZSTD_SHUFFLE and float32.ratio < 0.87, float32.reason


def test_auto_leaves_small_blobs_raw_and_needs_a_codec() -> None:
    assert should_compress(bytes(1000), 1 * MiB).codec == "none"
    assert should_compress(bytes(MiB), 1 * MiB, codecs=[]).codec == "none"
    with pytest.raises(ValueError, match="link_bytes_per_s"):
        should_compress(bytes(MiB), 0)


def test_choose_codec_modes() -> None:
    assert choose_codec("none", bytes(MiB), link_bytes_per_s=MiB).codec == "none"
    assert choose_codec("zstd", b"").codec == "zstd"  # no sample needed
    assert choose_codec("zstd", b"", codecs=[CODEC_ZSTD_SHUFFLE]).codec == "none"
    assert choose_codec("auto", bytes(MiB), link_bytes_per_s=MiB).codec != "none"
    with pytest.raises(ValueError, match="mode"):
        choose_codec("always", b"")


def test_link_meter() -> None:
    meter = LinkMeter(default=100.0, min_bytes=1000)
    assert meter.rate == 100.0 and not meter.is_measured
    meter.observe(999, 1.0)  # too small to mean anything
    meter.observe(5000, 0.0)
    assert meter.rate == 100.0 and not meter.is_measured
    meter.observe(4000, 2.0)
    assert meter.rate == 2000.0 and meter.is_measured
    meter.observe(6000, 1.0)
    assert meter.rate == 4000.0  # halfway towards each new measurement
    with pytest.raises(ValueError, match="default"):
        LinkMeter(default=0)


def test_compress_chunks_in_order_with_raw_fallback() -> None:
    pieces = [bytes(MiB), rng.bytes(4096), b"x" * 5000]

    async def collect(codec: str, keep_smaller: bool) -> list[tuple[bytes, str, int]]:
        return [
            item
            async for item in compress_chunks(iter(pieces), codec, 1, keep_smaller=keep_smaller)
        ]

    raw = asyncio.run(collect(CODEC_NONE, True))
    assert raw == [(p, "none", len(p)) for p in pieces]
    kept = asyncio.run(collect(CODEC_ZSTD, True))
    # the random piece does not shrink: sent raw; the others are frames of their pieces
    assert [codec for _, codec, _ in kept] == ["zstd", "none", "zstd"]
    assert kept[1][0] == pieces[1]
    framed = asyncio.run(collect(CODEC_ZSTD, False))
    assert [codec for _, codec, _ in framed] == ["zstd"] * 3
    for (data, codec, size), piece in zip(framed, pieces, strict=True):
        assert size == len(piece) and decompress_chunk(data, max_size=size, codec=codec) == piece


def test_compress_chunks_stops_early_without_leaks() -> None:
    async def main() -> None:
        stream = compress_chunks(iter([bytes(MiB)] * 5), CODEC_ZSTD, 1)
        first = await anext(stream)
        await stream.aclose()  # e.g. the client went away
        assert first[1] == "zstd"

    asyncio.run(main())


def test_auto_never_compresses_for_a_peer_on_this_machine() -> None:
    # even where compressing would pay on a network (zeros over a slow link), a loopback
    # peer's "link" is the CPUs that compressing would take
    slow = 20 * MiB
    assert should_compress(bytes(MiB), slow).codec != "none"
    decision = choose_codec("auto", bytes(MiB), link_bytes_per_s=slow, loopback=True)
    assert decision.codec == "none" and "this machine" in decision.reason
    # an explicit "zstd" is obeyed wherever the peer is
    assert choose_codec("zstd", bytes(MiB), loopback=True).codec == "zstd"


@pytest.mark.parametrize(
    ("peer", "local"),
    [
        ("ipv4:127.0.0.1:50000", True),
        ("ipv4:127.8.9.10:1", True),
        ("ipv6:[::1]:50000", True),
        ("ipv6:%5B::1%5D:50000", True),
        ("unix:/tmp/flctl.sock", True),
        ("ipv4:10.0.0.7:50000", False),
        ("ipv6:[2001:db8::1]:443", False),
        ("ipv4:not-an-address:1", False),
        ("", False),
        ("garbage", False),
    ],
)
def test_loopback_peers_are_recognised(peer: str, local: bool) -> None:
    assert is_loopback_peer(peer) is local
