//! Where every key and value of a YAML file stands, so that semantic errors can name a line.
//!
//! serde_yaml reports positions only for syntax and type errors. [`SourceMap::build`] walks the
//! same text with yaml-rust2's event parser, which marks every event with its position, and
//! records it under the dotted path serde_yaml uses in its own messages
//! (`devices.boiler.points.pump`, `models[0]`). It also finds duplicate keys, which serde would
//! silently merge.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Loc {
    pub line: usize,
    pub col: usize,
}

#[derive(Debug, Default)]
pub struct SourceMap {
    values: HashMap<String, Loc>,
    keys: HashMap<String, Loc>,
    /// Paths of keys that appear twice in one mapping, with the second occurrence.
    pub duplicates: Vec<(String, Loc)>,
}

impl SourceMap {
    /// Indexes `text`. A syntax error returns its position and message.
    /// A syntax error is returned with where the parser gave up, the path of the innermost open
    /// mapping or sequence (empty at the top), and the message.
    pub fn build(text: &str) -> Result<SourceMap, SyntaxError> {
        let mut walker = Walker::default();
        let mut parser = Parser::new_from_str(text);
        if let Err(e) = parser.load(&mut walker, false) {
            // without yaml-rust2's own position suffix
            let mut message = e.info().to_string();
            // An unclosed `{` or `[` is found only where the parser gives up, often on a later
            // line: name where it was opened too.
            let flow = message.contains("flow mapping") || message.contains("flow sequence");
            let (path, opened) = match walker.stack.last() {
                Some(
                    Frame::Mapping { path, opened, .. } | Frame::Sequence { path, opened, .. },
                ) => (path.clone(), Some(*opened)),
                None => (String::new(), None),
            };
            if flow && let (Some(frame), Some(opened)) = (walker.stack.last(), opened) {
                message = format!(
                    "{message}; the flow {} opened at line {}, column {} is not closed",
                    if matches!(frame, Frame::Mapping { .. }) {
                        "mapping `{`"
                    } else {
                        "sequence `[`"
                    },
                    opened.line,
                    opened.col,
                );
            }
            let mut at = loc(e.marker());
            // YAML indents with spaces only. The parser notices a tab where it breaks the
            // structure, which can be after it: point at the first indenting tab instead.
            if message.contains("tab") {
                let indenting_tab = text.lines().enumerate().find_map(|(i, l)| {
                    let indent = &l[..l.len() - l.trim_start().len()];
                    indent.find('\t').map(|c| Loc {
                        line: i + 1,
                        col: indent[..c].chars().count() + 1,
                    })
                });
                if let Some(tab) = indenting_tab.filter(|t| t.line <= at.line) {
                    at = tab;
                    message = format!(
                        "{message}: a tab in the indentation; YAML indents with spaces only, replace it with spaces"
                    );
                }
            }
            return Err(SyntaxError {
                loc: at,
                path,
                message,
            });
        }
        Ok(walker.map)
    }

    /// The position of the value at `path`, or else of its key, or else of the nearest ancestor.
    pub fn locate(&self, path: &str) -> Loc {
        if let Some(l) = self.values.get(path) {
            return *l;
        }
        // For a mapping, or an ancestor standing in for a missing field, the key is where the
        // name is (a block mapping's own mark is only where its first entry starts).
        let mut p = path;
        loop {
            if let Some(l) = self.keys.get(p).or_else(|| self.values.get(p)) {
                return *l;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return Loc { line: 1, col: 1 },
            }
        }
    }

    /// The position of the key at `path` (for "unknown field" style errors), else [`locate`].
    ///
    /// [`locate`]: SourceMap::locate
    pub fn locate_key(&self, path: &str) -> Loc {
        self.keys
            .get(path)
            .copied()
            .unwrap_or_else(|| self.locate(path))
    }

    /// The value path that starts last on `line` (for errors found before parsing).
    pub fn paths_on_line(&self, line: usize) -> Option<String> {
        self.values
            .iter()
            .filter(|(_, l)| l.line == line)
            .max_by_key(|(_, l)| l.col)
            .map(|(p, _)| p.clone())
    }

    /// Whether `path` names a key or value in the document.
    pub fn has(&self, path: &str) -> bool {
        self.keys.contains_key(path) || self.values.contains_key(path)
    }
}

/// Where and why the YAML could not be parsed.
#[derive(Debug, Clone)]
pub struct SyntaxError {
    pub loc: Loc,
    /// The innermost mapping or sequence open at the error (empty at the top level).
    pub path: String,
    pub message: String,
}

fn loc(m: &Marker) -> Loc {
    // yaml-rust2 counts lines from 1 and columns from 0.
    Loc {
        line: m.line(),
        col: m.col() + 1,
    }
}

enum Frame {
    Mapping {
        path: String,
        key: Option<String>,
        seen: Vec<String>,
        opened: Loc,
    },
    Sequence {
        path: String,
        index: usize,
        opened: Loc,
    },
}

#[derive(Default)]
struct Walker {
    stack: Vec<Frame>,
    map: SourceMap,
    /// Depth of a complex (non-scalar) mapping key being skipped.
    skipping: usize,
}

