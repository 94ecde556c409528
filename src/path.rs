//! Request-target normalisation (SPEC §3): turns the raw request target into the one canonical
//! path that is both matched and forwarded, or rejects it. Pure: no I/O, no allocation beyond the
//! result, no knowledge of routes.
//!
//! The rules, in order:
//! - the target must be origin-form (`/…`); `OPTIONS *` is the caller's business;
//! - the query (from the first `?`) is split off and kept byte for byte;
//! - backslash, NUL, control characters and their percent-encodings are refused;
//! - repeated slashes count as one;
//! - percent-encoded *unreserved* characters are decoded (`%62` → `b`); every other escape
//!   (`%2F`, `%20`, …) is kept exactly as received, so it stays inside its segment;
//! - raw non-ASCII bytes (UTF-8) are percent-encoded, as an IRI's are in its URI;
//! - a `.` or `..` segment (after that decoding, so `%2e%2e` too) is refused;
//! - a trailing slash is remembered but never counts as a segment.

use std::fmt;

/// Why a request target was refused. Every variant is answered 400 and sent nowhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Not origin-form: absolute-form, authority-form or empty.
    NotOriginForm,
    /// A `.` or `..` segment, literal or percent-encoded.
    DotSegment,
    /// A backslash, NUL or other control character, literal or percent-encoded.
    ForbiddenByte,
    /// A `%` not followed by two hex digits.
    BadEscape,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::NotOriginForm => "request target must be an absolute path (origin-form)",
            PathError::DotSegment => "path contains a '.' or '..' segment",
            PathError::ForbiddenByte => "path contains a backslash, NUL or control character",
            PathError::BadEscape => "path contains a malformed percent-escape",
        })
    }
}

impl std::error::Error for PathError {}

/// A normalised request target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalPath {
    /// `/`-joined segments, with a trailing `/` if the request had one. Never empty, always
    /// starts with `/`, never contains `//`.
    path: String,
    /// Byte ranges of each segment inside `path` (the trailing slash is not a segment).
    segments: Vec<(u32, u32)>,
    /// The query string without its `?`, as received; `None` when there was no `?`.
    query: Option<String>,
}

impl NormalPath {
    /// The normalised path, including the trailing slash if the request had one.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The raw query (without `?`), exactly as received.
    pub fn query(&self) -> Option<&str> {
        self.query.as_deref()
    }

    /// Whether the request path ended with `/` (and is not the root).
    pub fn trailing_slash(&self) -> bool {
        self.path.len() > 1 && self.path.ends_with('/')
    }

    /// Number of segments (the root `/` has none).
    pub fn len(&self) -> usize {
        self.segments.len()
    }

    /// Whether this is the root path `/`.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// The `i`-th segment.
    pub fn segment(&self, i: usize) -> &str {
        let (a, b) = self.segments[i];
        &self.path[a as usize..b as usize]
    }

    /// Iterates over the segments.
    pub fn segments(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.segments
            .iter()
            .map(|&(a, b)| &self.path[a as usize..b as usize])
    }

    /// The path from segment `i` on, starting with `/` (empty when `i == len()`), with the
    /// trailing slash if any. Used to graft the rest of a path onto a `rewrite` prefix.
    pub fn rest_from(&self, i: usize) -> &str {
        match self.segments.get(i) {
            Some(&(a, _)) => &self.path[a as usize - 1..],
            None if self.trailing_slash() => "/",
            None => "",
        }
    }
}

/// Whether a request target, as the client wrote it on the request line, begins as
/// origin-form (`/…`) or `*` must. Asked of the written bytes because Pingora drops a
/// `#fragment` before the proxy sees the target: `GET #x` would reach it as `/`.
pub fn written_as_path(target: &[u8]) -> bool {
    matches!(target.first(), Some(b'/' | b'*'))
}

