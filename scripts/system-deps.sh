#!/usr/bin/env bash
# The system packages the test suite needs beyond pip's: SoftHSM2, the real
# PKCS#11 token of the HSM tests (tests/test_hsm.py), and HAProxy, the real
# load balancer of the deployment tests (tests/test_haproxy.py).  Installs
# what is missing with apt-get when this runs as root; otherwise says what to do.
set -euo pipefail
missing=()
command -v softhsm2-util >/dev/null 2>&1 || missing+=(softhsm2)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
if [ ${#missing[@]} = 0 ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]} (the HSM and load-balancer tests use them)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    # (the package's own haproxy service is not wanted: the tests start their own)
    if command -v systemctl >/dev/null 2>&1; then systemctl disable --now haproxy >/dev/null 2>&1 || true; fi
    exit 0
fi
echo "the tests need ${missing[*]}: install them (Debian/Ubuntu: sudo apt-get install" \
     "${missing[*]}; Fedora: sudo dnf install softhsm haproxy; macOS: brew install softhsm haproxy)" >&2
exit 1
