//! Every topic rule in one place: the placeholders of a topic template and their rendering,
//! the default templates, and the topics fieldgate itself owns (gateway status, statistics,
//! device availability, the `/set` command topics).

/// The default template of a point's topic (`publish: point`).
pub const POINT_TEMPLATE: &str = "fieldgate/{gateway}/{device}/{point}";
/// The default template of a device's topic (`publish: device`).
pub const DEVICE_TEMPLATE: &str = "fieldgate/{gateway}/{device}";

/// The gateway's retained `online`/`offline` (its Last Will says `offline`).
pub fn gateway_status(gateway: &str) -> String {
    format!("fieldgate/{gateway}/status")
}

/// The gateway's retained statistics message (the status snapshot).
pub fn gateway_stats(gateway: &str) -> String {
    format!("{}/stats", gateway_status(gateway))
}

/// A device's retained `online`/`offline`.
pub fn device_availability(gateway: &str, device: &str) -> String {
    format!("fieldgate/{gateway}/{device}/availability")
}

/// Where commands for a point arrive when the point has a topic of its own.
pub fn point_set(point_topic: &str) -> String {
    format!("{point_topic}/set")
}

/// Where commands for a point arrive when its device is published as one message.
pub fn device_point_set(device_topic: &str, point: &str) -> String {
    format!("{device_topic}/{point}/set")
}

/// Where the result of a command is published.
pub fn command_result(set_topic: &str) -> String {
    format!("{set_topic}/result")
}

/// Home Assistant's discovery config topic of one entity.
pub fn ha_config(
    prefix: &str,
    component: &str,
    gateway: &str,
    device: &str,
    point: &str,
) -> String {
    format!("{prefix}/{component}/{gateway}/{device}_{point}/config")
}

/// Home Assistant's own `online` (it forgot every config when it restarted).
pub fn ha_status(prefix: &str) -> String {
    format!("{prefix}/status")
}

pub const PLACEHOLDERS: [&str; 4] = ["gateway", "device", "point", "unit"];

/// Checks a topic template: known placeholders only, no wildcards.
pub fn template_error(t: &str) -> Option<String> {
    if t.is_empty() {
        return Some("a topic cannot be empty".into());
    }
    if t.contains(['+', '#']) {
        return Some(format!(
            "`{t}`: '+' and '#' are subscription wildcards, not allowed in a topic"
        ));
    }
    if t.contains('\0') {
        return Some(format!(
            "`{}`: NUL is not allowed in a topic",
            t.escape_debug()
        ));
    }
    let mut rest = t;
    while let Some(i) = rest.find('{') {
        let Some(j) = rest[i..].find('}') else {
            return Some(format!("`{t}`: unclosed '{{'"));
        };
        let name = &rest[i + 1..i + j];
        if !PLACEHOLDERS.contains(&name) {
            return Some(format!(
                "unknown placeholder {{{name}}} in `{t}` (known: {{gateway}} {{device}} {{point}} {{unit}})"
            ));
        }
        rest = &rest[i + j + 1..];
    }
    None
}

pub fn render_topic(t: &str, gateway: &str, device: &str, point: &str, unit: &str) -> String {
    t.replace("{gateway}", gateway)
        .replace("{device}", device)
        .replace("{point}", point)
        .replace("{unit}", unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_accept_known_placeholders_only() {
        assert_eq!(
            template_error("site/{gateway}/{device}/{point}/{unit}"),
            None
        );
        assert!(
            template_error("x/{devise}")
                .unwrap()
                .contains("unknown placeholder {devise}")
        );
        assert!(template_error("x/#").is_some());
    }
}
