#!/usr/bin/env bash
# Runs every check and test of cmk: formatting, clippy, the unit tests and the
# end-to-end tests (the real binaries over real mutual TLS). Installs what the
# tests need when it is missing: the OpenSSL CLI, jq, faketime, SoftHSM2 and
# pkcs11-tool (opensc), the Kryoptic soft token (built, scripts/kryoptic.sh),
# and Python's grpcio with
# grpcio-reflection (tests/grpcurl.py, the reflection client the walk-through
# runs in grpcurl's place), and moto[server], the AWS KMS emulator
# (scripts/moto.sh). A missing tool makes the tests fail; nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v openssl >/dev/null || missing+=(openssl)
command -v jq >/dev/null || missing+=(jq)
# The recovery tests move the control plane's clock 31 days with libfaketime.
command -v faketime >/dev/null || missing+=(faketime)
command -v python3 >/dev/null || missing+=(python3 python3-pip)
# The PKCS#11 custody tests run on a SoftHSM2 token and inspect it with
# pkcs11-tool (opensc).
[ -e /usr/lib/softhsm/libsofthsm2.so ] && command -v softhsm2-util >/dev/null || missing+=(softhsm2)
command -v pkcs11-tool >/dev/null || missing+=(opensc)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}"
    as_root apt-get update -qq
    as_root apt-get install -y -qq "${missing[@]}"
fi
if ! python3 -c 'import grpc, grpc_reflection' 2>/dev/null; then
    echo "installing grpcio and grpcio-reflection"
    python3 -m pip install --quiet grpcio grpcio-reflection protobuf ||
        python3 -m pip install --quiet --break-system-packages grpcio grpcio-reflection protobuf
fi

# The PostgreSQL store's tests need the server at 127.0.0.1:5432 (they fail,
# not skip, without it): start the local cluster if it is installed but down.
if command -v pg_isready >/dev/null && ! pg_isready -q -h 127.0.0.1 -p 5432; then
    for version in /etc/postgresql/*; do
        [ -d "$version" ] || continue
        as_root pg_ctlcluster --skip-systemctl-redirect "$(basename "$version")" main start || true
    done
fi

# The aws-kms client's tests need the KMS and STS emulator (moto server) at
# CMK_TEST_AWS_ENDPOINT, default http://127.0.0.1:4566 (they fail, not skip,
# without it): start one there unless one answers, and stop it at the end if
# it was started here.
moto_started=
if [ -z "${CMK_TEST_AWS_ENDPOINT:-}" ] && ! bash scripts/moto.sh status >/dev/null 2>&1; then
    bash scripts/moto.sh start >/dev/null
    moto_started=1
fi
trap '[ -z "$moto_started" ] || bash scripts/moto.sh stop' EXIT

# The Kubernetes manifests: every overlay rendered and validated offline
# (installs kubectl and kubernetes-validate into a cache directory if missing).
bash scripts/validate-deploy.sh

# The PKCS#11 custody tests run the whole custody contract on Kryoptic, built
# from crates.io (with OpenSSL from openssl-src) and cached outside the clone
# (scripts/kryoptic.sh; minutes the first time, seconds afterwards). Without
# CMK_TEST_KRYOPTIC_MODULE those tests fail.
CMK_TEST_KRYOPTIC_MODULE="$(bash scripts/kryoptic.sh)"
export CMK_TEST_KRYOPTIC_MODULE

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end tests start the binaries from the target directory.
cargo build --workspace --bins --locked
cargo test --workspace --locked
