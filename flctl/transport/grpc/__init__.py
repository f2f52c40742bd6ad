"""gRPC: servers, channels, typed clients, status mapping, and the generated messages (``pb``).

``pb`` is the generated message module for proto/flctl/v1/flctl.proto; import messages from it
(``from flctl.transport.grpc import pb``), never from ``_proto`` directly.
"""

import os

# gRPC's C core writes its own log lines straight to stderr (a refused TLS handshake, a port it
# cannot bind, with advice about its environment variables). flctl reports each of those
# itself, in its own words, so the core stays silent unless GRPC_VERBOSITY is set explicitly
# (GRPC_VERBOSITY=ERROR shows its errors when debugging the transport).
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

from flctl.transport.grpc._channel import (  # noqa: E402
    MESSAGE_OVERHEAD,
    channel_options,
    closed_during_handshake,
    insecure_channel,
    is_loopback_host,
    is_loopback_peer,
    probe_certificate,
    secure_channel,
    split_address,
    split_servers,
)
from flctl.transport.grpc._clients import AdminClient, CoordinatorClient
from flctl.transport.grpc._connections import (
    ConnectionLimits,
    ConnectionWatch,
    count_connections,
    fitting_limits,
    raise_descriptor_limit,
)
from flctl.transport.grpc._health import Health, check_health, find_leader, probe_health
from flctl.transport.grpc._proto import flctl_pb2 as pb
from flctl.transport.grpc._records import model_info, round_info, update_info
from flctl.transport.grpc._server import ServerCredentials, start_server
from flctl.transport.grpc._servicers import (
    AdminHandler,
    CoordinatorHandler,
    RpcContext,
)
from flctl.transport.grpc._standby import standby_error, start_standby_server
from flctl.transport.grpc._status import (
    STATUS_TO_ERROR,
    error_metadata,
    is_tls_failure,
    map_rpc_errors,
    status_for,
    translate_rpc_error,
)
from flctl.transport.grpc._values import (
    from_value_map,
    metrics_from_map,
    raw_value_map,
    to_value_map,
)
from flctl.transport.grpc._wire import (  # noqa: E402
    ChunkOut,
    UploadItem,
    decode_chunk,
    decode_upload,
    encode_chunk,
    encode_upload,
)
from flctl.transport.grpc._work import (
    task_from_pb,
    task_to_pb,
    upload_answer_to_pb,
    upload_header_from_pb,
)

PROTOCOL_VERSION = 1

__all__ = [
    "AdminClient",
    "AdminHandler",
    "ChunkOut",
    "ConnectionLimits",
    "ConnectionWatch",
    "CoordinatorClient",
    "CoordinatorHandler",
    "Health",
    "MESSAGE_OVERHEAD",
    "PROTOCOL_VERSION",
    "RpcContext",
    "STATUS_TO_ERROR",
    "ServerCredentials",
    "UploadItem",
    "channel_options",
    "check_health",
    "closed_during_handshake",
    "count_connections",
    "decode_chunk",
    "decode_upload",
    "encode_chunk",
    "encode_upload",
    "error_metadata",
    "find_leader",
    "fitting_limits",
    "from_value_map",
    "insecure_channel",
    "is_loopback_host",
    "is_loopback_peer",
    "is_tls_failure",
    "map_rpc_errors",
    "metrics_from_map",
    "model_info",
    "pb",
    "probe_certificate",
    "probe_health",
    "raise_descriptor_limit",
    "raw_value_map",
    "round_info",
    "secure_channel",
    "split_address",
    "split_servers",
    "standby_error",
    "start_server",
    "start_standby_server",
    "status_for",
    "task_from_pb",
    "task_to_pb",
    "to_value_map",
    "translate_rpc_error",
    "update_info",
    "upload_answer_to_pb",
    "upload_header_from_pb",
]
