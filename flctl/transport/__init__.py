"""Moving bytes between coordinator and clients: retry policy, compression, gRPC plumbing.

Domain code never imports grpc: it uses :mod:`flctl.transport.grpc`'s servers, channels and
typed client wrappers, which translate gRPC statuses to :mod:`flctl.core.errors` and back.
"""

from flctl.transport._backoff import Backoff
from flctl.transport._compression import (
    CODEC_NONE,
    CODEC_ZSTD,
    CODEC_ZSTD_SHUFFLE,
    CODECS,
    COMPRESSING_CODECS,
    DEFAULT_LINK_BYTES_PER_S,
    LEVELS,
    SAMPLE_BYTES,
    Decision,
    LinkMeter,
    choose_codec,
    compress_chunk,
    compress_chunks,
    decompress_chunk,
    negotiate_codecs,
    should_compress,
)
from flctl.transport._pipeline import Pipeline

__all__ = [
    "Backoff",
    "CODECS",
    "CODEC_NONE",
    "CODEC_ZSTD",
    "CODEC_ZSTD_SHUFFLE",
    "COMPRESSING_CODECS",
    "DEFAULT_LINK_BYTES_PER_S",
    "Decision",
    "LEVELS",
    "LinkMeter",
    "Pipeline",
    "SAMPLE_BYTES",
    "choose_codec",
    "compress_chunk",
    "compress_chunks",
    "decompress_chunk",
    "negotiate_codecs",
    "should_compress",
]
