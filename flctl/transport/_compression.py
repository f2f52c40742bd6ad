"""Chunk compression for transfers, and the "auto" rule that compresses only where it pays.

Each compressed chunk is one zstd frame (content size and checksum included) of one chunk's
bytes; offsets and sizes elsewhere always count uncompressed bytes. Two codecs exist besides
``"none"``:

- ``"zstd"``: the chunk as it is;
- ``"zstd-shuffle4"``: the chunk's bytes regrouped into four byte planes first (every 4th byte
  from byte 0, then from byte 1, ...), which puts the sign/exponent bytes of floating-point
  values side by side. On float32 weights zstd-1 alone saves about 8 %; after the shuffle about
  16 % (docs/benchmarks.md, "Compression"). Half-precision data gains from the same grouping.

Float weights compress little and zstd runs at a few hundred MiB/s, slower than a loopback or
LAN link, so compressing can make a transfer slower. The ``"auto"`` mode therefore measures a
sample of each blob (its first MiB, with each codec both ends speak) and models a pipelined
transfer, where compressing, sending and decompressing overlap::

    raw        = size / link
    compressed = max(size / compress_rate, size * ratio / link, size / decompress_rate)

Between two processes of one machine (a loopback peer) "auto" never compresses: the link is
those processes' own CPUs, so compressing and decompressing can only take time from it, and
the rate a sender measures there is the receiver's pace (hashing, writing), not a network's.

It compresses only when ``compressed <= (1 - margin) * raw`` with a 10 % margin, so data that
shrinks by less than 10 % is never compressed whatever the link, and a link faster than the
compressor never is. The link rate comes from a :class:`LinkMeter` fed by earlier transfers
with the same peer; until one has been measured, the rate of a loopback mTLS link is assumed
(:data:`DEFAULT_LINK_BYTES_PER_S`), which keeps float32 data uncompressed there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass, replace

import zstandard

from flctl.core.errors import IntegrityError, InvalidInputError, LimitExceededError

__all__ = [
    "CODECS",
    "CODEC_NONE",
    "CODEC_ZSTD",
    "CODEC_ZSTD_SHUFFLE",
    "COMPRESSING_CODECS",
    "DEFAULT_LINK_BYTES_PER_S",
    "Decision",
    "LEVELS",
    "LinkMeter",
    "SAMPLE_BYTES",
    "choose_codec",
    "compress_chunk",
    "compress_chunks",
    "decompress_chunk",
    "negotiate_codecs",
    "should_compress",
]

MiB = 1 << 20

CODEC_NONE = "none"
CODEC_ZSTD = "zstd"
CODEC_ZSTD_SHUFFLE = "zstd-shuffle4"
#: The codecs this build reads and writes, ``"none"`` first.
CODECS: tuple[str, ...] = (CODEC_NONE, CODEC_ZSTD, CODEC_ZSTD_SHUFFLE)
#: The codecs that compress (every one but ``"none"``).
COMPRESSING_CODECS: tuple[str, ...] = (CODEC_ZSTD, CODEC_ZSTD_SHUFFLE)
#: The zstd levels ``transport.compression_level`` accepts.
LEVELS = range(1, 20)

#: The link rate assumed before one is measured: mTLS gRPC on loopback, 1 MiB chunks, as
#: measured on the project's reference machine.
DEFAULT_LINK_BYTES_PER_S = 750.0 * MiB
#: "auto" compresses only when the modelled transfer time drops by at least this fraction.
DEFAULT_MARGIN = 0.10
#: How much of a blob "auto" samples: enough to time, little next to a model.
SAMPLE_BYTES = 1 * MiB
#: Samples smaller than this are not worth compressing (nor long enough to time).
MIN_SAMPLE_BYTES = 64 * 1024


def _check_level(level: int) -> None:
    if level not in LEVELS:
        raise ValueError(f"zstd level must be in 1..19, got {level!r}")


def _shuffle4(data: bytes | memoryview) -> bytes:
    import numpy as np  # lazily: `flctl --help` never pays for numpy

    raw = np.frombuffer(data, np.uint8)
    whole = len(raw) - len(raw) % 4
    return raw[:whole].reshape(-1, 4).T.tobytes() + raw[whole:].tobytes()


def _unshuffle4(data: bytes) -> bytes:
    import numpy as np

    raw = np.frombuffer(data, np.uint8)
    whole = len(raw) - len(raw) % 4
    planes = raw[:whole].reshape(4, -1).astype(np.uint32)
    # Rebuilding 32-bit words is ~3x faster than a transposed byte copy.
    words = planes[0] | planes[1] << 8 | planes[2] << 16 | planes[3] << 24
    out: bytes = words.astype("<u4").tobytes() + raw[whole:].tobytes()
    return out


def compress_chunk(data: bytes | memoryview, level: int = 1, *, codec: str = CODEC_ZSTD) -> bytes:
    """Return one zstd frame of ``data`` (shuffled first for ``"zstd-shuffle4"``).

    CPU-bound and GIL-free in its heavy part: call it from a worker thread on a server.

    Raises:
        ValueError: ``level`` outside 1..19 or ``codec`` not a compressing codec.
    """
    _check_level(level)
    if codec == CODEC_ZSTD_SHUFFLE:
        data = _shuffle4(data)
    elif codec != CODEC_ZSTD:
        raise ValueError(f"codec must be one of {COMPRESSING_CODECS!r}, got {codec!r}")
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True)
    return compressor.compress(data)


def decompress_chunk(data: bytes | memoryview, *, max_size: int, codec: str = CODEC_ZSTD) -> bytes:
    """Return the bytes of one zstd frame of ``codec``, never more than ``max_size``.

    The frame must declare its content size (:func:`compress_chunk` always does), and nothing
    may follow it; the size is checked before any memory is allocated for the output.

    Raises:
        LimitExceededError: The frame declares more than ``max_size`` bytes.
        IntegrityError: The data is not one intact zstd frame (corrupt, truncated, failed
            checksum, trailing bytes).
        InvalidInputError: Unknown codec, or a frame that does not declare its size.
    """
    if codec not in COMPRESSING_CODECS:
        raise InvalidInputError(f"unknown codec {codec!r}; this build reads {COMPRESSING_CODECS}")
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"chunk is not a valid zstd frame: {exc}") from None
    if declared < 0:
        raise InvalidInputError("zstd frame does not declare its content size")
    if declared > max_size:
        raise LimitExceededError(
            f"zstd frame declares {declared} bytes, more than the {max_size} allowed"
        )
    try:
        out = zstandard.ZstdDecompressor().decompress(data, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"chunk is not a valid zstd frame: {exc}") from None
    return _unshuffle4(out) if codec == CODEC_ZSTD_SHUFFLE else out


async def compress_chunks(
    chunks: Iterator[bytes], codec: str, level: int = 1, *, keep_smaller: bool = False
) -> AsyncGenerator[tuple[bytes, str, int], None]:
    """Yield ``(payload, codec, raw_size)`` for each of ``chunks``, compressed with ``codec``.

    With a compressing codec, reading the next chunk (``next(chunks)``) and compressing it run
    in a worker thread, one chunk ahead of the consumer, so the event loop stays responsive
    and compression overlaps sending. With ``"none"`` the chunks pass through unchanged, read
    on the loop as before. ``keep_smaller`` sends a chunk raw (codec ``"none"``) when its frame
    would not be smaller, for streams whose chunks each name their codec (downloads); an
    upload, whose header names one codec for all, keeps it False.

    Example:
        ```python
        async with contextlib.aclosing(compress_chunks(blob_chunks, "zstd", 1)) as stream:
            async for payload, codec, raw_size in stream:
                await send(payload, codec, raw_size)
        ```
    """
    if codec == CODEC_NONE:
        for data in chunks:
            yield data, CODEC_NONE, len(data)
        return

    def encode() -> tuple[bytes, str, int] | None:
        data = next(chunks, None)
        if data is None:
            return None
        frame = compress_chunk(data, level, codec=codec)
        if keep_smaller and len(frame) >= len(data):
            return data, CODEC_NONE, len(data)
        return frame, codec, len(data)

    ahead = asyncio.ensure_future(asyncio.to_thread(encode))
    try:
        while (item := await ahead) is not None:
            ahead = asyncio.ensure_future(asyncio.to_thread(encode))
            yield item
    finally:
        ahead.cancel()  # a consumer that stops early leaves no task behind


def negotiate_codecs(mode: str, peer_codecs: Sequence[str]) -> list[str]:
    """Return the codecs both ends speak under ``mode``, ``"none"`` first (and always).

    Example:
        ```python
        negotiate_codecs("auto", ["none", "zstd"])  # ["none", "zstd"]
        negotiate_codecs("none", ["none", "zstd"])  # ["none"]
        ```
    """
    if mode == "none":
        return [CODEC_NONE]
    if mode == "zstd":
        return [c for c in (CODEC_NONE, CODEC_ZSTD) if c == CODEC_NONE or c in peer_codecs]
    return [c for c in CODECS if c == CODEC_NONE or c in peer_codecs]


@dataclass(frozen=True)
class Decision:
    """Which codec to send a blob with, and the figures that decided it.

    Attributes:
        codec: ``"none"``, ``"zstd"`` or ``"zstd-shuffle4"``.
        reason: Why, in words (for logs and events).
        ratio: Compressed / raw size of the sample with the best codec (1.0 when not measured).
        compress_bytes_per_s: Raw bytes per second that codec compressed the sample at.
        decompress_bytes_per_s: Raw bytes per second it decompressed the sample at.
        link_bytes_per_s: The link rate the decision assumed.
        speedup: Modelled raw transfer time / compressed transfer time (1.0: no gain).
    """

    codec: str
    reason: str
    ratio: float = 1.0
    compress_bytes_per_s: float = 0.0
    decompress_bytes_per_s: float = 0.0
    link_bytes_per_s: float = 0.0
    speedup: float = 1.0


def _measure(sample: bytes | memoryview, level: int, codec: str) -> tuple[float, float, float]:
    """Return (ratio, compress rate, decompress rate) of ``codec`` on ``sample``."""
    start = time.perf_counter()
    frame = compress_chunk(sample, level, codec=codec)
    compressed = time.perf_counter()
    decompress_chunk(frame, max_size=len(sample), codec=codec)
    done = time.perf_counter()
    size = len(sample)
    # A clock tick of 0 would mean "infinitely fast": bound it by the timer's resolution.
    tick = time.get_clock_info("perf_counter").resolution
    return (
        len(frame) / size,
        size / max(compressed - start, tick),
        size / max(done - compressed, tick),
    )


def should_compress(
    sample: bytes | memoryview,
    link_bytes_per_s: float,
    level: int = 1,
    *,
    codecs: Sequence[str] = COMPRESSING_CODECS,
    margin: float = DEFAULT_MARGIN,
) -> Decision:
    """Compress ``sample`` with each of ``codecs`` and decide whether compressing pays.

    The pipelined model of the module docstring is applied to each codec's measured ratio and
    speeds; the fastest wins if it beats sending raw by ``margin``. CPU-bound (a few ms per
    MiB of sample): call it from a worker thread on a server.

    Args:
        sample: The first chunk(s) of the blob (1 MiB is plenty).
        link_bytes_per_s: The link's rate, e.g. :attr:`LinkMeter.rate`.
        level: The zstd level the transfer would use.
        codecs: The compressing codecs both ends speak.
        margin: The fraction of transfer time compressing must save.

    Example:
        ```python
        decision = await asyncio.to_thread(should_compress, first_chunk, meter.rate, 1)
        if decision.codec != "none":
            frame = compress_chunk(chunk, 1, codec=decision.codec)
        ```
    """
    if link_bytes_per_s <= 0:
        raise ValueError(f"link_bytes_per_s must be > 0, got {link_bytes_per_s!r}")
    candidates = [c for c in codecs if c in COMPRESSING_CODECS]
    if not candidates:
        return Decision(CODEC_NONE, "the peer reads no compressed codec")
    if len(sample) < MIN_SAMPLE_BYTES:
        return Decision(CODEC_NONE, f"blob too small to gain ({len(sample)} bytes sampled)")
    raw_time = 1.0 / link_bytes_per_s  # seconds per raw byte
    best: Decision | None = None
    for codec in candidates:
        ratio, compress_rate, decompress_rate = _measure(sample, level, codec)
        modelled = max(1.0 / compress_rate, ratio / link_bytes_per_s, 1.0 / decompress_rate)
        option = Decision(
            codec,
            "",
            ratio=ratio,
            compress_bytes_per_s=compress_rate,
            decompress_bytes_per_s=decompress_rate,
            link_bytes_per_s=link_bytes_per_s,
            speedup=raw_time / modelled,
        )
        if best is None or option.speedup > best.speedup:
            best = option
    assert best is not None
    figures = (
        f"{best.codec}: ratio {best.ratio:.3f}, compress {best.compress_bytes_per_s / MiB:.0f} "
        f"MiB/s, decompress {best.decompress_bytes_per_s / MiB:.0f} MiB/s, link "
        f"{link_bytes_per_s / MiB:.0f} MiB/s"
    )
    if best.speedup * (1.0 - margin) >= 1.0:
        return replace(best, reason=f"{best.speedup:.2f}x faster ({figures})")
    return replace(best, codec=CODEC_NONE, reason=f"would not pay ({figures})")


def choose_codec(
    mode: str,
    sample: bytes | memoryview,
    *,
    link_bytes_per_s: float = DEFAULT_LINK_BYTES_PER_S,
    level: int = 1,
    codecs: Sequence[str] = COMPRESSING_CODECS,
    loopback: bool = False,
) -> Decision:
    """Pick the codec for one blob under ``transport.compression`` = ``mode``.

    ``"none"`` never compresses, ``"zstd"`` always uses plain zstd (if the peer reads it),
    ``"auto"`` asks :func:`should_compress`, except for a ``loopback`` peer (on this machine),
    where it never compresses. ``codecs`` are those negotiated with the peer.

    Raises:
        ValueError: Unknown ``mode``.
    """
    if mode == "none":
        return Decision(CODEC_NONE, "compression is off")
    if mode == "zstd":
        if CODEC_ZSTD in codecs:
            return Decision(CODEC_ZSTD, "compression is on")
        return Decision(CODEC_NONE, "the peer does not read zstd")
    if mode == "auto":
        if loopback:
            return Decision(
                CODEC_NONE,
                "the peer is on this machine: compressing would take the CPU the link runs on",
                link_bytes_per_s=link_bytes_per_s,
            )
        return should_compress(sample, link_bytes_per_s, level, codecs=codecs)
    raise ValueError(f"mode must be 'auto', 'zstd' or 'none', got {mode!r}")


class LinkMeter:
    """An estimate of one peer's link rate, from the transfers measured so far.

    Feed it the bytes that crossed the link and the seconds they took (a sender: the time it
    was held back by flow control; a receiver: first chunk to last). Transfers shorter than
    ``min_bytes`` are ignored: buffers absorb them and their rate means nothing. Each
    measurement moves the estimate halfway towards itself.

    Args:
        default: The rate assumed until a transfer was measured.
        min_bytes: The smallest transfer that counts.
    """

    def __init__(
        self, default: float = DEFAULT_LINK_BYTES_PER_S, *, min_bytes: int = 4 * MiB
    ) -> None:
        if default <= 0:
            raise ValueError(f"default must be > 0, got {default!r}")
        self._rate = default
        self.min_bytes = min_bytes
        self.is_measured = False

    @property
    def rate(self) -> float:
        """Bytes per second."""
        return self._rate

    def observe(self, nbytes: int, seconds: float) -> None:
        """Account for ``nbytes`` that crossed the link in ``seconds``."""
        if nbytes < self.min_bytes or seconds <= 0:
            return
        measured = nbytes / seconds
        self._rate = measured if not self.is_measured else (self._rate + measured) / 2
        self.is_measured = True