impl Walker {
    /// The path the next value will have, or `None` if the next scalar is a mapping key.
    fn value_path(&mut self) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Mapping { key: None, .. }) => None,
            Some(Frame::Mapping { path, key, .. }) => {
                let k = key.take().expect("checked above");
                Some(join(path, &k))
            }
            Some(Frame::Sequence { path, index, .. }) => {
                let p = format!("{path}[{index}]");
                *index += 1;
                Some(p)
            }
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl MarkedEventReceiver for Walker {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.skipping > 0 {
            match ev {
                Event::MappingStart(..) | Event::SequenceStart(..) => self.skipping += 1,
                Event::MappingEnd | Event::SequenceEnd => self.skipping -= 1,
                _ => {}
            }
            return;
        }
        match ev {
            Event::Scalar(text, ..) => match self.value_path() {
                Some(path) => {
                    self.map.values.insert(path, loc(&mark));
                }
                None => {
                    if let Some(Frame::Mapping {
                        path, key, seen, ..
                    }) = self.stack.last_mut()
                    {
                        let full = join(path, &text);
                        if seen.contains(&text) {
                            self.map.duplicates.push((full.clone(), loc(&mark)));
                        } else {
                            seen.push(text.clone());
                            self.map.keys.insert(full, loc(&mark));
                        }
                        *key = Some(text);
                    }
                }
            },
            Event::Alias(_) => {
                if let Some(path) = self.value_path() {
                    self.map.values.insert(path, loc(&mark));
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let is_map = matches!(ev, Event::MappingStart(..));
                let in_sequence = matches!(self.stack.last(), Some(Frame::Sequence { .. }));
                match self.value_path() {
                    Some(path) => {
                        // Only items of a sequence have no key to point at.
                        if in_sequence {
                            self.map.values.insert(path.clone(), loc(&mark));
                        }
                        self.stack.push(if is_map {
                            Frame::Mapping {
                                path,
                                key: None,
                                seen: Vec::new(),
                                opened: loc(&mark),
                            }
                        } else {
                            Frame::Sequence {
                                path,
                                index: 0,
                                opened: loc(&mark),
                            }
                        });
                    }
                    // A mapping or sequence used as a key: skip it whole; serde will reject it.
                    None => {
                        self.skipping = 1;
                        if let Some(Frame::Mapping { key, .. }) = self.stack.last_mut() {
                            *key = Some("?".into());
                        }
                    }
                }
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
gateway:
  id: pi-01
models: [./mappings, ./more]
devices:
  boiler:
    bus: plc
    points:
      pump: { coil: 5 }
";

    #[test]
    fn every_key_and_value_has_its_line_and_column() {
        let map = SourceMap::build(DOC).unwrap();
        assert_eq!(map.locate("gateway.id"), Loc { line: 2, col: 7 });
        assert_eq!(map.locate_key("gateway.id"), Loc { line: 2, col: 3 });
        assert_eq!(map.locate("models[1]"), Loc { line: 3, col: 22 });
        assert_eq!(map.locate("devices.boiler.bus"), Loc { line: 6, col: 10 });
        assert_eq!(
            map.locate("devices.boiler.points.pump.coil"),
            Loc { line: 8, col: 21 }
        );
    }

    #[test]
    fn an_unknown_path_falls_back_to_its_nearest_ancestor() {
        let map = SourceMap::build(DOC).unwrap();
        assert_eq!(map.locate("devices.boiler.every"), Loc { line: 5, col: 3 });
    }

    #[test]
    fn duplicate_keys_are_reported_at_the_second_one() {
        let map = SourceMap::build("a:\n  x: 1\n  x: 2\n").unwrap();
        assert_eq!(
            map.duplicates,
            vec![("a.x".to_string(), Loc { line: 3, col: 3 })]
        );
    }

    #[test]
    fn syntax_errors_have_a_position() {
        // The flow sequence left open on line 1 breaks where `b:` appears, line 2 column 2.
        let e = SourceMap::build("a: [1, 2\nb: 3\n").unwrap_err();
        assert_eq!((e.loc.line, e.loc.col), (2, 2), "{e:?}");
        assert!(e.message.contains("':'"), "{e:?}");
    }

    /// A tab in the indentation is named at its own line, with what to do (#18).
    #[test]
    fn a_tab_in_the_indentation_says_use_spaces_where_it_is() {
        let e = SourceMap::build("devices:\n  boiler:\n    points:\n\t  pump: { coil: 5 }\n")
            .unwrap_err();
        assert_eq!((e.loc.line, e.loc.col), (4, 1), "{e:?}");
        assert!(e.message.contains("YAML indents with spaces only"), "{e:?}");
    }

    /// `{ coil: 5 ` left open on line 3 is found only on line 4: both lines are named (#11).
    #[test]
    fn an_unclosed_flow_mapping_names_where_it_opened() {
        let e = SourceMap::build(
            "points:\n  flow: { register: 1 }\n  pump: { coil: 5\n  x: { coil: 6 }\n",
        )
        .unwrap_err();
        assert_eq!(e.loc.line, 4, "{e:?}");
        assert_eq!(e.path, "points.pump");
        assert!(
            e.message
                .ends_with("the flow mapping `{` opened at line 3, column 9 is not closed"),
            "{e:?}"
        );
    }
}
