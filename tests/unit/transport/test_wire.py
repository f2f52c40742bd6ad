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


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=3000), offset=u64, total=u64)
def test_chunk_encoding_equals_generated_code(data: bytes, offset: int, total: int) -> None:
    ours = encode_chunk(ChunkOut(data, offset, total))
    theirs = pb.Chunk(data=data, offset=offset, total_size=total).SerializeToString()
    assert ours == theirs
    back = decode_chunk(ours)
    assert bytes(back.data) == data and back.offset == offset and back.total_size == total


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=3000), offset=u64, total=u64)
def test_chunk_decoder_accepts_any_valid_encoding(data: bytes, offset: int, total: int) -> None:
    # fields out of order and an unknown field: the fallback parser handles them
    msg = (
        pb.Chunk(total_size=total).SerializeToString() + pb.Chunk(offset=offset).SerializeToString()
    )
    msg += pb.Chunk(data=data).SerializeToString() + b"\x20\x07"  # field 4, varint
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
