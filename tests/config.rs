//! The configuration contract: golden cases under `tests/cases/<name>/` (a `config.yaml` in,
//! the `expected` output of `fieldgate check` out), and what a valid config resolves to.

use std::path::Path;
use std::process::Command;

use fieldgate::config::Config;
use fieldgate::mapping::{DataType, Order};
use fieldgate::modbus::Table;

fn check(config: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fieldgate"))
        .arg("check")
        .arg(config)
        .env_remove("FIELDGATE_TEST_SURELY_UNSET")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// Every case folder: exit 78 with exactly the expected errors, or exit 0 with the summary.
#[test]
fn golden_cases_give_the_documented_errors_with_file_line_and_column() {
    let mut cases: Vec<_> = std::fs::read_dir("tests/cases")
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    cases.sort();
    assert!(cases.len() >= 10);
    for case in cases {
        let expected = std::fs::read_to_string(case.join("expected")).unwrap();
        let (want_lines, want_exit) = expected.trim_end().rsplit_once('\n').unwrap();
        let want_exit: i32 = want_exit.strip_prefix("exit ").unwrap().parse().unwrap();
        let (code, stdout, stderr) = check(&case.join("config.yaml"));
        assert_eq!(
            code,
            want_exit,
            "{}: exit code\n{stdout}{stderr}",
            case.display()
        );
        if want_exit == 78 {
            assert_eq!(stderr.trim_end(), want_lines, "{}", case.display());
        } else {
            for line in want_lines.lines() {
                assert!(
                    stdout.contains(line),
                    "{}: missing `{line}` in\n{stdout}",
                    case.display()
                );
            }
        }
    }
}

#[test]
fn deny_unknown_fields() {
    // Every level of the file rejects a key it does not know.
    for (yaml, field) in [
        ("mqtt: { url: mqtt://x, qso: 1 }\n", "mqtt.qso"),
        ("mqtt: { url: mqtt://x }\ngatway: {}\n", "gatway"),
        (
            "mqtt: { url: mqtt://x }\nbuses: { b: { modbus_tcp: { host: x, prot: 1 } } }\n",
            "buses.b.modbus_tcp.prot",
        ),
        (
            "mqtt: { url: mqtt://x }\nbuses: { b: { modbus_tcp: { host: x } } }\ndevices: { d: { bus: b, evry: 1s, points: { p: { coil: 1 } } } }\n",
            "devices.d.evry",
        ),
    ] {
        let err = Config::from_text(Path::new("c.yaml"), yaml).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert_eq!(err.0[0].path, field, "{err}");
        assert!(err.0[0].message.starts_with("unknown field"), "{err}");
    }
}

#[test]
fn the_contract_example_resolves_models_overrides_and_defaults() {
    let c = Config::load(Path::new("tests/cases/valid_contract/config.yaml")).unwrap();
    assert_eq!(c.gateway.id, "pi-01");
    assert_eq!(c.mqtt.client_id, "fieldgate-pi-01");
    assert_eq!(c.mqtt.password.as_ref().unwrap().0, "secret");
    assert!(
        !format!("{c:?}").contains("secret"),
        "the password never prints"
    );
    let d = &c.devices[0];
    let p = |n: &str| d.points.iter().find(|p| p.name == n).unwrap().clone();
    // The inline flow_temp replaced the model's; the model's return_temp stays.
    let flow = p("flow_temp");
    assert_eq!(
        (
            flow.source.table,
            flow.source.address,
            flow.dtype,
            flow.order
        ),
        (Table::Holding, 100, DataType::F32, Order::CDAB)
    );
    assert_eq!(p("return_temp").unit.as_deref(), Some("°C"));
    assert_eq!(flow.delivery.topic, "fieldgate/pi-01/boiler/flow_temp");
    assert_eq!((flow.delivery.qos, flow.delivery.retain), (1, false));
    assert_eq!(p("alarm").dtype, DataType::Bool);
    assert_eq!(p("pump").source.table, Table::Coil);
    assert_eq!(p("energy").every, std::time::Duration::from_secs(60));
    assert_eq!(p("serial_no").width(), 4);
    // flow_temp (100..101) and return_temp (102..103) coalesce into one read.
    assert_eq!(c.requests_per_cycle(), 7);
}

#[test]
fn topic_templates_take_gateway_device_point_and_unit() {
    let yaml = "gateway: { id: g }\nmqtt: { url: mqtt://x }\nbuses: { b: { modbus_tcp: { host: x } } }\ndevices:\n  d:\n    bus: b\n    topic: \"plant/{gateway}/{device}\"\n    points:\n      p: { register: 1, unit: V, topic: \"x/{device}/{point}/{unit}\" }\n      q: { register: 2, topic: \"y/{point}\", qos: 2, retain: true }\n";
    let c = Config::from_text(Path::new("c.yaml"), yaml).unwrap();
    let t: Vec<_> = c.devices[0]
        .points
        .iter()
        .map(|p| (p.delivery.topic.as_str(), p.delivery.qos, p.delivery.retain))
        .collect();
    assert_eq!(t, vec![("x/d/p/V", 1, false), ("y/q", 2, true)]);
}

#[test]
fn check_prints_the_read_plan() {
    let (code, stdout, _) = check(Path::new("tests/cases/valid_contract/config.yaml"));
    assert_eq!(code, 0);
    assert!(
        stdout.contains("read holding registers 100..103 (4 registers)  flow_temp, return_temp"),
        "{stdout}"
    );
}

#[test]
fn run_refuses_a_bad_config_before_touching_anything() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cfg = dir.path().join("bad.yaml");
    std::fs::write(
        &cfg,
        format!("gateway: {{ state_dir: {} }}\nmqtt: {{ url: mqtt://127.0.0.1:1 }}\ndevices: {{ d: {{ bus: nope, points: {{ p: {{ coil: 1 }} }} }} }}\n", state.display()),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fieldgate"))
        .arg("run")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("bad.yaml:3:"), "{stderr}");
    assert!(
        stderr.contains("devices.d.bus: unknown bus `nope`"),
        "{stderr}"
    );
    assert!(!state.exists(), "no state dir was created");
}

