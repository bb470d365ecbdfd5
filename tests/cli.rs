//! The `upgate` binary's command line: help, version, hash-key, and a configuration file with
//! several bad settings (every one reported, exit code 78).

use std::process::{Command, Output};

fn upgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_upgate"))
        .args(args)
        .env_remove("UPGATE_CONFIG")
        .env_remove("MULTIPART_PART_SIZE_MB")
        .output()
        .expect("run upgate")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn help_lists_the_subcommands_and_exits_0() {
    for flag in ["--help", "-h"] {
        let out = upgate(&[flag]);
        assert_eq!(out.status.code(), Some(0), "{flag}: {}", text(&out.stderr));
        let help = text(&out.stdout);
        for needle in ["serve", "dev-seed", "hash-key", "--config", "--version"] {
            assert!(
                help.contains(needle),
                "{flag}: {needle} missing from\n{help}"
            );
        }
    }
}

#[test]
fn version_prints_the_package_version() {
    let out = upgate(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        text(&out.stdout).trim(),
        format!("upgate {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn hash_key_prints_the_sha256_digest() {
    let out = upgate(&["hash-key", "abc"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        text(&out.stdout).trim(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[test]
fn an_unknown_argument_is_a_usage_error() {
    let out = upgate(&["--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--no-such-flag"));
}

#[test]
fn a_file_with_three_bad_settings_reports_all_three_and_exits_78() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
part_size_mb = "five"
request_timeout_seconds = 0
listne = "127.0.0.1:8080"

[[tenants]]
id = "acme"
api_keys_sha256 = ["ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"]
"#,
    )
    .expect("write config");
    let path = path.to_str().expect("utf-8 path");
    // The file given by flag and by UPGATE_CONFIG is read the same way.
    let by_flag = upgate(&["--config", path]);
    let by_env = Command::new(env!("CARGO_BIN_EXE_upgate"))
        .env("UPGATE_CONFIG", path)
        .env_remove("MULTIPART_PART_SIZE_MB")
        .output()
        .expect("run upgate");
    for out in [by_flag, by_env] {
        assert_eq!(out.status.code(), Some(78));
        let stderr = text(&out.stderr);
        assert!(stderr.contains("3 problem(s)"), "{stderr}");
        for needle in [
            "part_size_mb (MULTIPART_PART_SIZE_MB): invalid type",
            "request_timeout_seconds: 0 is outside the allowed range 1..=3600",
            "listne: unknown setting",
        ] {
            assert!(stderr.contains(needle), "{needle} missing from\n{stderr}");
        }
    }
}
