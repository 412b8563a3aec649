"""Shared fixtures: RSA keys are slow to make, so make them once per session
(once per process under pytest-xdist); the ``adapter`` and ``mixed``
fixtures run a test over both callcp adapters (tests/adapters.py)."""

from __future__ import annotations

from typing import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.adapters import FLAVOURS, PAIRS, Adapter

# the arena, target and make_proxy fixtures of the blocking real-socket tests
pytest_plugins = ["tests.sock_support", "tests.cli_support", "tests.hsm_support"]


@pytest.fixture(scope="session")
def server_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def client_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# ------------------------------------------- both adapters, one façade


@pytest.fixture(params=FLAVOURS)
def adapter(request: pytest.FixtureRequest, server_key: rsa.RSAPrivateKey) -> Iterator[Adapter]:
    """Client and server of one flavour, "sync" or "aio", in the blocking
    shape of tests/adapters.py (override with indirect parametrization:
    ``@pytest.mark.parametrize("adapter", ["aio"], indirect=True)``)."""
    made = Adapter(client=request.param, server=request.param, key=server_key)
    yield made
    made.close()


@pytest.fixture(params=list(PAIRS))
def mixed(request: pytest.FixtureRequest, server_key: rsa.RSAPrivateKey) -> Iterator[Adapter]:
    """Every (client flavour, server flavour) pair, mixed ones included."""
    client, server = PAIRS[request.param]
    made = Adapter(client=client, server=server, key=server_key)
    yield made
    made.close()
