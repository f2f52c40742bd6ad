"""Hand-framed codecs for the two data-carrying messages, ``Chunk`` and ``UploadChunk``.

The generated classes copy every 1 MiB payload into a message and again into its encoding,
which halves loopback throughput. These functions write and read the very same protobuf
encoding (field order and varints as the generated code produces; a test checks byte
equality) with one copy on send and none on receive (a ``memoryview`` into gRPC's buffer).
Anything unusual (other field orders, unknown fields) falls back to the generated parser, so
the proto stays the single definition of the wire.
"""

from __future__ import annotations

from typing import NamedTuple

from google.protobuf.message import DecodeError

from flctl.transport.grpc._proto import flctl_pb2 as pb

__all__ = [
    "ChunkOut",
    "UploadItem",
    "decode_chunk",
    "decode_upload",
    "encode_chunk",
    "encode_upload",
    "parse_upload",
]


class ChunkOut(NamedTuple):
    """One piece of a blob: its bytes, where they start, and the blob's total size.

    ``codec`` is "" for raw bytes, or the codec of the one compressed frame in ``data``, which
    then holds ``raw_size`` bytes; ``offset`` always counts uncompressed bytes.
    """

    data: bytes | memoryview
    offset: int
    total_size: int
    codec: str = ""
    raw_size: int = 0


#: What an upload stream carries: the header first, then data (as bytes or a view).
UploadItem = pb.UploadHeader | bytes | memoryview

_CHUNK_DATA = 0x0A  # field 1, length-delimited
_CHUNK_OFFSET = 0x10  # field 2, varint
_CHUNK_TOTAL = 0x18  # field 3, varint
_CHUNK_CODEC = 0x22  # field 4, length-delimited
_CHUNK_RAW_SIZE = 0x28  # field 5, varint
_CHUNK_TAGS = (_CHUNK_DATA, _CHUNK_OFFSET, _CHUNK_TOTAL, _CHUNK_CODEC, _CHUNK_RAW_SIZE)
_UPLOAD_HEADER = 0x0A  # UploadChunk.header, field 1, length-delimited
_UPLOAD_DATA = 0x12  # UploadChunk.data, field 2, length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while pos < len(buf) and shift < 64:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
    raise ValueError("truncated varint")


def encode_chunk(chunk: ChunkOut) -> bytes:
    """Serialize a ``Chunk`` exactly as the generated code would."""
    parts: list[bytes | memoryview] = []
    if len(chunk.data):
        parts += [bytes((_CHUNK_DATA,)), _varint(len(chunk.data)), chunk.data]
    if chunk.offset:
        parts += [bytes((_CHUNK_OFFSET,)), _varint(chunk.offset)]
    if chunk.total_size:
        parts += [bytes((_CHUNK_TOTAL,)), _varint(chunk.total_size)]
    if chunk.codec:
        codec = chunk.codec.encode()
        parts += [bytes((_CHUNK_CODEC,)), _varint(len(codec)), codec]
    if chunk.raw_size:
        parts += [bytes((_CHUNK_RAW_SIZE,)), _varint(chunk.raw_size)]
    return b"".join(parts)


def decode_chunk(raw: bytes) -> ChunkOut:
    """Parse a ``Chunk``; the data is a view into ``raw`` (no copy)."""
    view = memoryview(raw)
    try:
        data: bytes | memoryview = b""
        offset = total = raw_size = 0
        codec = ""
        pos = 0
        expected = _CHUNK_DATA
        while pos < len(view):
            tag = view[pos]
            if tag < expected or tag not in _CHUNK_TAGS:
                raise ValueError("not canonical")
            pos += 1
            if tag in (_CHUNK_DATA, _CHUNK_CODEC):
                length, pos = _read_varint(view, pos)
                if pos + length > len(view):
                    raise ValueError("truncated")
                if tag == _CHUNK_DATA:
                    data = view[pos : pos + length]
                else:
                    codec = bytes(view[pos : pos + length]).decode()  # bad UTF-8: ValueError
                pos += length
            elif tag == _CHUNK_OFFSET:
                offset, pos = _read_varint(view, pos)
            elif tag == _CHUNK_TOTAL:
                total, pos = _read_varint(view, pos)
            else:
                raw_size, pos = _read_varint(view, pos)
            expected = tag + 1
        return ChunkOut(data, offset, total, codec, raw_size)
    except ValueError:
        message = pb.Chunk.FromString(raw)
        return ChunkOut(
            message.data, message.offset, message.total_size, message.codec, message.raw_size
        )


def encode_upload(item: UploadItem) -> bytes:
    """Serialize one ``UploadChunk``: a header, or a piece of data."""
    if isinstance(item, pb.UploadHeader):
        return pb.UploadChunk(header=item).SerializeToString()
    return b"".join((bytes((_UPLOAD_DATA,)), _varint(len(item)), item))


def parse_upload(raw: bytes) -> UploadItem | None:
    """Parse one ``UploadChunk``: its header, its data (a view, no copy), or None if empty.

    Raises:
        DecodeError: ``raw`` is not an ``UploadChunk`` (the server's tolerant decoder turns
            this into a ``Malformed`` request).
    """
    view = memoryview(raw)
    if len(view) and view[0] == _UPLOAD_DATA:
        try:
            length, pos = _read_varint(view, 1)
        except ValueError:
            length, pos = -1, 0
        if pos + length == len(view):
            return view[pos:]
    message = pb.UploadChunk.FromString(raw)
    kind = message.WhichOneof("msg")
    if kind == "header":
        return message.header
    if kind == "data":
        return message.data
    return None


def decode_upload(raw: bytes) -> UploadItem | None:
    """Parse one ``UploadChunk`` as :func:`parse_upload` does; None also if it is unreadable."""
    try:
        return parse_upload(raw)
    except DecodeError:
        return None
