"""Moving bytes between coordinator and clients: retry policy and the gRPC plumbing.

Domain code never imports grpc: it uses :mod:`flctl.transport.grpc`'s servers, channels and
typed client wrappers, which translate gRPC statuses to :mod:`flctl.core.errors` and back.
"""

from flctl.transport._backoff import Backoff
from flctl.transport._pipeline import Pipeline

__all__ = ["Backoff", "Pipeline"]
