//! The Debian package as an integrator meets it (#18), the README's "On the Pi" walkthrough step
//! by step: installed files and their owners, the model library, `read` to confirm the byte
//! order, `check`, the service's own user running the gateway against a device and a broker,
//! `status`, and what `apt purge` leaves behind.
//!
//! It needs the package built and installed on this machine: `.ci/run` does that (`cargo deb`,
//! `apt-get install ./target/debian/fieldgate_*.deb`) and sets `FIELDGATE_REQUIRE_PACKAGE=1`;
//! without that variable the test is skipped. It ends by purging the package.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::Subscriber;
use fieldgate::testkit::sim::Simulator;

const BIN: &str = "/usr/bin/fieldgate";

fn run(cmd: &[&str]) -> Output {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn owner_and_mode(path: &str) -> (String, u32) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let names = |file: &str, id: u32| {
        std::fs::read_to_string(file)
            .unwrap()
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f[2].parse::<u32>().ok() == Some(id)).then(|| f[0].to_string())
            })
            .unwrap()
    };
    (
        format!(
            "{}:{}",
            names("/etc/passwd", m.uid()),
            names("/etc/group", m.gid())
        ),
        m.mode() & 0o7777,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_installed_package_runs_as_its_user_and_purge_removes_its_state() {
    if std::env::var("FIELDGATE_REQUIRE_PACKAGE").as_deref() != Ok("1") {
        eprintln!(
            "SKIPPED: needs the package installed (FIELDGATE_REQUIRE_PACKAGE=1, see .ci/run)"
        );
        return;
    }
    // Installed: the binary without the test kit, the unit, the config and the secrets file
    // with their owners, the model library, the user in dialout.
    assert!(Path::new(BIN).exists());
    let demo = Command::new(BIN).arg("demo").output().unwrap();
    assert!(!demo.status.success(), "the packaged binary has no demo");
    assert!(
        [
            "/lib/systemd/system/fieldgate.service",
            "/usr/lib/systemd/system/fieldgate.service"
        ]
        .iter()
        .any(|p| Path::new(p).exists())
    );
    assert_eq!(
        owner_and_mode("/etc/fieldgate/config.yaml"),
        ("root:fieldgate".into(), 0o640)
    );
    assert_eq!(
        owner_and_mode("/etc/default/fieldgate"),
        ("root:root".into(), 0o600)
    );
    let groups = String::from_utf8(run(&["id", "-nG", "fieldgate"]).stdout).unwrap();
    assert!(
        groups.split_whitespace().any(|g| g == "dialout"),
        "{groups}"
    );
    assert!(Path::new("/usr/share/fieldgate/mappings/eastron-sdm120.yaml").exists());
    assert!(!Path::new("/usr/share/fieldgate/mappings/demo.yaml").exists());
    // The shipped example config checks as it is.
    run(&[BIN, "check", "/etc/fieldgate/config.yaml"]);

    // A device and a broker on loopback: an SDM120 meter (voltage 230.5 V, high word first).
    let Some(mosquitto) = common::Mosquitto::start() else {
        panic!("mosquitto is needed here");
    };
    let sim = Simulator::start(None).await.unwrap();
    sim.with_unit(1, |b| {
        b.set_input(0, &vec![0; 400]);
        b.set_input(0, &[0x4366, 0x8000]); // 230.5 as f32
    });
    let device = format!("127.0.0.1:{}", sim.addr.port());

    // 1. Pick a model from the list; 2. `read` confirms the byte order (as the service user).
    let models = std::fs::read_dir("/usr/share/fieldgate/mappings")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    assert!(
        models.contains(&"eastron-sdm120.yaml".to_string()),
        "{models:?}"
    );
    let read = run(&[
        "setpriv",
        "--reuid=fieldgate",
        "--regid=fieldgate",
        "--init-groups",
        BIN,
        "read",
        "--host",
        &device,
        "--unit",
        "1",
        "--input",
        "0",
        "--count",
        "2",
    ]);
    let text = String::from_utf8_lossy(&read.stdout);
    assert!(text.contains("ABCD  f32=230.5"), "{text}");

    // 3. The config, as the README writes it, checked with sudo (root here).
    let config = format!(
        "gateway:\n  id: pi-01\n  state_dir: /var/lib/fieldgate\n  status_interval: 2s\nmqtt:\n  url: mqtt://{}\nmodels: [/usr/share/fieldgate/mappings]\nbuses:\n  meters:\n    modbus_tcp: {{ host: 127.0.0.1, port: {} }}\ndevices:\n  main_meter:\n    bus: meters\n    unit: 1\n    every: 1s\n    model: eastron-sdm120\n",
        mosquitto.addr,
        sim.addr.port()
    );
    std::fs::write("/etc/fieldgate/config.yaml", config).unwrap();
    let check = run(&[BIN, "check", "/etc/fieldgate/config.yaml"]);
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("ok: 1 bus, 1 device, 10 points"),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    // 4. Start as the service would (its user, its state directory), 5. watch with a subscriber.
    run(&[
        "install",
        "-d",
        "-o",
        "fieldgate",
        "-g",
        "fieldgate",
        "-m",
        "0750",
        "/var/lib/fieldgate",
    ]);
    let sub = Subscriber::start(mosquitto.addr).await;
    // setpriv execs the gateway itself (no shell in between to catch the SIGTERM).
    let mut gateway = Command::new("setpriv")
        .args(["--reuid=fieldgate", "--regid=fieldgate", "--init-groups"])
        .args([BIN, "run", "/etc/fieldgate/config.yaml"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    sub.wait_for(Duration::from_secs(15), "the meter's voltage", |g| {
        g.iter().any(|r| {
            r.topic == "fieldgate/pi-01/main_meter/voltage"
                && r.value() == Some(&serde_json::json!(230.5))
        })
    })
    .await;

    // 6. `status` (with sudo) says the meter answers.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = run(&[BIN, "status"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("main_meter     online") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    run(&[BIN, "queue", "stats"]);
    Command::new("kill")
        .arg(gateway.id().to_string())
        .status()
        .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        let status = gateway.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(&mut gateway.stderr.take().unwrap(), &mut err).unwrap();
        (status, err)
    })
    .await
    .unwrap();
    assert!(out.0.success(), "{}", out.1);
    assert!(Path::new("/var/lib/fieldgate/queue.db").exists());
    assert_eq!(
        owner_and_mode("/var/lib/fieldgate/queue.db").0,
        "fieldgate:fieldgate"
    );

    // Purge: the state goes with the package (documented); the system user stays.
    let purge = Command::new("apt-get")
        .args(["purge", "-y", "-qq", "fieldgate"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap();
    assert!(
        purge.status.success(),
        "{}",
        String::from_utf8_lossy(&purge.stderr)
    );
    for gone in [
        BIN,
        "/var/lib/fieldgate",
        "/etc/fieldgate",
        "/etc/default/fieldgate",
        "/usr/share/fieldgate",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} is left after purge");
    }
    run(&["id", "fieldgate"]);
}
