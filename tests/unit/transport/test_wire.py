from hypothesis import given, settings
from hypothesis import strategies as st

from flctl.transport.grpc import (
    ChunkOut,
    decode_chunk,
    decode_upload,
    encode_chunk,
    encode_upload,
    pb,
)
from flctl.transport.grpc._server import coordinator_handlers
from flctl.transport.grpc._servicers import CoordinatorServicer

u64 = st.integers(0, 2**64 - 1)
codecs = st.sampled_from(["", "zstd", "zstd-shuffle4"]) | st.text(max_size=20)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=3000), offset=u64, total=u64, codec=codecs, raw_size=u64)
def test_chunk_encoding_equals_generated_code(
    data: bytes, offset: int, total: int, codec: str, raw_size: int
) -> None:
    ours = encode_chunk(ChunkOut(data, offset, total, codec, raw_size))
    theirs = pb.Chunk(
        data=data, offset=offset, total_size=total, codec=codec, raw_size=raw_size
    ).SerializeToString()
    assert ours == theirs
    back = decode_chunk(ours)
    assert bytes(back.data) == data and back.offset == offset and back.total_size == total
    assert back.codec == codec and back.raw_size == raw_size


def test_chunk_without_codec_fields_encodes_as_before() -> None:
    # a raw chunk carries no codec bytes: older peers read it unchanged
    assert encode_chunk(ChunkOut(b"ab", 3, 5)) == b"\x0a\x02ab\x10\x03\x18\x05"
    assert encode_chunk(ChunkOut(b"ab", 3, 5, "zstd", 9)).endswith(b"\x22\x04zstd\x28\x09")


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=3000), offset=u64, total=u64)
def test_chunk_decoder_accepts_any_valid_encoding(data: bytes, offset: int, total: int) -> None:
    # fields out of order and an unknown field: the fallback parser handles them
    msg = (
        pb.Chunk(total_size=total).SerializeToString() + pb.Chunk(offset=offset).SerializeToString()
    )
    msg += pb.Chunk(data=data).SerializeToString() + b"\x30\x07"  # field 6, varint
    back = decode_chunk(msg)
    assert bytes(back.data) == data and back.offset == offset and back.total_size == total


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=3000))
def test_upload_data_encoding_equals_generated_code(data: bytes) -> None:
    ours = encode_upload(data)
    assert ours == pb.UploadChunk(data=data).SerializeToString()
    assert bytes(decode_upload(ours)) == data  # type: ignore[arg-type]


def test_upload_header_round_trip_and_garbage() -> None:
    header = pb.UploadHeader(server_round=3, task_id="t", digest="a" * 64, size=10)
    assert decode_upload(encode_upload(header)) == header
    assert decode_upload(b"") is None
    assert decode_upload(b"\x12\xff\xff") is None  # truncated length: not a valid message
    assert decode_upload(b"\x12\x05abc") is None


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200))
def test_random_bytes_never_raise(raw: bytes) -> None:
    decode_upload(raw)


def test_handler_table_covers_the_proto_service() -> None:
    handler = coordinator_handlers(CoordinatorServicer(handler=None))  # type: ignore[arg-type]
    service = pb.DESCRIPTOR.services_by_name["Coordinator"]
    for method in service.methods:
        details = type("D", (), {"method": f"/flctl.v1.Coordinator/{method.name}"})()
        assert handler.service(details) is not None, method.name
