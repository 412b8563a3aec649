#!/usr/bin/env bash
# The system packages the test suite needs beyond pip's: SoftHSM2, the real
# PKCS#11 token the HSM tests use (tests/test_hsm.py).  Installs it with
# apt-get when it is missing and this runs as root; otherwise says what to do.
set -euo pipefail
if command -v softhsm2-util >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing softhsm2 (the PKCS#11 token of the HSM tests)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 >/dev/null
    exit 0
fi
echo "the tests need SoftHSM2: install it (Debian/Ubuntu: sudo apt-get install softhsm2;" \
     "Fedora: sudo dnf install softhsm; macOS: brew install softhsm)" >&2
exit 1
