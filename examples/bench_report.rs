//! What report by exception saves: `cargo run --release --example bench_report`.
//!
//! One simulated hour of an Eastron SDM630 (the shipped model, 15 points) polled every second,
//! its energy registers every minute, with realistic noise: mains voltage drifting slowly with
//! 0.15 V of noise, 50 Hz ± a few mHz, a load that steps every few minutes (exponential, mean
//! 8 min) with 0.2 % current noise, a power factor around 0.95. The readings go through the
//! gateway's own stages — the change filter, the messages, the SQLite queue (a commit per poll,
//! the acknowledgement deletes an uplink makes) — without a network: an hour takes seconds.
//!
//! Printed per mode (publish always; on change with deadbands), per simulated hour: messages,
//! payload bytes, bytes written to storage (`/proc/self/io` `write_bytes`: WAL, checkpoints
//! and the database file) and that per reading and per byte of row.
//!
//! The queue file goes to `BENCH_DIR` (default: a folder under the system's temporary folder);
//! it must be on a real disk, not tmpfs, for `write_bytes` to count.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fieldgate::change::ChangeFilter;
use fieldgate::config::Config;
use fieldgate::mapping::{Value, f32_as_f64};
use fieldgate::poll::messages;
use fieldgate::store::Store;
use tokio::time::Instant;

const HOUR: u64 = 3600;

/// A small deterministic generator (xorshift64*), so every run sees the same hour.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.next().max(1e-12), self.next());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// The meter's true state, advanced one second at a time.
struct Meter {
    rng: Rng,
    load_a: [f64; 3],
    next_step: [u64; 3],
    import_kwh: f64,
}

impl Meter {
    fn new() -> Meter {
        Meter {
            rng: Rng(0x5DEECE66D),
            load_a: [6.0, 4.5, 9.0],
            next_step: [120, 300, 500],
            import_kwh: 12_345.6,
        }
    }

    /// The readings at second `t`, by point name.
    fn read(&mut self, t: u64) -> Vec<(&'static str, f64)> {
        let r = &mut self.rng;
        let mut out = Vec::new();
        let drift = 1.5 * (2.0 * std::f64::consts::PI * t as f64 / 2400.0).sin();
        let volts: Vec<f64> = (0..3)
            .map(|i| 230.0 + drift + i as f64 * 0.4 + 0.15 * r.normal())
            .collect();
        let pf = 0.95 + 0.002 * r.normal();
        let mut total = 0.0;
        for i in 0..3 {
            if t >= self.next_step[i] {
                self.load_a[i] = 2.0 + 18.0 * r.next();
                self.next_step[i] = t + (-480.0 * r.next().max(1e-9).ln()) as u64 + 1;
            }
            let amps = self.load_a[i] * (1.0 + 0.002 * r.normal());
            let watts = volts[i] * amps * pf;
            total += watts;
            let names = [
                ("l1_voltage", "l1_current", "l1_power"),
                ("l2_voltage", "l2_current", "l2_power"),
                ("l3_voltage", "l3_current", "l3_power"),
            ][i];
            out.push((names.0, volts[i]));
            out.push((names.1, amps));
            out.push((names.2, watts));
        }
        self.import_kwh += total / 3.6e6;
        out.push(("total_power", total));
        out.push(("total_power_factor", pf));
        out.push((
            "frequency",
            50.0 + 0.01 * (t as f64 / 300.0).sin() + 0.003 * r.normal(),
        ));
        if t.is_multiple_of(60) {
            out.push(("import_energy", self.import_kwh));
            out.push(("export_energy", 0.0));
            out.push(("total_energy", self.import_kwh));
        }
        out
    }
}

