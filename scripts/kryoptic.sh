#!/usr/bin/env bash
# Builds Kryoptic's PKCS#11 module (libkryoptic_pkcs11.so, the soft token the
# PKCS#11 custody tests run the whole custody contract on) and prints its path.
#
# Kryoptic needs OpenSSL >= 3.2 and Debian bookworm has 3.0, so OpenSSL is
# built first by the `openssl-src` crate, then the `kryoptic` crate against it
# (statically, through pkg-config). Only crates.io is needed: no git, no other
# download. Everything — the two generated helper crates, OpenSSL, a cargo
# target directory of its own and the module — lives outside the clone, in
# ${CMK_TOKEN_CACHE:-$HOME/.cache/cmk/tokens}/kryoptic-<versions>/, so a second
# run only prints the path. Delete that directory to rebuild. Installs (apt)
# what the build needs when it is missing: a C compiler, make, perl,
# pkg-config, libclang (bindgen) and SQLite's headers.
#
# The first build takes several minutes on 2 cores (docs/pkcs11.md has the
# figures); progress goes to stderr, the module's path alone to stdout.
set -euo pipefail

KRYOPTIC_VERSION=1.5.4
OPENSSL_SRC_VERSION=300.6.1

cache="${CMK_TOKEN_CACHE:-$HOME/.cache/cmk/tokens}"
dir="$cache/kryoptic-$KRYOPTIC_VERSION-openssl-src-$OPENSSL_SRC_VERSION"
module="$dir/libkryoptic_pkcs11.so"

if [ -f "$module" ]; then
    echo "$module"
    exit 0
fi

mkdir -p "$dir"
# Two runs at once (two test commands, say) build once: the second waits.
exec 9>"$dir/.lock"
flock 9
if [ -f "$module" ]; then
    echo "$module"
    exit 0
fi

log() { echo "kryoptic.sh: $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Building OpenSSL needs a C compiler, make and perl; Kryoptic's OpenSSL
# bindings are made by bindgen (libclang), and it finds OpenSSL and SQLite
# through pkg-config.
missing=()
command -v cc >/dev/null || missing+=(gcc)
command -v make >/dev/null || missing+=(make)
command -v perl >/dev/null || missing+=(perl)
command -v pkg-config >/dev/null || missing+=(pkg-config)
compgen -G '/usr/lib/llvm-*/lib/libclang.so*' >/dev/null ||
    compgen -G '/usr/lib/*/libclang-[0-9]*.so*' >/dev/null || missing+=(libclang-dev)
# Kryoptic's token store is SQLite, linked from the system.
{ command -v pkg-config >/dev/null && pkg-config --exists sqlite3; } || missing+=(libsqlite3-dev)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    as_root apt-get update -qq >&2
    as_root apt-get install -y -qq "${missing[@]}" >&2
fi
# The helper crates are not workspace members of anything above them.
export CARGO_TARGET_DIR="$dir/target"
unset RUSTFLAGS CARGO_BUILD_TARGET

# 1. OpenSSL, built and installed by openssl-src into $dir/openssl/install.
#    It runs in a build script because openssl-src (and cc) read the target,
#    host and optimisation level that cargo gives build scripts.
openssl_out="$dir/openssl"
if [ ! -f "$openssl_out/install/lib/pkgconfig/libcrypto.pc" ]; then
    log "building OpenSSL (openssl-src $OPENSSL_SRC_VERSION) into $openssl_out"
    helper="$dir/openssl-build"
    mkdir -p "$helper/src"
    cat >"$helper/Cargo.toml" <<EOF
[package]
name = "cmk-openssl-build"
version = "0.0.0"
edition = "2021"
publish = false

[workspace]

[build-dependencies]
openssl-src = "=$OPENSSL_SRC_VERSION"
EOF
    cat >"$helper/build.rs" <<'EOF'
fn main() {
    println!("cargo:rerun-if-env-changed=CMK_OPENSSL_OUT");
    let out = std::env::var_os("CMK_OPENSSL_OUT").expect("CMK_OPENSSL_OUT is set by kryoptic.sh");
    openssl_src::Build::new().out_dir(out).build();
}
EOF
    echo 'fn main() {}' >"$helper/src/main.rs"
    rm -rf "$openssl_out"
    CMK_OPENSSL_OUT="$openssl_out" cargo build --release --quiet --manifest-path "$helper/Cargo.toml" >&2
    [ -f "$openssl_out/install/lib/pkgconfig/libcrypto.pc" ] || {
        log "OpenSSL built, but $openssl_out/install/lib/pkgconfig/libcrypto.pc is missing"
        exit 1
    }
fi

# 2. Kryoptic, against that OpenSSL. The kryoptic crate is a cdylib only;
#    cargo builds it as a dependency of this helper crate.
log "building kryoptic $KRYOPTIC_VERSION"
helper="$dir/kryoptic-build"
mkdir -p "$helper/src"
cat >"$helper/Cargo.toml" <<EOF
[package]
name = "cmk-kryoptic-build"
version = "0.0.0"
edition = "2021"
publish = false

[workspace]

[dependencies]
kryoptic = "=$KRYOPTIC_VERSION"
EOF
echo 'fn main() {}' >"$helper/src/main.rs"
PKG_CONFIG_PATH="$openssl_out/install/lib/pkgconfig" PKG_CONFIG_ALL_STATIC=1 \
    cargo build --release --quiet --manifest-path "$helper/Cargo.toml" >&2
built=$(find "$CARGO_TARGET_DIR/release" -name 'libkryoptic_pkcs11*.so' -print -quit)
[ -n "$built" ] || {
    log "cargo finished but no libkryoptic_pkcs11.so under $CARGO_TARGET_DIR/release"
    exit 1
}
# Copied, then renamed: a later run sees either no module or a whole one.
cp "$built" "$module.tmp"
mv "$module.tmp" "$module"
# The build trees (about 300 MB) are not needed any more; the OpenSSL install
# (20 MB) stays, so that a rebuild of the module alone skips OpenSSL.
rm -rf "$CARGO_TARGET_DIR" "$openssl_out/build"
log "built $module"
echo "$module"
