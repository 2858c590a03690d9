//! `${VAR}` and `${VAR:-default}` expansion from the environment, before the YAML is parsed.
//! Only `$${` is a literal `${`; a `$` anywhere else stays as it is (`pa$$word` stays `pa$$word`).

use super::source_map::Loc;

/// Expands `${VAR}` and `${VAR:-default}` outside comments. Line numbers are preserved; a value
/// that YAML would misread where it stands unquoted (`: `, ` #`, a leading `*` …) is quoted.
pub fn expand_env(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, Vec<(Loc, String)>> {
    let mut out = String::with_capacity(text.len());
    let mut missing = Vec::new();
    for (lineno, line) in text.split_inclusive('\n').enumerate() {
        let mut quote: Option<char> = None;
        let mut prev_space = true;
        let mut i = 0;
        let bytes = line.as_bytes();
        while i < line.len() {
            let c = line[i..].chars().next().expect("in bounds");
            if quote.is_none() && c == '#' && prev_space {
                out.push_str(&line[i..]);
                break;
            }
            if line[i..].starts_with("$${") {
                out.push_str("${");
                i += 3;
                prev_space = false;
                continue;
            }
            if line[i..].starts_with("${")
                && let Some(end) = line[i + 2..].find('}')
            {
                let inner = &line[i + 2..i + 2 + end];
                let (name, default) = match inner.split_once(":-") {
                    Some((n, d)) => (n, Some(d)),
                    None => (inner, None),
                };
                match env(name).or_else(|| default.map(str::to_string)) {
                    Some(v) => {
                        let whole_scalar = quote.is_none()
                            && line[..i].trim_end().ends_with(':')
                            && line[i + 3 + end..].trim().is_empty();
                        out.push_str(&quote_for(&v, quote, whole_scalar));
                    }
                    None => missing.push((
                        Loc {
                            line: lineno + 1,
                            col: line[..i].chars().count() + 1,
                        },
                        name.to_string(),
                    )),
                }
                i += 3 + end;
                prev_space = false;
                continue;
            }
            match (quote, c) {
                (None, '"') | (None, '\'')
                    if prev_space
                        || i == 0
                        || matches!(bytes[i - 1], b'[' | b'{' | b',' | b':') =>
                {
                    quote = Some(c)
                }
                (Some('"'), '\\') => {
                    // Keep the escaped character with its backslash.
                    out.push(c);
                    i += 1;
                    if let Some(n) = line[i..].chars().next() {
                        out.push(n);
                        i += n.len_utf8();
                    }
                    continue;
                }
                (Some(q), c) if q == c => quote = None,
                _ => {}
            }
            prev_space = c == ' ' || c == '\t';
            out.push(c);
            i += c.len_utf8();
        }
    }
    if missing.is_empty() {
        Ok(out)
    } else {
        Err(missing)
    }
}

pub(super) fn quote_for(v: &str, quote: Option<char>, whole_scalar: bool) -> String {
    match quote {
        Some('"') => v
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
            .replace('\t', "\\t"),
        Some('\'') => v.replace('\'', "''").replace('\n', " "),
        _ => {
            let plain_safe = !v.is_empty()
                && !v.contains(": ")
                && !v.contains(" #")
                && !v.contains('\n')
                && !v.ends_with(':')
                && !v.starts_with(|c: char| "*&!|>%@`'\"{[,?#-".contains(c) || c.is_whitespace())
                && !v.ends_with(char::is_whitespace);
            if plain_safe || !whole_scalar {
                v.to_string()
            } else {
                format!("\"{}\"", quote_for(v, Some('"'), false))
            }
        }
    }
}