/// The request target as the proxy reads it, raw from the request line: `OPTIONS *` has no
/// path to match (`None`: it goes to `default`); any other target is normalised, and one that
/// is not UTF-8 is refused as a forbidden byte. The proxy and `explain` both start here.
pub fn normalize_target(raw: &[u8], options: bool) -> Result<Option<NormalPath>, PathError> {
    if options && raw == b"*" {
        return Ok(None);
    }
    std::str::from_utf8(raw)
        .map_err(|_| PathError::ForbiddenByte)
        .and_then(normalize)
        .map(Some)
}

/// Normalises a request target (path and optional query, as on the request line).
pub fn normalize(target: &str) -> Result<NormalPath, PathError> {
    let (raw_path, query) = match target.find('?') {
        Some(i) => (&target[..i], Some(&target[i + 1..])),
        None => (target, None),
    };
    if !raw_path.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    let bytes = raw_path.as_bytes();
    let mut path = String::with_capacity(raw_path.len());
    let mut segments = Vec::with_capacity(8);
    let mut i = 0;
    while i < bytes.len() {
        // Skip the run of slashes in front of a segment.
        while i < bytes.len() && bytes[i] == b'/' {
            i += 1;
        }
        if i == bytes.len() {
            break;
        }
        path.push('/');
        let start = path.len();
        let mut escaped_slash = false;
        while i < bytes.len() && bytes[i] != b'/' {
            // A run of bytes copied as they are: everything up to the next `/`, `%`, forbidden
            // or non-ASCII byte. The run ends on a character boundary.
            let run = i;
            while i < bytes.len() && !ENDS_RUN[usize::from(bytes[i])] {
                i += 1;
            }
            path.push_str(&raw_path[run..i]);
            match bytes.get(i) {
                // Raw UTF-8 (RFC 3986 has none: an IRI's characters are sent percent-encoded,
                // RFC 3987 §3.1) is written as the escapes that mean the same to a backend, so
                // that `/caf\u{e9}` and `/caf%C3%A9` are one resource to the routes as to it.
                // The whole run of them, so that the next run starts on a character boundary.
                Some(b) if !b.is_ascii() => {
                    const HEX: &[u8; 16] = b"0123456789ABCDEF";
                    while let Some(&b) = bytes.get(i).filter(|b| !b.is_ascii()) {
                        path.push('%');
                        path.push(HEX[usize::from(b >> 4)] as char);
                        path.push(HEX[usize::from(b & 15)] as char);
                        i += 1;
                    }
                }
                Some(b'%') => {
                    let hex = bytes.get(i + 1..i + 3).ok_or(PathError::BadEscape)?;
                    let v = hex_pair(hex[0], hex[1]).ok_or(PathError::BadEscape)?;
                    if forbidden(v) {
                        return Err(PathError::ForbiddenByte);
                    }
                    if is_unreserved(v) {
                        path.push(v as char);
                    } else {
                        // Kept as received (case included): `%2F` stays inside its segment.
                        path.push_str(&raw_path[i..i + 3]);
                        escaped_slash |= v == b'/';
                    }
                    i += 3;
                }
                Some(&b) if forbidden(b) => return Err(PathError::ForbiddenByte),
                _ => {} // `/` or the end: the segment is complete.
            }
        }
        let seg = &path[start..];
        if (seg.starts_with('.') || escaped_slash) && hides_dot_segment(seg, escaped_slash) {
            return Err(PathError::DotSegment);
        }
        segments.push((start as u32, path.len() as u32));
    }
    if path.is_empty() || bytes.ends_with(b"/") {
        path.push('/');
    }
    Ok(NormalPath {
        path,
        segments,
        query: query.map(str::to_owned),
    })
}

