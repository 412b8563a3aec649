#!/usr/bin/env bash
# Smoke test of the release files: build the sdist and, from it, the wheel;
# twine check both; install the wheel alone in a fresh venv (no source tree on the path) and
# run the installed callcp command: --version, then `serve` in the background
# and `send` to it, pinned to the server's fingerprint; SIGTERM must stop the
# server with exit 0.  Everything happens in a temporary directory, removed on
# exit.  Prints a short summary; exits non-zero on any failure.
#
#   BUILD_PYTHON  a python with build and twine installed (default: .venv/bin/python,
#                 which `make test` / `make check` set up)
#   SMOKE_PYTHON  the python of the fresh venv (default: python3), e.g. a
#                 3.9 or 3.13 interpreter to try another supported version
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

BUILD_PYTHON=${BUILD_PYTHON:-$repo/.venv/bin/python}
SMOKE_PYTHON=${SMOKE_PYTHON:-python3}
started=$SECONDS

fail() {
    echo "smoke_wheel: FAIL: $*" >&2
    exit 1
}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/callcp-smoke.XXXXXX")
server_pid=
cleanup() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -KILL "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

# 1. Build: the sdist, then the wheel from the unpacked sdist (as `python -m
#    build` does), so the wheel proves the sdist holds what building needs.
"$BUILD_PYTHON" -m build --outdir "$tmp/dist" . >"$tmp/build.log" 2>&1 ||
    { cat "$tmp/build.log" >&2; fail "python -m build"; }
wheels=("$tmp"/dist/callcp-*.whl)
sdists=("$tmp"/dist/callcp-*.tar.gz)
[ -f "${wheels[0]}" ] || fail "no wheel in $tmp/dist"
[ -f "${sdists[0]}" ] || fail "no sdist in $tmp/dist"
wheel=${wheels[0]}
# PyPI's checks: the metadata, and the README rendered as the long description
"$BUILD_PYTHON" -m twine check --strict "${sdists[0]}" "$wheel" >"$tmp/twine.log" 2>&1 ||
    { cat "$tmp/twine.log" >&2; fail "twine check"; }
built=$SECONDS

# 2. A fresh venv with nothing but the wheel and its dependencies, used from
#    a directory outside the repository, with its own HOME.
"$SMOKE_PYTHON" -m venv "$tmp/venv" || fail "$SMOKE_PYTHON -m venv"
"$tmp/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$wheel" \
    >"$tmp/pip.log" 2>&1 || { cat "$tmp/pip.log" >&2; fail "pip install of the wheel"; }
mkdir -m 700 "$tmp/home"
cd "$tmp"
unset PYTHONPATH
export HOME=$tmp/home
callcp=$tmp/venv/bin/callcp

where=$("$tmp/venv/bin/python" -c 'import callcp; print(callcp.__file__)')
case $where in
    "$tmp"/venv/*) ;;
    *) fail "callcp imported from $where, not from the fresh venv" ;;
esac
version=$("$callcp" --version) || fail "callcp --version"
installed=$SECONDS

# 3. callcp serve in the background; wait for its 'listening on' line.
"$callcp" serve --port 0 --key "$tmp/server_key.pem" >"$tmp/serve.out" 2>"$tmp/serve.err" &
server_pid=$!
line=
for _ in $(seq 200); do   # 20 s at most (a key is generated first)
    line=$(grep -m1 '^listening on ' "$tmp/serve.out" || true)
    [ -n "$line" ] && break
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
done
[ -n "$line" ] || { cat "$tmp/serve.out" "$tmp/serve.err" >&2; fail "no 'listening on' line from callcp serve"; }
re='^listening on (\[[^]]+\]|[^:]+):([0-9]+) \(server key (SHA256:[A-Za-z0-9+/=]+)\)$'
[[ $line =~ $re ]] || fail "unexpected serve line: $line"
host=${BASH_REMATCH[1]#[}
host=${host%]}
port=${BASH_REMATCH[2]}
fingerprint=${BASH_REMATCH[3]}

# 4. callcp send, pinned to that fingerprint: the server echoes.
rc=0
reply=$("$callcp" send "$host" "$port" hello --fingerprint "$fingerprint" --timeout 20) || rc=$?
[ "$rc" = 0 ] || { cat "$tmp/serve.err" >&2; fail "callcp send exited $rc"; }
[ "$reply" = hello ] || fail "callcp send replied '$reply', not 'hello'"

# 5. SIGTERM: a graceful stop, exit 0.
kill -TERM "$server_pid"
status=0
for _ in $(seq 100); do   # 10 s at most
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
done
kill -0 "$server_pid" 2>/dev/null && fail "callcp serve still running 10 s after SIGTERM"
wait "$server_pid" || status=$?
server_pid=
[ "$status" = 0 ] || { cat "$tmp/serve.err" >&2; fail "callcp serve exited $status after SIGTERM"; }

size() { du -k "$1" | cut -f1; }
echo "smoke_wheel: OK in $((SECONDS - started)) s (build+check $((built - started)) s, venv+install $((installed - built)) s)"
echo "  built     $(basename "${sdists[0]}") ($(size "${sdists[0]}") KiB), $(basename "$wheel") ($(size "$wheel") KiB)"
echo "  twine     $(grep -c PASSED "$tmp/twine.log") of 2 PASSED (--strict)"
echo "  venv      $("$tmp/venv/bin/python" -V), $version"
echo "  serve     $line"
echo "  send      hello -> $reply (pinned $fingerprint)"
echo "  SIGTERM   exit $status"