fn write_bytes() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Currents and powers follow the load; the rest (voltages, frequency, power factor, energy
/// counters) move slowly.
fn is_fast(point: &str) -> bool {
    (point.contains("current") || point.contains("power")) && !point.contains("factor")
}

struct Figures {
    readings: u64,
    messages: u64,
    /// Messages of the slow points (voltages, frequency, power factor, energies).
    slow_messages: u64,
    slow_readings: u64,
    payload_bytes: u64,
    row_bytes: u64,
    storage_bytes: u64,
}

/// One simulated hour; with `commit_every` > 1 s, the polls of that many seconds are committed
/// together, as `queue.commit_interval` makes the store thread do.
/// A gateway with the meter (the shipped SDM630 model) and `device_yaml` added to its device.
fn meter_config(device_yaml: &str) -> Config {
    let yaml = format!(
        "gateway: {{ id: bench }}\nmqtt: {{ url: mqtt://127.0.0.1 }}\nmodels: [mappings]\nbuses:\n  rs485: {{ modbus_rtu: {{ port: /dev/null }} }}\ndevices:\n  meter:\n    bus: rs485\n    model: eastron-sdm630\n{device_yaml}"
    );
    Config::from_text(Path::new("bench.yaml"), &yaml).unwrap_or_else(|e| panic!("{e}"))
}

/// The meter's readings at second `t` as the device's decoded values.
fn read_values(
    meter: &mut Meter,
    device: &fieldgate::config::Device,
    t: u64,
) -> Vec<(usize, Value)> {
    meter
        .read(t)
        .into_iter()
        .map(|(name, x)| {
            let i = device
                .points
                .iter()
                .position(|p| p.name == name)
                .expect(name);
            (i, Value::Float(f32_as_f64(x as f32)))
        })
        .collect()
}

fn run(label: &str, device_yaml: &str, dir: &Path, commit_every: u64) -> Figures {
    let config = meter_config(device_yaml);
    let device = &config.devices[0];
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let mut store = Store::open(dir).unwrap();
    let mut meter = Meter::new();
    let mut filter = ChangeFilter::default();
    let start = Instant::now();
    let ts0 = 1_795_665_600_000i64;
    let mut f = Figures {
        readings: 0,
        messages: 0,
        slow_messages: 0,
        slow_readings: 0,
        payload_bytes: 0,
        row_bytes: 0,
        storage_bytes: 0,
    };
    let before = write_bytes();
    let mut after_seq = 0;
    let mut waiting = Vec::new();
    for t in 0..HOUR {
        let mut values = read_values(&mut meter, device, t);
        f.readings += values.len() as u64;
        f.slow_readings += values
            .iter()
            .filter(|(i, _)| !is_fast(&device.points[*i].name))
            .count() as u64;
        filter.retain(
            &device.points,
            device.whole_device_on_change,
            start + Duration::from_secs(t),
            &mut values,
        );
        waiting.extend(messages(device, ts0 + t as i64 * 1000, values));
        if waiting.is_empty() || (t + 1) % commit_every != 0 {
            continue;
        }
        // A commit per poll (or per interval), as the store thread makes; then the uplink
        // publishes and the broker's acknowledgements delete the rows (in the next commit).
        store.append(&std::mem::take(&mut waiting)).unwrap();
        let rows = store.peek(after_seq, 1000).unwrap();
        for r in &rows {
            let body = serde_json::to_string(&r.message.body).unwrap();
            f.row_bytes += (r.message.topic.len() + body.len() + 4 * 8) as u64;
            f.payload_bytes += r.payload().len() as u64;
        }
        f.messages += rows.len() as u64;
        f.slow_messages += rows
            .iter()
            .filter(|r| !is_fast(r.message.topic.rsplit('/').next().unwrap_or("")))
            .count() as u64;
        after_seq = rows.last().map_or(after_seq, |r| r.seq);
        let seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
        store.ack(&seqs).unwrap();
    }
    store.close().unwrap();
    f.storage_bytes = write_bytes() - before;
    println!(
        "{label:<44} {:>6} messages ({:>5} of {} slow) {:>8} payload B {:>9} storage B  {:>5.0} B/message  {:>4.1}× row",
        f.messages,
        f.slow_messages,
        f.slow_readings,
        f.payload_bytes,
        f.storage_bytes,
        f.storage_bytes as f64 / f.messages.max(1) as f64,
        f.storage_bytes as f64 / f.row_bytes.max(1) as f64,
    );
    f
}

/// The floor under any queue that makes each poll durable on its own: the hour's rows (the same
/// bytes the row size counts) appended to a plain file with one `fdatasync` per poll, nothing
/// else — no index, no deletes, no checkpoint. `aligned` starts every poll's write on a fresh
/// 4 KiB block (padding the rest), so no block is written twice.
fn floor(label: &str, dir: &Path, aligned: bool) {
    use std::io::{Seek, SeekFrom, Write};
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let config = meter_config("");
    let device = &config.devices[0];
    let mut file = std::fs::File::create(dir.join("log")).unwrap();
    // Sized up front: growing a file past a hole rewrites the block at the old end.
    file.set_len(HOUR * 8192).unwrap();
    file.sync_all().unwrap();
    let mut meter = Meter::new();
    let (mut readings, mut row_bytes) = (0u64, 0u64);
    let before = write_bytes();
    for t in 0..HOUR {
        let values = read_values(&mut meter, device, t);
        let mut poll = Vec::new();
        for m in messages(device, 1_795_665_600_000 + t as i64 * 1000, values) {
            let body = serde_json::to_string(&m.body).unwrap();
            poll.extend_from_slice(&(readings as i64).to_le_bytes());
            poll.extend_from_slice(&m.ts_ms.to_le_bytes());
            poll.extend_from_slice(&[
                m.qos,
                m.retain as u8,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
            ]);
            poll.extend_from_slice(m.topic.as_bytes());
            poll.extend_from_slice(body.as_bytes());
            row_bytes += (m.topic.len() + body.len() + 4 * 8) as u64;
            readings += 1;
        }
        file.write_all(&poll).unwrap();
        if aligned {
            let end = file.stream_position().unwrap();
            file.seek(SeekFrom::Start(end.div_ceil(4096) * 4096))
                .unwrap();
        }
        file.sync_data().unwrap();
    }
    let storage = write_bytes() - before;
    println!(
        "{label:<44} {readings:>6} readings {:>34} {storage:>9} storage B  {:>5.0} B/message  {:>4.1}× row",
        "",
        storage as f64 / readings as f64,
        storage as f64 / row_bytes as f64,
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn main() {
    let dir: PathBuf = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("fieldgate-bench-report"));
    println!(
        "one simulated hour of an SDM630 polled every second (queue in {})",
        dir.display()
    );
    let always = run("publish always", "", &dir, 1);
    floor("floor: rows appended, fdatasync per poll", &dir, false);
    floor("floor: the same, each poll on its own block", &dir, true);
    let batched = run("publish always, commit_interval 5s", "", &dir, 5);
    println!(
        "{:<44} {:.1}× fewer storage bytes than committing every poll",
        "",
        always.storage_bytes as f64 / batched.storage_bytes.max(1) as f64
    );
    let sensible = "    on_change: true\n    deadband: \"0.5%\"\n    heartbeat: 5m\n    points:\n      l1_current: { register: 6, kind: input, type: f32, unit: A, deadband: \"2%\" }\n      l2_current: { register: 8, kind: input, type: f32, unit: A, deadband: \"2%\" }\n      l3_current: { register: 10, kind: input, type: f32, unit: A, deadband: \"2%\" }\n      l1_power: { register: 12, kind: input, type: f32, unit: W, deadband: \"2%\" }\n      l2_power: { register: 14, kind: input, type: f32, unit: W, deadband: \"2%\" }\n      l3_power: { register: 16, kind: input, type: f32, unit: W, deadband: \"2%\" }\n      total_power: { register: 52, kind: input, type: f32, unit: W, deadband: \"2%\" }\n";
    let modes = [
        ("on change, exact (no deadband)", "    on_change: true\n", 1),
        (
            "on change, 0.5 %, heartbeat 5m",
            "    on_change: true\n    deadband: \"0.5%\"\n    heartbeat: 5m\n",
            1,
        ),
        ("on change, 0.5 % slow, 2 % fast, heartbeat 5m", sensible, 1),
        ("  the same, commit_interval 5s", sensible, 5),
    ];
    for (label, yaml, commit_every) in modes {
        let f = run(label, yaml, &dir, commit_every);
        println!(
            "{:<44} {:.1}× fewer messages ({:.1}× fewer of the slow points), {:.1}× fewer storage bytes than publish always",
            "",
            always.messages as f64 / f.messages.max(1) as f64,
            always.slow_messages as f64 / f.slow_messages.max(1) as f64,
            always.storage_bytes as f64 / f.storage_bytes.max(1) as f64,
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
