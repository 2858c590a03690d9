//! `fieldgate status`: what a running gateway last wrote to its `status.json`.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use fieldgate::status::Snapshot;

/// `fieldgate status`: the figures a running gateway last wrote.
pub fn show(dir: &Path, json: bool) -> anyhow::Result<()> {
    let path = dir.join("status.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => anyhow::bail!(
            "cannot read {}: {}",
            path.display(),
            fieldgate::files::permission_hint(&path)
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir.is_dir() => anyhow::bail!(
            "no status in {}: the gateway writes it at start; is it running? (`systemctl status fieldgate`)",
            dir.display()
        ),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read {}", path.display()));
        }
    };
    let age = std::fs::metadata(&path)?
        .modified()?
        .elapsed()
        .unwrap_or_default();
    if json {
        println!("{text}");
        return Ok(());
    }
    let v = Snapshot::from_json(text.as_bytes())
        .with_context(|| format!("{} is not a status file", path.display()))?;
    println!(
        "status written {} ago{}",
        humantime::format_duration(Duration::from_secs(age.as_secs())),
        if age > Duration::from_secs(300) {
            " — the gateway may not be running"
        } else {
            ""
        }
    );
    println!(
        "uptime           {}",
        humantime::format_duration(Duration::from_secs(v.uptime_s))
    );
    let q = &v.queue;
    println!(
        "queue            {} readings, oldest {}, {} bytes; dropped {}; acknowledged {} since start",
        q.depth,
        q.oldest_age_s.map_or("-".to_string(), |s| format!("{s} s")),
        q.bytes,
        q.dropped.total,
        q.acked_since_start
    );
    for (name, b) in &v.buses {
        let errors: Vec<String> = b.errors.iter().map(|(k, n)| format!("{k} {n}")).collect();
        println!(
            "bus {name:<12} {} requests, {} lines, errors {}, utilisation {:.1}%",
            b.requests,
            b.lines,
            if errors.is_empty() {
                "none".to_string()
            } else {
                errors.join(", ")
            },
            b.utilisation * 100.0
        );
        for (d, s) in &b.devices {
            let state = match s.online {
                Some(true) => "online",
                Some(false) => "OFFLINE",
                None => "unknown",
            };
            let last = s
                .last_success_ms
                .map(fieldgate::message::format_ts)
                .unwrap_or_else(|| "never".into());
            println!(
                "  {d:<14} {state:<8} last success {last}, polls {}, failed {}",
                s.polls, s.failed_polls
            );
        }
    }
    Ok(())
}
