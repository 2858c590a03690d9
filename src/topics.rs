//! Every topic rule in one place: the placeholders of a topic template and their rendering,
//! the default templates, and the topics fieldgate itself owns (gateway status, statistics,
//! device availability, the `/set` command topics).

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
