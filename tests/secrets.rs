//! `edgelog config`, the built binary as an operator runs it, with secrets mounted as files and
//! others given inline: it prints every setting and none of the secrets. Needs no stack.

use std::path::Path;
use std::process::{Command, Output};

/// `edgelog config` with `env` (and no other `EDGELOG_` variable from the caller).
fn edgelog_config(env: &[(&str, &Path)], inline: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgelog"));
    cmd.arg("config");
    for (name, _) in std::env::vars() {
        if name.starts_with("EDGELOG_") {
            cmd.env_remove(name);
        }
    }
    for (name, path) in env {
        cmd.env(name, path);
    }
    for (name, value) in inline {
        cmd.env(name, value);
    }
    cmd.output().expect("the edgelog binary runs")
}

#[test]
fn edgelog_config_prints_no_secret_given_by_file_or_inline() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, content: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path
    };
    let files = [
        (
            "EDGELOG_CLICKHOUSE__PASSWORD_FILE",
            file("ch_password", "ch-file-secret-1\n"),
        ),
        (
            "EDGELOG_CLICKHOUSE__ADMIN_PASSWORD_FILE",
            file("ch_admin_password", "ch-file-secret-2\n"),
        ),
        (
            "EDGELOG_KAFKA__SECRET_FILES__SASL_PASSWORD",
            file("kafka_password", "kafka-file-secret-3\n"),
        ),
        (
            "EDGELOG_KAFKA__SECRET_FILES__SASL_OAUTHBEARER_CONFIG",
            file("oauth", "principal=edgelog secret=kafka-file-secret-4"),
        ),
        (
            "EDGELOG_KAFKA__SECRET_FILES__SSL_KEY_PEM",
            file(
                "key.pem",
                "-----BEGIN PRIVATE KEY-----\nkafka-file-secret-5\n-----END PRIVATE KEY-----\n",
            ),
        ),
    ];
    let env: Vec<(&str, &Path)> = files.iter().map(|(k, p)| (*k, p.as_path())).collect();
    let inline = [
        (
            "EDGELOG_KAFKA__OPTIONS__SSL_KEY_PASSWORD",
            "inline-secret-6",
        ),
        (
            "EDGELOG_LOADER__KAFKA_OPTIONS__SASL_OAUTHBEARER_CLIENT_SECRET",
            "inline-secret-7",
        ),
        (
            "EDGELOG_ANONYMIZER__KAFKA_OPTIONS__SSL_KEYSTORE_PASSWORD",
            "inline-secret-8",
        ),
        ("EDGELOG_KAFKA__OPTIONS__SASL_USERNAME", "edgelog-user"),
    ];
    let out = edgelog_config(&env, &inline);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for secret in [
        "ch-file-secret-1",
        "ch-file-secret-2",
        "kafka-file-secret-3",
        "kafka-file-secret-4",
        "kafka-file-secret-5",
        "inline-secret-6",
        "inline-secret-7",
        "inline-secret-8",
    ] {
        assert!(!stdout.contains(secret), "{secret} printed:\n{stdout}");
        assert!(!stderr.contains(secret), "{secret} printed:\n{stderr}");
    }
    // Everything else is there: the file paths, the redacted entries, the plain options.
    for (_, path) in &files {
        let path = path.display().to_string();
        assert!(stdout.contains(&path), "{path} missing:\n{stdout}");
    }
    for line in [
        "password = \"***\"",
        "admin_password = \"***\"",
        "\"sasl.password\" = \"***\"",
        "\"sasl.oauthbearer.config\" = \"***\"",
        "\"ssl.key.pem\" = \"***\"",
        "\"ssl.key.password\" = \"***\"",
        "\"sasl.oauthbearer.client.secret\" = \"***\"",
        "\"ssl.keystore.password\" = \"***\"",
        "\"sasl.username\" = \"edgelog-user\"",
    ] {
        assert!(stdout.contains(line), "{line} missing:\n{stdout}");
    }
}

#[test]
fn an_unreadable_secret_file_stops_edgelog_naming_the_key_and_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("not-mounted");
    let out = edgelog_config(&[("EDGELOG_CLICKHOUSE__PASSWORD_FILE", &missing)], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("`clickhouse.password_file`"), "{stderr}");
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
}
