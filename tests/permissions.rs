//! The integrator's first hour (#18): files a person or the service cannot read. Run as an
//! unprivileged user (`setpriv` to uid 65534, `nobody`) when the tests run as root, as `.ci/run`
//! does; elsewhere they are skipped, unless `FIELDGATE_REQUIRE_ROOT=1` makes that a failure.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .is_some_and(|ids| ids.split_whitespace().next() == Some("0"))
}

/// Runs the binary as `nobody`; None (skipped) when the tests cannot change user.
fn as_nobody(args: &[&str]) -> Option<Output> {
    if !is_root() {
        if std::env::var("FIELDGATE_REQUIRE_ROOT").as_deref() == Ok("1") {
            panic!(
                "these tests need root to run the binary as another user (FIELDGATE_REQUIRE_ROOT=1)"
            );
        }
        eprintln!("SKIPPED: not root; cannot run as another user");
        return None;
    }
    Some(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_fieldgate"))
            .args(args)
            .output()
            .unwrap(),
    )
}

/// A folder everyone may enter, holding files only root may read.
fn open_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn private(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

const CONFIG: &str = "mqtt: { url: mqtt://127.0.0.1 }\nbuses:\n  plc:\n    modbus_tcp: { host: 127.0.0.1 }\ndevices:\n  meter:\n    bus: plc\n    points:\n      p: { register: 0 }\n";

#[test]
fn check_without_permission_says_so_and_what_to_do() {
    let dir = open_folder();
    let cfg = dir.path().join("config.yaml");
    private(&cfg, CONFIG, 0o640);
    let Some(out) = as_nobody(&["check", cfg.to_str().unwrap()]) else {
        return;
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains(
            "cannot read the file: permission denied (owner root:root, mode 0640): run it with sudo"
        ),
        "{err}"
    );
}

#[test]
fn status_and_queue_stats_without_permission_say_so_not_is_it_running() {
    let dir = open_folder();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o750)).unwrap();
    private(&state.join("status.json"), "{}", 0o640);
    {
        fieldgate::store::Store::open(&state).unwrap();
    }
    let Some(out) = as_nobody(&["status", "--state-dir", state.to_str().unwrap()]) else {
        return;
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let folder = format!(
        "permission denied ({}: owner root:root, mode 0750): run it with sudo",
        state.display()
    );
    assert!(err.contains(&folder), "{err}");
    assert!(!err.contains("is the gateway running"), "{err}");

    let out = as_nobody(&["queue", "stats", "--state-dir", state.to_str().unwrap()]).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&folder), "{err}");
    assert!(!err.contains("unable to open database file"), "{err}");
}

#[test]
fn status_and_queue_stats_default_to_the_packaged_state_dir() {
    // No argument at all: both read /var/lib/fieldgate (which need not exist here).
    for args in [&["status"][..], &["queue", "stats"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_fieldgate"))
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("/var/lib/fieldgate"), "{args:?}: {err}");
        assert!(!err.contains("--config"), "{args:?}: {err}");
    }
}

/// `check` run with sudo passes, but the service (user `fieldgate`) could not read a password
/// file or TLS key left `0600 root`: a warning says so, with the command that fixes it.
#[test]
fn check_warns_when_the_service_user_cannot_read_a_file_it_needs() {
    let dir = open_folder();
    let pass = dir.path().join("mqtt.pass");
    private(&pass, "s3cret\n", 0o600);
    let cfg = dir.path().join("config.yaml");
    std::fs::write(
        &cfg,
        CONFIG.replace(
            "mqtt: { url: mqtt://127.0.0.1 }",
            "mqtt: { url: mqtt://127.0.0.1, username: gw, password_file: mqtt.pass }",
        ),
    )
    .unwrap();
    // `check` as root, for a service that runs as `nobody`.
    let check = || {
        Command::new(env!("CARGO_BIN_EXE_fieldgate"))
            .arg("check")
            .arg(&cfg)
            .env("FIELDGATE_SERVICE_USER", "nobody")
            .output()
            .unwrap()
    };
    let out = check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    if !is_root() {
        return; // the file is ours, not root's: nothing to compare the wording with
    }
    assert!(
        err.contains(&format!(
            "warning: {}:1:",
            cfg.display()
        )) && err.contains(&format!(
            "mqtt.password_file: {} (owner root:root, mode 0600) is not readable by user nobody, which the service runs as: `sudo chown root:nobody {}",
            pass.display(),
            pass.display()
        )),
        "{err}"
    );
    // Readable by the service's user: no warning.
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(!String::from_utf8_lossy(&check().stderr).contains("warning"));
}
