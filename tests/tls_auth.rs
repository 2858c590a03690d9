//! TLS and authentication against a real mosquitto: server TLS, mutual TLS, and each way a
//! connection must be refused; password files; secrets kept out of logs.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Gateway, Mosquitto, Subscriber, free_port};
use fieldgate::store::Store;
use fieldgate::testkit::proxy::FaultProxy;
use fieldgate::testkit::sim::Simulator;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// A CA, and certificates it signed, written as PEM files into `dir`.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Pki {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, format!("fieldgate test CA {name}"));
        let ca = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join(format!("{name}-ca.pem")), ca.pem()).unwrap();
        Pki { ca }
    }

    /// Writes `{file}.pem` and `{file}.key` for `names`, valid now unless `expired`.
    fn issue(&self, dir: &Path, file: &str, names: &[&str], expired: bool) {
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("client"),
        );
        if expired {
            p.not_before = time::OffsetDateTime::from_unix_timestamp(1_577_836_800).unwrap(); // 2020
            p.not_after = time::OffsetDateTime::from_unix_timestamp(1_609_459_200).unwrap(); // 2021
        }
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.ca).unwrap();
        std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
    }
}

async fn sim() -> Simulator {
    let sim = Simulator::start(None).await.unwrap();
    sim.with_unit(1, |b| b.set_holding(0, &[7]));
    sim
}

const DEVICE: &str =
    "devices:\n  d:\n    bus: plc\n    every: 200ms\n    points:\n      p: { register: 0 }\n";

fn gateway_yaml(dir: &Path, sim: &Simulator, mqtt: &str) -> String {
    format!(
        "gateway: {{ id: gw1, state_dir: {} }}\nmqtt:\n{mqtt}buses:\n  plc:\n    modbus_tcp: {{ host: 127.0.0.1, port: {}, timeout: 300ms }}\n{DEVICE}",
        dir.join("state").display(),
        sim.addr.port()
    )
}

/// Runs the gateway for a while; returns how many readings the subscriber saw and the queue depth.
async fn run_for(dir: &Path, yaml: &str, sub: &Subscriber, secs: u64) -> (usize, u64) {
    let gw = Gateway::start(dir, yaml);
    tokio::time::sleep(Duration::from_secs(secs)).await;
    gw.stop().await;
    let got = sub
        .all()
        .iter()
        .filter(|r| r.topic == "fieldgate/gw1/d/p")
        .count();
    let depth = Store::open_read_only(&dir.join("state"))
        .unwrap()
        .stats()
        .unwrap()
        .depth;
    (got, depth)
}