/// A segment that a backend may take for a dot segment: `..%2Fadmin` (a server that decodes
/// `%2F` before it resolves dot segments, as nginx and most WSGI stacks do, reads `../admin`)
/// and `..;x` (Tomcat and Jetty drop a path parameter before they resolve). Through the proxy
/// such a request would reach a resource other than the one it was routed by. `.` and `..`
/// themselves are dot segments too. Looked at only for a segment with a `.` in front or an
/// escaped slash (`escaped_slash`): most segments cost one byte test.
fn hides_dot_segment(seg: &str, escaped_slash: bool) -> bool {
    let is_dot = |piece: &str| {
        let piece = piece.split(';').next().unwrap_or(piece);
        piece == "." || piece == ".."
    };
    is_dot(seg) || (escaped_slash && split_escaped_slash(seg).any(is_dot))
}

/// `seg`'s pieces between its `%2F`s (either case).
fn split_escaped_slash(seg: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(seg);
    std::iter::from_fn(move || {
        let s = rest?;
        let at = s
            .as_bytes()
            .windows(3)
            .position(|w| w.eq_ignore_ascii_case(b"%2f"));
        match at {
            Some(i) => {
                rest = Some(&s[i + 3..]);
                Some(&s[..i])
            }
            None => {
                rest = None;
                Some(s)
            }
        }
    })
}

/// The bytes that end a run copied as it is: `/`, `%`, a [`forbidden`] one, a non-ASCII one.
/// One table lookup per byte of the path.
static ENDS_RUN: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let u = b as u8;
        t[b] = u == b'/' || u == b'%' || forbidden(u) || !u.is_ascii();
        b += 1;
    }
    t
};

