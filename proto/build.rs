//! Generates the Rust code of every cmk protobuf package at build time.
//!
//! `protoc` comes from `protoc-bin-vendored`, so a machine with only the Rust
//! toolchain can build; nothing generated is committed, so nothing can drift.

use std::{
    env,
    error::Error,
    path::{Path, PathBuf},
};

const PROTOS: [&str; 3] = [
    "cmk/hsm/v1/hsm.proto",
    "cmk/control/v1/control.proto",
    "cmk/bench/v1/echo.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Well-known types (google/protobuf/timestamp.proto) ship with the vendored protoc.
    let well_known = protoc_bin_vendored::include_path()?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("cmk_descriptor.bin"))
        // Messages that carry secret bytes print them redacted (see src/redact.rs).
        .skip_debug([
            ".cmk.hsm.v1.WrapRequest",
            ".cmk.hsm.v1.UnwrapResponse",
            ".cmk.control.v1.GenerateDataKeyResponse",
            ".cmk.control.v1.DecryptResponse",
        ])
        .protoc_arg("--experimental_allow_proto3_optional")
        // Servers answer a request that does not decode with INVALID_ARGUMENT,
        // not tonic-prost's INTERNAL (see src/codec.rs); the codec names the
        // message in its errors through `prost::Name`.
        .codec_path("crate::codec::Codec")
        .compile_with_config(
            {
                let mut config = tonic_prost_build::Config::new();
                config
                    .protoc_executable(protoc)
                    .enable_type_names()
                    // The conventional domain of an `Any`'s type URL, which
                    // the status details (src/status_details.rs) carry.
                    .type_name_domain(["."], "type.googleapis.com");
                config
            },
            &PROTOS.map(Path::new),
            &[Path::new("."), well_known.as_path()],
        )?;
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
