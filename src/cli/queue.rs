//! `fieldgate queue stats | aside | requeue`: the store-and-forward queue's figures and its
//! rows set aside, read from its file (works while the gateway runs); re-queueing goes through
//! the running gateway when there is one (see `store::requeue`).

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;

pub fn stats(dir: &Path, json: bool) -> anyhow::Result<()> {
    let store = open(dir)?;
    let s = store.stats()?;
    let now = fieldgate::message::now_ms();
    let age = s
        .oldest_ts_ms
        .map(|t| Duration::from_secs(((now - t).max(0) / 1000) as u64));
    if json {
        let mut v = serde_json::to_value(s)?;
        v["oldest_age_s"] = serde_json::json!(age.map(|a| a.as_secs()));
        println!("{v}");
        return Ok(());
    }
    println!("queue            {}", store.path().display());
    println!("depth            {} readings", s.depth);
    println!(
        "oldest           {}",
        age.map_or("-".to_string(), |a| format!(
            "{} ago",
            humantime::format_duration(a)
        ))
    );
    println!("bytes in use     {} (file {})", s.bytes, s.file_bytes);
    println!("last seq         {}", s.last_seq);
    println!(
        "dropped          {} (oldest {}, newest {}, expired {}, unsaved {}, corrupt {})",
        s.dropped(),
        s.dropped_oldest,
        s.dropped_newest,
        s.dropped_expired,
        s.dropped_unsaved,
        s.dropped_corrupt
    );
    if s.clock_steps > 0 {
        println!(
            "clock steps      {} (readings polled before a step carry the old clock's ts)",
            s.clock_steps
        );
    }
    if s.set_aside > 0 {
        println!(
            "set aside        {} in all (never publishable or refused by the broker)",
            s.set_aside
        );
        for (reason, n) in &s.aside_by_reason {
            println!("  now aside      {n} {reason}");
        }
        if !s.aside_by_reason.is_empty() {
            println!(
                "                 (`fieldgate queue aside` lists them, `fieldgate queue requeue` sends them again)"
            );
        }
    }
    println!(
        "acknowledged     {} since start, {} in all",
        s.acked_since_start, s.acked_total
    );
    Ok(())
}

/// The queue of `dir`, read-only, with what to do when it cannot be read.
fn open(dir: &Path) -> anyhow::Result<fieldgate::store::Store> {
    // SQLite says only "unable to open database file": say what is wrong, and what to do.
    let file = dir.join("queue.db");
    if let Err(e) = std::fs::File::open(&file) {
        match e.kind() {
            std::io::ErrorKind::PermissionDenied => anyhow::bail!(
                "cannot read {}: {}",
                file.display(),
                fieldgate::files::permission_hint(&file)
            ),
            std::io::ErrorKind::NotFound => anyhow::bail!(
                "no queue in {}: the gateway creates queue.db when it first runs with this state_dir",
                dir.display()
            ),
            _ => {}
        }
    }
    fieldgate::store::Store::open_read_only(dir)
        .with_context(|| format!("no readable queue in {}", dir.display()))
}

/// `fieldgate queue aside`: the readings set aside, oldest first, with why.
pub fn aside(dir: &Path, reason: Option<&str>, limit: usize, json: bool) -> anyhow::Result<()> {
    let rows = open(dir)?.aside(reason, limit)?;
    if json {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("nothing set aside");
        return Ok(());
    }
    println!("{:>10}  {:<24}  {:<40}  reason", "seq", "ts", "topic");
    for r in &rows {
        println!(
            "{:>10}  {:<24}  {:<40}  {}",
            r.seq,
            fieldgate::message::format_ts(r.ts_ms),
            r.topic,
            if r.reason.is_empty() {
                "unpublishable"
            } else {
                &r.reason
            }
        );
    }
    Ok(())
}

/// `fieldgate queue requeue`: the readings set aside go back in the queue.
pub fn requeue(dir: &Path, reason: Option<&str>) -> anyhow::Result<()> {
    open(dir)?;
    use fieldgate::store::requeue::{Requeued, request};
    match request(dir, reason, Duration::from_secs(3))? {
        Requeued::ByGateway(n) => {
            println!("{n} readings queued again; the running gateway publishes them now")
        }
        Requeued::OnFile(n) => println!(
            "{n} readings queued again in {} (no gateway running; they go out when it starts)",
            dir.join("queue.db").display()
        ),
    }
    Ok(())
}
