"""Fixtures for the security tests: CAs are made once per session (EC keys are cheap anyway)."""

from __future__ import annotations

import pytest

from flctl.security import KeyPair, generate_ca


@pytest.fixture(scope="session")
def ca() -> KeyPair:
    return generate_ca()


@pytest.fixture(scope="session")
def other_ca() -> KeyPair:
    return generate_ca("Another CA")


@pytest.fixture(scope="session")
def same_name_ca() -> KeyPair:
    """A different CA with the default name, so the issuer names match but signatures do not."""
    return generate_ca()
