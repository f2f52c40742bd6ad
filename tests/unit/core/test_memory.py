import ctypes.util

from flctl.core._memory import return_large_buffers


def test_the_mmap_threshold_is_fixed_where_glibc_is_present() -> None:
    # mallopt answers 1 when it accepted the setting; without a C library nothing is done
    assert return_large_buffers() == (ctypes.util.find_library("c") is not None)
