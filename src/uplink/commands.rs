//! Commands from MQTT to devices: which `…/set` topic names which point, what a command
//! payload asks for, and the hand-over to the device's bus task. A refusal is answered on
//! `…/set/result`; nothing is written then.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::config::Config;

use super::Uplink;

/// The command topic of every point: `{point topic}/set`, or `{device topic}/{point}/set` for a
/// device published as one message.
pub fn command_topics(config: &Config) -> HashMap<String, (String, usize, crate::mapping::Point)> {
    let mut out = HashMap::new();
    for d in &config.devices {
        for (i, p) in d.points.iter().enumerate() {
            out.insert(d.set_topic(i), (d.name.clone(), i, p.clone()));
        }
    }
    out
}

/// What a command payload asks for: a bare value (`21.5`, `true`, `on`) or `{"value": …}`.
pub fn command_value(payload: &[u8]) -> Result<serde_json::Value, String> {
    let text = std::str::from_utf8(payload)
        .map_err(|_| "the payload is not UTF-8".to_string())?
        .trim();
    if text.is_empty() {
        return Err("empty payload".into());
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(m)) => m
            .get("value")
            .cloned()
            .ok_or_else(|| "expected {\"value\": …}".to_string()),
        Ok(
            v @ (serde_json::Value::Number(_)
            | serde_json::Value::Bool(_)
            | serde_json::Value::String(_)),
        ) => Ok(v),
        Ok(other) => Err(format!(
            "expected a value, got {}",
            crate::mapping::quote(&other)
        )),
        Err(_) if text.starts_with(['{', '[', '"']) => Err("malformed JSON".into()),
        Err(_) => Ok(serde_json::Value::String(text.to_string())),
    }
}

impl Uplink {
    /// Handles one incoming publish on a command topic: refuses it with a result message, or
    /// hands it to the device's bus task and publishes the result when it is done.
    pub(super) fn command(
        &self,
        topic: &str,
        payload: &[u8],
        retain: bool,
        results: &mpsc::Sender<super::link::Outbound>,
    ) {
        let Some((device, point, spec)) = self.set_topics.get(topic) else {
            return;
        };
        // An empty publish is how a retained message is cleared: not a command.
        if payload.is_empty() {
            tracing::debug!(%topic, "empty command payload ignored");
            return;
        }
        let result_topic = crate::topics::command_result(topic);
        let refuse = |why: String| {
            // Whatever a refusal quotes is short (`mapping::quote`); the cut here keeps any
            // reason to a bounded size all the same.
            let why = crate::mapping::cut(why, 4 * crate::mapping::QUOTED);
            tracing::warn!(%topic, reason = %why, "command refused; nothing written");
            let body = serde_json::json!({"ok": false, "error": why});
            // A full result queue means a flood of commands: the answer is dropped (logged above),
            // the command was not carried out.
            let _ = results.try_send((result_topic.clone(), body.to_string().into_bytes(), false));
        };
        // A retained command would be carried out again at every reconnect, hours later.
        if retain {
            return refuse("retained commands are ignored; publish without retain".into());
        }
        let data = match command_value(payload).and_then(|v| spec.encode(&v)) {
            Ok(d) => d,
            Err(why) => return refuse(why),
        };
        let Some(tx) = self.commands.get(device) else {
            return refuse(format!("device {device} does not take commands"));
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let cmd = crate::state::Command {
            device: device.clone(),
            point: *point,
            data,
            reply,
        };
        if tx.try_send(cmd).is_err() {
            return refuse("the bus is busy with other commands; try again".into());
        }
        let results = results.clone();
        self.pending_commands.spawn(async move {
            let body = match tokio::time::timeout(Duration::from_secs(30), answer).await {
                Ok(Ok(Ok(v))) => serde_json::json!({"ok": true, "value": v}),
                Ok(Ok(Err(e))) => serde_json::json!({"ok": false, "error": e}),
                _ => {
                    serde_json::json!({"ok": false, "error": "no answer from the bus within 30 s"})
                }
            };
            let _ = results
                .send((result_topic, body.to_string().into_bytes(), false))
                .await;
        });
    }
}
