#!/usr/bin/env bash
# The local AWS KMS and STS emulator (moto server) that the aws-kms client's
# tests (hsm-daemon/aws-kms/tests/aws_kms.rs, hsm-daemon/tests/aws_keys.rs) run against.
#
#   scripts/moto.sh install        install moto[server] if missing
#   scripts/moto.sh start [PORT]   install if missing, start moto_server on
#                                  127.0.0.1:PORT in the background, wait until
#                                  it answers, print its URL
#   scripts/moto.sh stop [PORT]    stop the server this script started
#   scripts/moto.sh status [PORT]  exit 0 and print the URL if it answers
#
# PORT defaults to $CMK_TEST_MOTO_PORT, else 4566: the tests' default endpoint
# (CMK_TEST_AWS_ENDPOINT, http://127.0.0.1:4566). `start` on a port where this
# script's server already answers does nothing but print the URL.
#
# Installs from PyPI into a virtual environment under ~/.cache/cmk-moto (or
# $CMK_MOTO_TOOLS), pinned to one moto version; python3-venv comes from apt when
# missing. The server's pid, log and URL are kept beside it, in run/.
set -euo pipefail

MOTO_VERSION=5.2.5

TOOLS=${CMK_MOTO_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/cmk-moto}
VENV=$TOOLS/venv
RUN=$TOOLS/run

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

install_moto() {
    if ! command -v python3 >/dev/null || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
        echo "installing python3 and python3-venv (apt)" >&2
        as_root apt-get update -qq
        as_root apt-get install -y -qq python3 python3-venv >/dev/null
    fi
    local stamp="moto[server]==$MOTO_VERSION"
    if [ -x "$VENV/bin/moto_server" ] && [ "$(cat "$TOOLS/installed" 2>/dev/null)" = "$stamp" ]; then
        return
    fi
    echo "installing $stamp (PyPI) into $VENV" >&2
    rm -rf "$VENV"
    mkdir -p "$TOOLS"
    python3 -m venv "$VENV"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install --quiet "$stamp"
    echo "$stamp" >"$TOOLS/installed"
}

# Whether an HTTP server answers on the port: any status counts, moto answers
# its dashboard path with 200.
answers() {
    "$VENV/bin/python" - "$1" <<'PY' 2>/dev/null
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/moto-api/", timeout=1)
except urllib.error.HTTPError:
    pass
except Exception:
    sys.exit(1)
PY
}

# The pid of the server this script started on the port, if it still runs.
running_pid() {
    local pid
    pid=$(cat "$RUN/moto-$1.pid" 2>/dev/null) || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

start() {
    local port=$1 url="http://127.0.0.1:$1"
    install_moto
    mkdir -p "$RUN"
    if running_pid "$port" >/dev/null && answers "$port"; then
        echo "$url"
        return
    fi
    if answers "$port"; then
        echo "moto.sh: something else already answers on 127.0.0.1:$port; choose another port" >&2
        exit 1
    fi
    # setsid: the server outlives this script and the shell that ran it.
    setsid "$VENV/bin/moto_server" -H 127.0.0.1 -p "$port" >"$RUN/moto-$port.log" 2>&1 </dev/null &
    local pid=$!
    echo "$pid" >"$RUN/moto-$port.pid"
    for _ in $(seq 1 100); do
        if answers "$port"; then
            echo "$url" >"$RUN/moto-$port.url"
            echo "moto server (pid $pid) on $url; log $RUN/moto-$port.log" >&2
            echo "$url"
            return
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "moto.sh: moto_server exited at start; its log:" >&2
            cat "$RUN/moto-$port.log" >&2
            exit 1
        fi
        sleep 0.2
    done
    echo "moto.sh: moto_server did not answer on $url within 20 s; log $RUN/moto-$port.log" >&2
    kill "$pid" 2>/dev/null || true
    exit 1
}

stop() {
    local port=$1 pid
    if ! pid=$(running_pid "$port"); then
        echo "moto.sh: no moto server of this script runs on port $port" >&2
        rm -f "$RUN/moto-$port.pid" "$RUN/moto-$port.url"
        return
    fi
    kill "$pid"
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    rm -f "$RUN/moto-$port.pid" "$RUN/moto-$port.url"
    echo "moto server (pid $pid) on port $port stopped" >&2
}

command=${1:-}
port=${2:-${CMK_TEST_MOTO_PORT:-4566}}
case "$port" in
    '' | *[!0-9]*) echo "moto.sh: port must be a number, not '$port'" >&2; exit 2 ;;
esac
case "$command" in
    install) install_moto ;;
    start) start "$port" ;;
    stop) stop "$port" ;;
    status)
        [ -x "$VENV/bin/python" ] && answers "$port" || { echo "moto.sh: nothing answers on 127.0.0.1:$port" >&2; exit 1; }
        echo "http://127.0.0.1:$port"
        ;;
    *)
        echo "usage: scripts/moto.sh install | start [PORT] | stop [PORT] | status [PORT]" >&2
        exit 2
        ;;
esac
