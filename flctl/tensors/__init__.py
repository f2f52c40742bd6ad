"""Tensors on the wire and at rest: safetensors files, specs, fingerprints and checks.

Only this package (and aggregation, privacy, client) imports torch, and only inside functions,
so ``flctl --help`` and the coordinator's control plane start fast.
"""

from flctl.tensors._codec import (
    check_update,
    load_parameters,
    save_parameters,
    sha256_file,
    spec_of,
)
from flctl.tensors._diff import diff_tensors, save_torch_state_dict
from flctl.tensors._encoding import (
    UPDATE_DTYPES,
    UPDATE_ENCODINGS,
    UpdateEncoding,
    UpdateReader,
    encode_update,
    expected_update_spec,
)
from flctl.tensors._follow import FollowingHasher
from flctl.tensors._masked import (
    MASKED_ENCODING,
    MASKED_TENSOR,
    MaskedWriter,
    SecureLayout,
    iter_masked,
    masked_metadata,
    masked_spec,
)
from flctl.tensors._quantize import Quantizer
from flctl.tensors._spec import (
    DTYPE_SIZES,
    MAX_HEADER_BYTES,
    TensorSpec,
    compare_specs,
    describe_spec_difference,
    fingerprint,
    read_metadata,
    read_spec,
    read_spec_bytes,
)
from flctl.tensors._stream import TensorReader, TensorWriter, torch_dtype
from flctl.tensors._validate import StreamValidator

__all__ = [
    "DTYPE_SIZES",
    "FollowingHasher",
    "MASKED_ENCODING",
    "MASKED_TENSOR",
    "MAX_HEADER_BYTES",
    "MaskedWriter",
    "Quantizer",
    "SecureLayout",
    "StreamValidator",
    "TensorReader",
    "TensorSpec",
    "TensorWriter",
    "UPDATE_DTYPES",
    "UPDATE_ENCODINGS",
    "UpdateEncoding",
    "UpdateReader",
    "check_update",
    "compare_specs",
    "describe_spec_difference",
    "diff_tensors",
    "encode_update",
    "expected_update_spec",
    "fingerprint",
    "iter_masked",
    "load_parameters",
    "masked_metadata",
    "masked_spec",
    "read_metadata",
    "read_spec",
    "read_spec_bytes",
    "save_parameters",
    "save_torch_state_dict",
    "sha256_file",
    "spec_of",
    "torch_dtype",
]
