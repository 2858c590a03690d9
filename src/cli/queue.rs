//! `fieldgate queue stats`: the store-and-forward queue's figures, read from its file (works
//! while the gateway runs).

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;

pub fn stats(dir: &Path, json: bool) -> anyhow::Result<()> {
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
    let store = fieldgate::store::Store::open_read_only(dir)
        .with_context(|| format!("no readable queue in {}", dir.display()))?;
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
        "dropped          {} (oldest {}, newest {}, expired {})",
        s.dropped(),
        s.dropped_oldest,
        s.dropped_newest,
        s.dropped_expired
    );
    if s.clock_steps > 0 {
        println!(
            "clock steps      {} (readings polled before a step carry the old clock's ts)",
            s.clock_steps
        );
    }
    if s.set_aside > 0 {
        println!(
            "set aside        {} (could never be published; see the aside table)",
            s.set_aside
        );
    }
    println!(
        "acknowledged     {} since start, {} in all",
        s.acked_since_start, s.acked_total
    );
    Ok(())
}
