//! The `cmkctl` binary as a user runs it, with no server: settings precedence
//! through real environment variables, exit codes and the one-line errors.

use std::{path::Path, process::Command};

/// `cmkctl` with a clean environment: no CMKCTL_* variables from the caller, and a
/// HOME without a config file.
fn cmkctl(home: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cmkctl"));
    command.env_clear().env("HOME", home);
    command
}

fn json(output: &std::process::Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON on stdout")
}

#[test]
fn flags_beat_environment_beats_file_beats_defaults() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("cmkctl.toml");
    std::fs::write(
        &file,
        "endpoint = \"https://file.example:1\"\nca = \"pki/ca.crt\"\norg = \"file-org\"\n",
    )
    .expect("write");

    let output = cmkctl(dir.path())
        .args(["config", "--output", "json"])
        .env("CMKCTL_CONFIG", &file)
        .env("CMKCTL_ORG", "env-org")
        .env("CMKCTL_ENDPOINT", "https://env.example:2")
        .args(["--endpoint", "https://flag.example:3"])
        .output()
        .expect("run cmkctl");
    let settings = json(&output);
    assert_eq!(settings["endpoint"], "https://flag.example:3");
    assert_eq!(settings["org"], "env-org");
    let ca = dir.path().join("pki/ca.crt");
    assert_eq!(settings["ca"], ca.to_str().expect("UTF-8 path"));
    assert_eq!(settings["server_name"], serde_json::Value::Null);
    assert_eq!(settings["timeout_secs"], 30);
}

#[test]
fn the_default_config_file_is_read_when_it_exists() {
    let home = tempfile::tempdir().expect("tempdir");
    let dir = home.path().join(".config/cmkctl");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("config.toml"), "org = \"home-org\"\n").expect("write");
    let settings = json(
        &cmkctl(home.path())
            .args(["--output", "json", "config"])
            .output()
            .expect("run cmkctl"),
    );
    assert_eq!(settings["org"], "home-org");
    assert_eq!(settings["endpoint"], "https://127.0.0.1:8443");
}

#[test]
fn missing_settings_are_one_line_and_exit_2() {
    let home = tempfile::tempdir().expect("tempdir");
    let output = cmkctl(home.path())
        .arg("list")
        .output()
        .expect("run cmkctl");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).expect("UTF-8");
    assert!(stderr.starts_with("cmkctl: missing "), "{stderr}");
    assert!(stderr.contains("--org, set CMKCTL_ORG"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn help_documents_the_exit_codes() {
    let home = tempfile::tempdir().expect("tempdir");
    let output = cmkctl(home.path())
        .arg("--help")
        .output()
        .expect("run cmkctl");
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).expect("UTF-8");
    assert!(help.contains("Exit codes:"), "{help}");
    assert!(
        help.contains("  9  aborted at the confirmation prompt"),
        "{help}"
    );
}

#[test]
fn a_refused_public_key_exits_2_without_writing() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("short.bin"), [0u8; 31]).expect("write");
    std::fs::write(dir.path().join("pub.pem"), "not a key").expect("write");
    let output = cmkctl(dir.path())
        .current_dir(dir.path())
        .args([
            "wrap",
            "--public-key",
            "pub.pem",
            "--key-file",
            "short.bin",
            "--out",
            "out.bin",
        ])
        .output()
        .expect("run cmkctl");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).expect("UTF-8");
    assert!(
        stderr.starts_with("cmkctl: pub.pem is not an RSA public key"),
        "{stderr}"
    );
    assert!(!dir.path().join("out.bin").exists());
}

#[test]
fn add_aws_key_without_a_key_arn_is_a_usage_error_before_any_connection() {
    let home = tempfile::tempdir().expect("tempdir");
    let output = cmkctl(home.path())
        .args(["add-aws-key", "--activate-now"])
        .output()
        .expect("run cmkctl");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).expect("UTF-8");
    assert!(stderr.contains("--key-arn <ARN>"), "{stderr}");
}