const fn forbidden(b: u8) -> bool {
    b == b'\\' || b < 0x20 || b == 0x7f
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_pair(hi: u8, lo: u8) -> Option<u8> {
    let h = (hi as char).to_digit(16)?;
    let l = (lo as char).to_digit(16)?;
    Some((h * 16 + l) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(target: &str) -> (String, Vec<String>, Option<String>) {
        let n = normalize(target).unwrap_or_else(|e| panic!("{target}: {e}"));
        (
            n.path().to_string(),
            n.segments().map(str::to_string).collect(),
            n.query().map(str::to_string),
        )
    }

    #[test]
    fn normalises_as_the_spec_says() {
        let cases: &[(&str, &str, &[&str], Option<&str>)] = &[
            ("/", "/", &[], None),
            ("/bookings", "/bookings", &["bookings"], None),
            ("/bookings/", "/bookings/", &["bookings"], None),
            ("//bookings", "/bookings", &["bookings"], None),
            (
                "/bookings//42///x",
                "/bookings/42/x",
                &["bookings", "42", "x"],
                None,
            ),
            ("/%62ookings", "/bookings", &["bookings"], None),
            ("/%7euser/%41", "/~user/A", &["~user", "A"], None),
            ("/a%2Fb/c", "/a%2Fb/c", &["a%2Fb", "c"], None),
            ("/a%2fb", "/a%2fb", &["a%2fb"], None),
            ("/a%20b", "/a%20b", &["a%20b"], None),
            ("/x?y=1&z=%2F", "/x", &["x"], Some("y=1&z=%2F")),
            ("/x?", "/x", &["x"], Some("")),
            ("/x/?a//b", "/x/", &["x"], Some("a//b")),
            ("///", "/", &[], None),
            ("/...", "/...", &["..."], None),
            ("/a.b/.c", "/a.b/.c", &["a.b", ".c"], None),
            ("/caf\u{e9}", "/caf%C3%A9", &["caf%C3%A9"], None),
            ("/caf%c3%a9", "/caf%c3%a9", &["caf%c3%a9"], None),
            (
                "/\u{65e5}/x?q=\u{e9}",
                "/%E6%97%A5/x",
                &["%E6%97%A5", "x"],
                Some("q=\u{e9}"),
            ),
        ];
        for (target, path, segs, query) in cases {
            let (p, s, q) = ok(target);
            assert_eq!(&p, path, "path of {target}");
            assert_eq!(s, segs.to_vec(), "segments of {target}");
            assert_eq!(q.as_deref(), *query, "query of {target}");
        }
    }

    #[test]
    fn only_a_path_or_an_asterisk_is_written_as_a_target() {
        for t in [&b"/"[..], b"/a#b", b"*"] {
            assert!(written_as_path(t), "{t:?}");
        }
        for t in [&b""[..], b"#x", b"?q", b"a/b", b"http://h/", b" /a"] {
            assert!(!written_as_path(t), "{t:?}");
        }
    }

    #[test]
    fn refuses_what_the_spec_refuses() {
        let cases: &[(&str, PathError)] = &[
            ("", PathError::NotOriginForm),
            ("bookings", PathError::NotOriginForm),
            ("http://evil.example/bookings", PathError::NotOriginForm),
            ("*", PathError::NotOriginForm),
            ("/a/../b", PathError::DotSegment),
            ("/a/./b", PathError::DotSegment),
            ("/a/%2e%2e/b", PathError::DotSegment),
            ("/a/%2E/b", PathError::DotSegment),
            ("/a/.%2e", PathError::DotSegment),
            ("/..", PathError::DotSegment),
            ("/a/..?x", PathError::DotSegment),
            // Dot segments a backend finds once it decodes `%2F` or drops a `;` parameter.
            ("/shop/..%2Finternal/x", PathError::DotSegment),
            ("/shop/%2e%2e%2finternal", PathError::DotSegment),
            ("/shop/a%2F..", PathError::DotSegment),
            ("/shop/a%2F.%2Fb", PathError::DotSegment),
            ("/shop/..;/internal", PathError::DotSegment),
            ("/shop/.;x/y", PathError::DotSegment),
            ("/shop/a%2F..;x", PathError::DotSegment),
            ("/a/.%2Fb/", PathError::DotSegment),
            ("/a\\b", PathError::ForbiddenByte),
            ("/a%5cb", PathError::ForbiddenByte),
            ("/a%00b", PathError::ForbiddenByte),
            ("/a\u{0}b", PathError::ForbiddenByte),
            ("/a\tb", PathError::ForbiddenByte),
            ("/a%0d%0ab", PathError::ForbiddenByte),
            ("/a%7f", PathError::ForbiddenByte),
            ("/a%zz", PathError::BadEscape),
            ("/a%4", PathError::BadEscape),
            ("/a%", PathError::BadEscape),
        ];
        for (target, want) in cases {
            assert_eq!(normalize(target), Err(*want), "{target:?}");
        }
    }

    /// What only looks like a dot segment is a name like any other.
    #[test]
    fn dots_inside_names_are_names() {
        for t in [
            "/a%2Fb",
            "/a/%2F",
            "/a/%2F%2F",
            "/a/...",
            "/a/.well-known/x",
            "/a/..foo",
            "/a/v1.2%2Fx",
            "/a/x;..",
            "/a/%2F...%2Fb",
        ] {
            assert!(normalize(t).is_ok(), "{t}");
        }
    }

    #[test]
    fn normalising_twice_changes_nothing() {
        for t in ["/%62ookings//42/", "/a%2Fb", "/x/y?q", "/", "/a%41%2f"] {
            let once = normalize(t).unwrap();
            let twice = normalize(once.path()).unwrap();
            assert_eq!(once.path(), twice.path(), "{t}");
        }
    }

    #[test]
    fn rest_from_grafts_the_remainder() {
        let n = normalize("/departures/5/x/").unwrap();
        assert_eq!(n.rest_from(0), "/departures/5/x/");
        assert_eq!(n.rest_from(1), "/5/x/");
        assert_eq!(n.rest_from(3), "/");
        let n = normalize("/departures").unwrap();
        assert_eq!(n.rest_from(1), "");
        assert!(!n.trailing_slash());
        assert!(!normalize("/").unwrap().trailing_slash());
    }
}
