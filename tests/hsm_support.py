"""A real PKCS#11 token for the tests: SoftHSM2, in a temporary directory.

``.ci/run`` installs SoftHSM2 (Debian's ``softhsm2``) when it is missing, so
these tests run in CI; without it they fail, saying how to install it (a
skipped test would stand in for the feature).  The token lives in its own
directory, named by ``SOFTHSM2_CONF``, which this process sets once (SoftHSM
reads it when the library is first initialised, and python-pkcs11 loads a
library once per process; the subprocesses the tests start inherit it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

PIN = "4711-callcp"
SO_PIN = "0815-officer"
LABEL = "callcp-tests"
OTHER_LABEL = "callcp-other"


@dataclass
class SoftHsm:
    conf: Path
    pin_file: Path
    label: str = LABEL

    def uri(self, object: str, *, pin: bool = True, extra: str = "") -> str:
        """``pkcs11:`` URI of the key ``object`` in the test token."""
        query = "module-name=softhsm2"
        if pin:
            query += f"&pin-source=file:{self.pin_file}"
        return f"pkcs11:token={self.label};object={object}{extra}?{query}"


def _softhsm_util() -> str:
    tool = shutil.which("softhsm2-util")
    if tool is None:
        pytest.fail(
            "SoftHSM2 is not installed: the PKCS#11 tests need it "
            "(apt-get install softhsm2; .ci/run installs it)",
            pytrace=False,
        )
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        pytest.fail("python-pkcs11 is not installed: pip install -e '.[dev]'", pytrace=False)
    return tool


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    """Two initialised tokens (``LABEL`` with the server and client keys,
    ``OTHER_LABEL`` empty) in a temporary SoftHSM2 directory."""
    tool = _softhsm_util()
    root = tmp_path_factory.mktemp("softhsm")
    tokens = root / "tokens"
    tokens.mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
        "slots.removable = false\n"
    )
    os.environ["SOFTHSM2_CONF"] = str(conf)  # (this process's one SoftHSM, see above)
    for label in (LABEL, OTHER_LABEL):
        subprocess.run(
            [tool, "--init-token", "--free", "--label", label, "--pin", PIN, "--so-pin", SO_PIN],
            check=True,
            capture_output=True,
            timeout=60,
        )
    pin_file = root / "pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o600)
    hsm = SoftHsm(conf=conf, pin_file=pin_file)
    from callcp.hsm import generate_key

    generate_key(hsm.uri("server"), 2048)
    generate_key(hsm.uri("client"), 2048)
    yield hsm