/// Like [`run_for`], but runs the `fieldgate` binary, as systemd would, and also returns its
/// log: what the user sees when something is refused.
async fn run_logged(dir: &Path, yaml: &str, sub: &Subscriber, secs: u64) -> (usize, u64, String) {
    let cfg = dir.join("config.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_fieldgate"))
        .arg("run")
        .arg(&cfg)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let got = sub
        .all()
        .iter()
        .filter(|r| r.topic == "fieldgate/gw1/d/p")
        .count();
    let depth = Store::open_read_only(&dir.join("state"))
        .unwrap()
        .stats()
        .unwrap()
        .depth;
    (
        got,
        depth,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tls_listener(port: u16, dir: &Path, ca: &str, server: &str, require_cert: bool) -> String {
    format!(
        "listener {port} 127.0.0.1\nallow_anonymous true\ncafile {d}/{ca}-ca.pem\ncertfile {d}/{server}.pem\nkeyfile {d}/{server}.key\nrequire_certificate {require_cert}\n",
        d = dir.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connects_with_the_right_ca_and_is_refused_for_a_wrong_ca_an_expired_certificate_or_a_wrong_name()
 {
    let pki_dir = tempfile::tempdir().unwrap();
    let d = pki_dir.path();
    let good = Pki::new(d, "good");
    let _other = Pki::new(d, "other");
    good.issue(d, "server", &["localhost"], false);
    good.issue(d, "expired", &["localhost"], true);
    good.issue(d, "wrongname", &["broker.example"], false);
    let (p_ok, p_exp, p_name) = (free_port(), free_port(), free_port());
    let extra = tls_listener(p_ok, d, "good", "server", false)
        + &tls_listener(p_exp, d, "good", "expired", false)
        + &tls_listener(p_name, d, "good", "wrongname", false);
    let Some(broker) = Mosquitto::start_custom(tempfile::tempdir().unwrap(), &extra) else {
        return;
    };
    let sim = sim().await;

    // The right CA, the right name: readings arrive.
    let sub = Subscriber::start(broker.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let mqtt = format!(
        "  url: mqtts://localhost:{p_ok}\n  tls: {{ ca_file: {}/good-ca.pem }}\n",
        d.display()
    );
    let (got, _) = run_for(dir.path(), &gateway_yaml(dir.path(), &sim, &mqtt), &sub, 2).await;
    assert!(got >= 3, "server TLS: {got} readings");

    for (what, port, ca, reason) in [
        ("wrong CA", p_ok, "other", "issuer"),
        ("expired certificate", p_exp, "good", "expired"),
        ("wrong host name", p_name, "good", "name"),
    ] {
        let sub = Subscriber::start(broker.addr).await;
        let dir = tempfile::tempdir().unwrap();
        let mqtt = format!(
            "  url: mqtts://localhost:{port}\n  tls: {{ ca_file: {}/{ca}-ca.pem }}\n",
            d.display()
        );
        let (got, depth, log) =
            run_logged(dir.path(), &gateway_yaml(dir.path(), &sim, &mqtt), &sub, 2).await;
        assert_eq!(got, 0, "{what}: the connection must be refused");
        assert!(depth >= 3, "{what}: readings stay queued ({depth})");
        // The user sees why, once (#17: "no readings" alone would pass for any failure).
        let down = log
            .lines()
            .find(|l| l.contains("MQTT uplink down"))
            .unwrap_or_else(|| panic!("{what}: no 'uplink down' in the log:\n{log}"));
        assert!(
            down.contains("invalid peer certificate") && down.to_lowercase().contains(reason),
            "{what}: the log says why ({reason}):\n{log}"
        );
    }

    // insecure_skip_verify accepts even the wrong CA (lab use).
    let sub = Subscriber::start(broker.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let mqtt = format!(
        "  url: mqtts://localhost:{p_ok}\n  tls: {{ ca_file: {}/other-ca.pem, insecure_skip_verify: true }}\n",
        d.display()
    );
    let (got, _) = run_for(dir.path(), &gateway_yaml(dir.path(), &sim, &mqtt), &sub, 2).await;
    assert!(got >= 3, "insecure_skip_verify: {got} readings");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_the_client_certificate() {
    let pki_dir = tempfile::tempdir().unwrap();
    let d = pki_dir.path();
    let pki = Pki::new(d, "good");
    pki.issue(d, "server", &["localhost"], false);
    pki.issue(d, "client", &["fieldgate-gw1"], false);
    let port = free_port();
    let extra = tls_listener(port, d, "good", "server", true);
    let Some(broker) = Mosquitto::start_custom(tempfile::tempdir().unwrap(), &extra) else {
        return;
    };
    let sim = sim().await;

    let sub = Subscriber::start(broker.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let mqtt = format!(
        "  url: mqtts://localhost:{port}\n  tls: {{ ca_file: {d}/good-ca.pem, cert_file: {d}/client.pem, key_file: {d}/client.key }}\n",
        d = d.display()
    );
    let (got, _) = run_for(dir.path(), &gateway_yaml(dir.path(), &sim, &mqtt), &sub, 2).await;
    assert!(got >= 3, "mutual TLS: {got} readings");

    let sub = Subscriber::start(broker.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let mqtt = format!(
        "  url: mqtts://localhost:{port}\n  tls: {{ ca_file: {}/good-ca.pem }}\n",
        d.display()
    );
    let (got, depth) = run_for(dir.path(), &gateway_yaml(dir.path(), &sim, &mqtt), &sub, 2).await;
    assert_eq!(got, 0, "without a client certificate the broker refuses");
    assert!(depth >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_file_admits_the_right_credentials_and_wrong_ones_do_not_spin() {
    let conf_dir = tempfile::tempdir().unwrap();
    let pw = conf_dir.path().join("passwd");
    let ok = std::process::Command::new("mosquitto_passwd")
        .arg("-b")
        .arg("-c")
        .arg(&pw)
        .args(["gw", "s3cret-pw"])
        .status();
    if !ok.is_ok_and(|s| s.success()) {
        assert!(
            std::env::var("FIELDGATE_REQUIRE_MOSQUITTO").as_deref() != Ok("1"),
            "mosquitto_passwd missing"
        );
        return;
    }
    let port = free_port();
    let extra = format!(
        "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n",
        pw.display()
    );
    let Some(broker) = Mosquitto::start_custom(tempfile::tempdir().unwrap(), &extra) else {
        return;
    };
    let sim = sim().await;
    let upstream = format!("127.0.0.1:{port}").parse().unwrap();

    let sub = Subscriber::start(broker.addr).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pw"), "s3cret-pw\n").unwrap();
    let mqtt = format!("  url: mqtt://127.0.0.1:{port}\n  username: gw\n  password_file: pw\n");
    let (got, _, log) =
        run_logged(dir.path(), &gateway_yaml(dir.path(), &sim, &mqtt), &sub, 2).await;
    assert!(got >= 3, "right credentials: {got} readings");
    // This process read the password: it must not show in its log (#17: the check used to
    // run on a process that never had it).
    assert!(
        !log.contains("s3cret"),
        "the password reached the log:\n{log}"
    );

    // Wrong password, through a proxy that counts connection attempts.
    let proxy = FaultProxy::start(upstream).await.unwrap();
    let sub = Subscriber::start(broker.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let mqtt = format!(
        "  url: mqtt://{}\n  username: gw\n  password: wrong-pw-123\n",
        proxy.addr()
    );
    let yaml = gateway_yaml(dir.path(), &sim, &mqtt);
    let cfg = dir.path().join("config.yaml");
    let (got, _, log) = run_logged(dir.path(), &yaml, &sub, 5).await;
    assert_eq!(got, 0, "nothing published with a wrong password");
    assert!(
        proxy.connections() <= 2,
        "{} connection attempts in 5 s: a hot loop; log:\n{log}",
        proxy.connections()
    );
    assert!(
        log.contains("bad user name password") || log.contains("not authorized"),
        "the broker's reason is logged, in words: {log}"
    );
    assert_eq!(
        log.matches("MQTT uplink down").count(),
        1,
        "logged once: {log}"
    );
    assert!(!log.contains("wrong-pw-123"), "a secret reached the log");
    // Nor does `check` print it.
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_fieldgate"))
        .arg("check")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&check.stdout).contains("wrong-pw-123"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_the_broker_acl_refuses_does_not_wedge_the_queue() {
    let conf_dir = tempfile::tempdir().unwrap();
    let acl = conf_dir.path().join("acl");
    // Anonymous clients may write the gateway's own topics and `p`, not `q`.
    std::fs::write(
        &acl,
        "topic write fieldgate/gw1/status\ntopic write fieldgate/gw1/status/stats\ntopic write fieldgate/gw1/d/availability\ntopic write fieldgate/gw1/d/p\n",
    )
    .unwrap();
    let port = free_port();
    let extra = format!(
        "listener {port} 127.0.0.1\nallow_anonymous true\nacl_file {}\n",
        acl.display()
    );
    let Some(broker) = Mosquitto::start_custom(conf_dir, &extra) else {
        return;
    };
    let sim = Simulator::start(None).await.unwrap();
    sim.with_unit(1, |b| b.set_holding(0, &[7, 8]));
    let sub = Subscriber::start(broker.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "gateway: {{ id: gw1, state_dir: {} }}\nmqtt: {{ url: mqtt://127.0.0.1:{port} }}\nbuses:\n  plc:\n    modbus_tcp: {{ host: 127.0.0.1, port: {} }}\ndevices:\n  d:\n    bus: plc\n    every: 200ms\n    points:\n      p: {{ register: 0 }}\n      q: {{ register: 1 }}\n",
        dir.path().join("state").display(),
        sim.addr.port()
    );
    let gw = Gateway::start(dir.path(), &yaml);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // MQTT 3.1.1 has no way to say "refused" in a PUBACK: mosquitto acknowledges and drops the
    // publish. The row is deleted on that acknowledgement, so the queue keeps flowing.
    let depth = Store::open_read_only(&dir.path().join("state"))
        .unwrap()
        .stats()
        .unwrap()
        .depth;
    gw.stop().await;
    let all = sub.all();
    assert!(
        all.iter()
            .filter(|r| r.topic == "fieldgate/gw1/d/p")
            .count()
            >= 5
    );
    assert!(
        !all.iter().any(|r| r.topic == "fieldgate/gw1/d/q"),
        "the ACL let q through"
    );
    assert!(depth <= 4, "the queue is wedged: {depth} rows");
}

/// Runs `openssl` with `args` in `dir`; false if openssl is missing (then the test skips, or
/// fails under FIELDGATE_REQUIRE_MOSQUITTO, which `.ci/run` sets and which installs openssl).
fn openssl(dir: &Path, args: &[&str]) -> bool {
    match std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
    {
        Ok(s) => {
            assert!(s.success(), "openssl {args:?} failed");
            true
        }
        Err(_) => {
            assert!(
                std::env::var("FIELDGATE_REQUIRE_MOSQUITTO").as_deref() != Ok("1"),
                "openssl is required"
            );
            false
        }
    }
}

/// Acceptance testing (#10): a client certificate made with mosquitto's TLS recipe
/// (`openssl x509 -req` without extensions: an X.509 version 1 certificate) was refused at
/// config time with "the key does not fit the certificate: … UnsupportedCertVersion", though
/// mosquitto accepts it. The broker judges the client certificate; fieldgate sends it, and
/// checks only that the key belongs to it. A server certificate of that kind gets an error
/// that says what is wrong and how to make one that works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_client_certificate_from_the_mosquitto_recipe_is_sent_and_accepted() {
    let pki_dir = tempfile::tempdir().unwrap();
    let d = pki_dir.path();
    let pki = Pki::new(d, "good");
    pki.issue(d, "server", &["localhost"], false);
    std::fs::write(d.join("ca.key"), pki.ca.key().serialize_pem()).unwrap();
    // The recipe: key, CSR, `x509 -req` signed by the CA, no extensions.
    for args in [
        &["genrsa", "-out", "client.key", "2048"][..],
        &[
            "req",
            "-new",
            "-key",
            "client.key",
            "-out",
            "client.csr",
            "-subj",
            "/CN=gw1",
        ],
        &[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "good-ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "client.pem",
            "-days",
            "30",
        ],
        &["genrsa", "-out", "other.key", "2048"],
    ] {
        if !openssl(d, args) {
            return;
        }
    }
    let text = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in", "client.pem"])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("Version: 1 (0x0)"),
        "the recipe makes a version 1 certificate"
    );
    let port = free_port();
    let extra = tls_listener(port, d, "good", "server", true);
    let Some(broker) = Mosquitto::start_custom(tempfile::tempdir().unwrap(), &extra) else {
        return;
    };
    let sim = sim().await;
    let sub = Subscriber::start(broker.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let mqtt = format!(
        "  url: mqtts://localhost:{port}\n  tls: {{ ca_file: {d}/good-ca.pem, cert_file: {d}/client.pem, key_file: {d}/client.key }}\n",
        d = d.display()
    );
    let (got, _) = run_for(dir.path(), &gateway_yaml(dir.path(), &sim, &mqtt), &sub, 2).await;
    assert!(
        got >= 3,
        "mutual TLS with a v1 client certificate: {got} readings"
    );

    // A key that is not the certificate's is still refused, at config time, in plain words.
    let mqtt = format!(
        "  url: mqtts://localhost:{port}\n  tls: {{ ca_file: {d}/good-ca.pem, cert_file: {d}/client.pem, key_file: {d}/other.key }}\n",
        d = d.display()
    );
    let err = fieldgate::config::Config::from_text(
        &dir.path().join("c.yaml"),
        &gateway_yaml(dir.path(), &sim, &mqtt),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("other.key") && err.contains("does not belong to the certificate"),
        "{err}"
    );
}

#[test]
fn a_server_certificate_rustls_cannot_take_gets_an_explanation() {
    let v1 = fieldgate::tls::explain(
        // As logged against mosquitto with an `openssl x509 -req` server certificate.
        "TLS: I/O: invalid peer certificate: Other(OtherError(UnsupportedCertVersion))",
    )
    .unwrap();
    assert!(
        v1.contains("version 1") && v1.contains("subjectAltName"),
        "{v1}"
    );
    let cn_only = fieldgate::tls::explain("InvalidCertificate(NotValidForName)").unwrap();
    assert!(cn_only.contains("subjectAltName"), "{cn_only}");
    assert_eq!(fieldgate::tls::explain("Connection refused"), None);
}
