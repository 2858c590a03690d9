//! Diagnostics: every error names `file:line:column: field.path`. The YAML is parsed once for
//! positions (`SourceMap`) and once by serde; serde's errors are placed on the YAML.

use std::fmt;

use super::env::expand_env;
use super::source_map::{Loc, SourceMap};

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    pub file: String,
    pub loc: Loc,
    /// Dotted field path, e.g. `devices.boiler.points.pump.coil`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() {
            "(top)"
        } else {
            &self.path
        };
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file, self.loc.line, self.loc.col, path, self.message
        )
    }
}

/// Every problem found in a configuration and the models it uses.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<Diagnostic>);

impl ConfigErrors {
    /// Reads a config or model file; a file that cannot be read is one error at its line 1.
    pub fn read(path: &std::path::Path) -> Result<String, ConfigErrors> {
        std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![Diagnostic {
                file: path.display().to_string(),
                loc: Loc { line: 1, col: 1 },
                path: String::new(),
                message: match e.kind() {
                    std::io::ErrorKind::PermissionDenied => format!(
                        "cannot read the file: {}",
                        crate::files::permission_hint(path)
                    ),
                    _ => format!("cannot read the file: {e}"),
                },
            }])
        })
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

pub(super) struct Ctx<'a> {
    pub(super) file: &'a str,
    pub(super) map: &'a SourceMap,
}

impl Ctx<'_> {
    pub(super) fn diag(&self, path: &str, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            file: self.file.to_string(),
            loc: self.map.locate(path),
            path: path.to_string(),
            message: message.into(),
        }
    }
}

/// Expands the environment, indexes positions and deserializes `text` as `T`.
pub(super) fn parse<T: serde::de::DeserializeOwned>(
    file: &str,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<Diagnostic>,
) -> Option<(T, SourceMap)> {
    let expanded = match expand_env(text, env) {
        Ok(t) => t,
        Err(missing) => {
            // Index the unexpanded text to name the fields whose variables are missing.
            for (loc, var) in missing {
                errors.push(Diagnostic {
                    file: file.to_string(),
                    loc,
                    path: SourceMap::build(text)
                        .ok()
                        .and_then(|m| m.path_at(loc))
                        .unwrap_or_default(),
                    message: format!("environment variable {var} is not set (write ${{{var}:-default}} for a default)"),
                });
            }
            return None;
        }
    };
    let map = match SourceMap::build(&expanded) {
        Ok(m) => m,
        Err(e) => {
            errors.push(Diagnostic {
                file: file.to_string(),
                loc: e.loc,
                path: e.path,
                message: format!("YAML syntax: {}", e.message),
            });
            return None;
        }
    };
    for (path, loc) in &map.duplicates {
        errors.push(Diagnostic {
            file: file.to_string(),
            loc: *loc,
            path: path.clone(),
            message: "duplicate key: this name is already defined above in the same mapping".into(),
        });
    }
    match serde_yaml::from_str::<T>(&expanded) {
        Ok(v) if errors.is_empty() => Some((v, map)),
        Ok(_) => None,
        Err(e) => {
            errors.push(serde_diagnostic(file, &map, &e));
            None
        }
    }
}

/// Turns a serde_yaml error into a diagnostic, keeping its path and position.
pub(super) fn serde_diagnostic(file: &str, map: &SourceMap, e: &serde_yaml::Error) -> Diagnostic {
    let mut text = e.to_string();
    if let Some(i) = text.rfind(" at line ") {
        text.truncate(i);
    }
    // serde_yaml writes "path.to.field: message"; a message may itself hold ": ".
    let (path, message) = match text.split_once(": ") {
        Some((p, m)) if !p.contains(' ') => (p.to_string(), m.to_string()),
        _ => (String::new(), text.clone()),
    };
    let path = if path == "." { String::new() } else { path };
    // For an unknown field, point at the offending key itself.
    let key_path = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next())
        .map(|k| {
            if path.is_empty() {
                k.to_string()
            } else {
                format!("{path}.{k}")
            }
        });
    let loc = match (&key_path, e.location()) {
        (Some(k), _) if map.has(k) => map.locate_key(k),
        (_, Some(l)) => Loc {
            line: l.line(),
            col: l.column(),
        },
        _ => map.locate(&path),
    };
    Diagnostic {
        file: file.to_string(),
        loc,
        path: key_path.unwrap_or(path),
        message,
    }
}

impl SourceMap {
    /// The deepest recorded path whose value starts on `loc.line` (for env errors).
    pub(super) fn path_at(&self, loc: Loc) -> Option<String> {
        self.paths_on_line(loc.line)
    }
}

/// The known name a mistyped one most likely meant: one that contains it or is contained in it
/// (`sdm120` → `eastron-sdm120`), else the nearest by edit distance, if near.
pub(super) fn closest<'a>(wanted: &str, known: &'a [String]) -> Option<&'a str> {
    let w = wanted.to_lowercase();
    if let Some(k) = known
        .iter()
        .find(|k| k.to_lowercase().contains(&w) || w.contains(&k.to_lowercase()))
    {
        return Some(k);
    }
    known
        .iter()
        .map(|k| (edit_distance(&w, &k.to_lowercase()), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.as_str())
}

/// Levenshtein distance between two short names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_or_mistyped_model_name_finds_the_shipped_one() {
        let known: Vec<String> = ["abb-b23", "eastron-sdm120", "eastron-sdm630", "xy-md02"]
            .map(String::from)
            .to_vec();
        assert_eq!(closest("sdm120", &known), Some("eastron-sdm120"));
        assert_eq!(closest("eastron-sdm12O", &known), Some("eastron-sdm120"));
        assert_eq!(closest("xymd02", &known), Some("xy-md02"));
        assert_eq!(closest("growatt", &known), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
