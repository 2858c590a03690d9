//! Home Assistant discovery as the uplink publishes it: the retained config of every point,
//! empty retained messages for the points that left the config since the last start (their
//! topics are remembered in `{state_dir}/discovery.json`), and again whenever Home Assistant
//! says it is `online` (it forgot them all when it restarted).

use std::collections::VecDeque;
use std::path::PathBuf;

use super::link::Outbound;
use crate::config::Config;

/// The discovery messages of one config, and where the last published set is remembered.
#[derive(Debug, Clone)]
pub struct Announcements {
    /// Home Assistant's own status topic.
    status_topic: String,
    /// Topic and retained payload of every config.
    configs: Vec<(String, Vec<u8>)>,
    file: PathBuf,
}

impl Announcements {
    /// None when discovery is off.
    pub fn new(config: &Config) -> Option<Announcements> {
        let d = config.homeassistant.as_ref()?;
        Some(Announcements {
            status_topic: crate::topics::ha_status(&d.prefix),
            configs: crate::discovery::configs(config, d)
                .into_iter()
                .map(|(t, v)| (t, v.to_string().into_bytes()))
                .collect(),
            file: config.gateway.state_dir.join("discovery.json"),
        })
    }

    /// Where Home Assistant says `online` after it starts.
    pub fn status_topic(&self) -> &str {
        &self.status_topic
    }

    /// Every discovery config (retained), after empty retained messages for the topics
    /// published last time that are gone now. A new announcement replaces one still under way
    /// (Home Assistant restarting twice gets one full set, not two).
    pub fn messages(&self) -> VecDeque<Outbound> {
        let before: Vec<String> = std::fs::read(&self.file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let now: Vec<String> = self.configs.iter().map(|(t, _)| t.clone()).collect();
        let mut out: VecDeque<Outbound> = before
            .iter()
            .filter(|t| !now.contains(t))
            .map(|gone| (gone.clone(), Vec::new(), true))
            .collect();
        out.extend(
            self.configs
                .iter()
                .map(|(t, body)| (t.clone(), body.clone(), true)),
        );
        if before != now
            && let Err(e) = std::fs::write(
                &self.file,
                serde_json::to_vec(&now).expect("strings serialize"),
            )
        {
            tracing::debug!(file = %self.file.display(), error = %e, "cannot remember the discovery topics");
        }
        out
    }
}