#[test]
fn shipped_mappings_pass_check() {
    let (code, stdout, stderr) = check(Path::new("examples/demo.yaml"));
    assert_eq!(code, 0, "{stdout}{stderr}");
}

/// The README's example config, copied to a fresh folder as a newcomer would, passes `check`
/// (#18: its `models: [./mappings]` failed although no device uses a model). The folder that
/// does not exist is a warning naming the resolved path.
#[test]
fn the_readme_example_config_checks_in_an_empty_folder() {
    let readme = std::fs::read_to_string("README.md").unwrap();
    let example = readme
        .split("```yaml\n")
        .skip(1)
        .filter_map(|b| b.split_once("\n```").map(|(y, _)| y))
        .find(|y| y.starts_with("gateway:"))
        .expect("the README has an example config");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, format!("{example}\n")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fieldgate"))
        .arg("check")
        .arg(&path)
        .env("MQTT_PASSWORD", "secret")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("ok: 1 bus, 1 device, 3 points"), "{stdout}");
    let missing = dir.path().join("mappings");
    assert!(
        stderr.contains(&format!("warning: {}:", path.display()))
            && stderr.contains(&format!(
                "model folder {} does not exist",
                missing.display()
            )),
        "{stderr}"
    );
}

/// A model named with its file name, `.yaml` and all, is the same model (#18).
#[test]
fn a_model_is_found_with_or_without_yaml() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(
        &path,
        "mqtt: { url: mqtt://127.0.0.1 }\nmodels: [../mappings]\nbuses:\n  rs485:\n    modbus_rtu: { port: /dev/ttyUSB0 }\ndevices:\n  a:\n    bus: rs485\n    unit: 1\n    model: eastron-sdm120\n  b:\n    bus: rs485\n    unit: 2\n    model: eastron-sdm120.yaml\n",
    )
    .unwrap();
    let cwd_models = std::fs::canonicalize("mappings").unwrap();
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("../mappings", &cwd_models.display().to_string());
    std::fs::write(&path, text).unwrap();
    let (code, stdout, stderr) = check(&path);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("2 devices"), "{stdout}");
}
