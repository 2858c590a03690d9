//! The least HTTP/1.1 the status page needs: a bounded, timed read of a request head, its
//! parse, basic auth, and responses that close the connection.

use std::fmt;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The password of `Authorization: Basic …` (the user name is not checked).
    pub fn basic_auth_password(&self) -> Option<String> {
        let v = self.header("authorization")?;
        let (scheme, b64) = v.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = String::from_utf8(base64_decode(b64.trim())?).ok()?;
        let (_, password) = decoded.split_once(':')?;
        Some(password.to_string())
    }
}

/// Why a request head was not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    /// The client closed before sending anything: nothing to answer.
    Closed,
    Timeout,
    TooLarge,
    Malformed(&'static str),
}

impl HeadError {
    pub fn status(&self) -> u16 {
        match self {
            HeadError::Closed | HeadError::Malformed(_) => 400,
            HeadError::Timeout => 408,
            HeadError::TooLarge => 431,
        }
    }
}

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeadError::Closed => f.write_str("closed"),
            HeadError::Timeout => f.write_str("request head not received in time"),
            HeadError::TooLarge => f.write_str("request head too large"),
            HeadError::Malformed(why) => write!(f, "bad request: {why}"),
        }
    }
}

/// Reads one request head (up to the blank line) within `timeout` and `max` bytes.
pub async fn read_head<R: AsyncRead + Unpin>(
    conn: &mut R,
    timeout: Duration,
    max: usize,
) -> Result<Request, HeadError> {
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        let mut chunk = [0u8; 1024];
        loop {
            let n = conn.read(&mut chunk).await.map_err(|_| HeadError::Closed)?;
            if n == 0 {
                return Err(if buf.is_empty() {
                    HeadError::Closed
                } else {
                    HeadError::Malformed("the head ends early")
                });
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = find_end(&buf) {
                return parse_head(&buf[..end]);
            }
            if buf.len() > max {
                return Err(HeadError::TooLarge);
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or(Err(HeadError::Timeout))
}

fn find_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

/// Parses a request head (without the final blank line).
pub fn parse_head(head: &[u8]) -> Result<Request, HeadError> {
    let text = std::str::from_utf8(head).map_err(|_| HeadError::Malformed("not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or("");
    let mut parts = first.split(' ');
    let (Some(method), Some(path), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::Malformed(
            "the request line is not `METHOD /path HTTP/1.x`",
        ));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(HeadError::Malformed("only HTTP/1.x"));
    }
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(HeadError::Malformed("bad method"));
    }
    if !path.starts_with('/') {
        return Err(HeadError::Malformed("the path must start with /"));
    }
    let mut headers = Vec::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(HeadError::Malformed("a header line without `:`"));
        };
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
        headers,
    })
}

/// A response; every one closes the connection.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    extra: Vec<(&'static str, String)>,
    /// HEAD: the head of the GET, no body.
    head_only: bool,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: Vec<u8>) -> Response {
        Response {
            status,
            content_type,
            body,
            extra: Vec::new(),
            head_only: false,
        }
    }

    pub fn text(status: u16, body: &str) -> Response {
        Response::new(
            status,
            "text/plain; charset=utf-8",
            body.as_bytes().to_vec(),
        )
    }

    pub fn header(mut self, name: &'static str, value: &str) -> Response {
        self.extra.push((name, value.to_string()));
        self
    }

    pub fn without_body(mut self) -> Response {
        self.head_only = true;
        self
    }

    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The bytes on the wire (`head_only` as for a HEAD request).
    pub fn to_bytes(&self, head_only: bool) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            204 => "No Content",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "",
        };
        let mut head = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\nContent-Security-Policy: default-src 'self'; img-src 'self' data:; frame-ancestors 'none'\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        for (n, v) in &self.extra {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        if !head_only && !self.head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// Standard base64 (RFC 4648, with or without padding); None when it is not.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_head_parses_with_its_headers() {
        let r = parse_head(b"GET /api/status?x=1 HTTP/1.1\r\nHost: pi:8080\r\nAuthorization: Basic dXNlcjpzM2NyZXQ=").unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/api/status?x=1");
        assert_eq!(r.header("host"), Some("pi:8080"));
        assert_eq!(r.basic_auth_password().as_deref(), Some("s3cret"));
    }

    #[test]
    fn malformed_heads_are_refused_with_a_reason() {
        for bad in [
            &b"GET /"[..],
            b"GET / HTTP/2",
            b"get / HTTP/1.1",
            b"GET index HTTP/1.1",
            b"GET / HTTP/1.1\r\nno colon",
            b"\xff\xfe / HTTP/1.1",
            b"GET / HTTP/1.1 extra",
        ] {
            let e = parse_head(bad).unwrap_err();
            assert_eq!(e.status(), 400, "{bad:?}: {e}");
        }
    }

    #[test]
    fn basic_auth_needs_the_basic_scheme_and_valid_base64() {
        let with = |v: &str| Request {
            method: "GET".into(),
            path: "/".into(),
            headers: vec![("authorization".into(), v.into())],
        };
        assert_eq!(
            with("Basic Zm9vOmJhcg").basic_auth_password().as_deref(),
            Some("bar")
        );
        assert_eq!(with("Bearer Zm9vOmJhcg==").basic_auth_password(), None);
        assert_eq!(with("Basic !!!").basic_auth_password(), None);
        assert_eq!(with("Basic Zm9v").basic_auth_password(), None, "no colon");
    }

    #[tokio::test]
    async fn a_head_that_is_too_long_or_too_slow_is_refused() {
        let mut big = std::io::Cursor::new(vec![b'a'; 20_000]);
        let e = read_head(&mut big, Duration::from_secs(1), 8192)
            .await
            .unwrap_err();
        assert_eq!(e, HeadError::TooLarge);
        let (mut client, mut server) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap(); // and then nothing
        let e = read_head(&mut server, Duration::from_millis(100), 8192)
            .await
            .unwrap_err();
        assert_eq!(e, HeadError::Timeout);
        let mut empty = std::io::Cursor::new(Vec::new());
        assert_eq!(
            read_head(&mut empty, Duration::from_secs(1), 8192)
                .await
                .unwrap_err(),
            HeadError::Closed
        );
    }

    #[test]
    fn responses_close_and_carry_the_security_headers() {
        let r = Response::text(404, "nope\n").to_bytes(false);
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.contains("Content-Length: 5\r\n"));
        assert!(text.contains("X-Content-Type-Options: nosniff"));
        assert!(text.ends_with("\r\n\r\nnope\n"));
        let head = String::from_utf8(Response::text(200, "x").to_bytes(true)).unwrap();
        assert!(head.ends_with("\r\n\r\n"));
    }
}
