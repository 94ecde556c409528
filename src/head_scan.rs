//! What a client has sent of a request header, seen chunk by chunk as the connection reads it
//! (`connection.rs` feeds it): enough to tell, when Pingora's HTTP/1 parser refuses a header
//! before any hook runs, which of the proxy's own errors that refusal is.
//!
//! Pingora answers such a header with a bare `400` of its own: a target over 65 534 bytes (the
//! `http` crate's URI limit), more than 256 header fields, a header block over 1 MiB, two `Host`
//! headers, a malformed `Content-Length`, bytes that are not HTTP. SPEC §4 wants every error the
//! proxy makes itself as JSON, and a target or a header that is too long to be its 414 and 431
//! whatever the size: [`HeadScan::refusal`] picks the error as `proxy::Limits` would have, had
//! the header been parsed. Nothing here parses HTTP: it counts lines and bytes.

use crate::errors::{self, ProxyError};
use crate::proxy::Limits;

/// The longest request target Pingora accepts (the `http` crate's URI limit).
pub const PINGORA_MAX_TARGET: usize = 65_534;
/// The most header fields Pingora's parser accepts (`MAX_HEADERS` in pingora-core).
pub const PINGORA_MAX_FIELDS: usize = 256;
/// The largest header block Pingora reads (`MAX_HEADER_SIZE` in pingora-core).
pub const PINGORA_MAX_HEADER: usize = 1 << 20;

/// `" HTTP/1.1"` after the target on the request line.
const VERSION_LEN: usize = 9;

/// One request header's lines and bytes, as far as they have been read.
#[derive(Debug, Default, Clone)]
pub struct HeadScan {
    /// Bytes read of this header, up to its blank line.
    bytes: usize,
    /// The request line's length without its line end, once that has been read.
    request_line: Option<usize>,
    /// Header field lines read after the request line.
    fields: usize,
    /// Bytes read of the line not yet ended.
    line: usize,
    /// The last chunk ended with `\r` (a `\r\n` split across two reads).
    last_cr: bool,
    /// The blank line that ends the header has been read: what follows is not the header's.
    done: bool,
    /// The first bytes of the header: its method.
    start: [u8; 8],
    start_len: u8,
}

impl HeadScan {
    /// Counts the next bytes read.
    pub fn feed(&mut self, chunk: &[u8]) {
        if self.done || chunk.is_empty() {
            return;
        }
        let have = usize::from(self.start_len);
        if have < self.start.len() {
            // The method starts the request line, after any empty lines.
            let from = if have == 0 {
                chunk
                    .iter()
                    .position(|&b| b != b'\r' && b != b'\n')
                    .unwrap_or(chunk.len())
            } else {
                0
            };
            let n = (self.start.len() - have).min(chunk.len() - from);
            self.start[have..have + n].copy_from_slice(&chunk[from..from + n]);
            self.start_len += n as u8;
        }
        let mut from = 0;
        for nl in memchr::memchr_iter(b'\n', chunk) {
            let cr = if nl > from {
                chunk[nl - 1] == b'\r'
            } else {
                self.line > 0 && self.last_cr
            };
            let len = self.line + (nl - from) - usize::from(cr);
            self.line = 0;
            from = nl + 1;
            match self.request_line {
                // Empty lines before a request line are skipped, as the parser does.
                None if len == 0 => {}
                None => self.request_line = Some(len),
                Some(_) if len == 0 => {
                    self.done = true;
                    self.bytes += from;
                    return;
                }
                Some(_) => self.fields += 1,
            }
        }
        self.line += chunk.len() - from;
        self.last_cr = chunk[chunk.len() - 1] == b'\r';
        self.bytes += chunk.len();
    }

    /// The method token at the start of the header, if one ended within its first bytes.
    fn method(&self) -> Option<&[u8]> {
        let start = &self.start[..usize::from(self.start_len)];
        let end = start.iter().position(|&b| b == b' ')?;
        Some(&start[..end])
    }

    /// The method's label for `strangler_requests_total` (`OTHER` when there is none).
    pub fn method_label(&self) -> &'static str {
        self.method()
            .and_then(|m| http::Method::from_bytes(m).ok())
            .map_or("OTHER", |m| crate::metrics::method_label(&m))
    }

    /// Whether the request is a `HEAD`: its answer has no body.
    pub fn is_head(&self) -> bool {
        self.method() == Some(b"HEAD")
    }

    /// The error a refused header is answered with: 414 when its target is longer than the
    /// limit (strangler's or Pingora's, the lower), 431 when its fields are too many or too
    /// large, 400 otherwise — the order `Limits::refusal` checks them in.
    pub fn refusal(&self, limits: &Limits) -> ProxyError {
        // A request line not yet ended counts with what has come of it.
        let request_line = self.request_line.unwrap_or(self.line);
        let method = self.method().map_or(0, <[u8]>::len);
        let target = request_line.saturating_sub(method + 1 + VERSION_LEN);
        if target > limits.max_uri_bytes.min(PINGORA_MAX_TARGET) {
            return errors::URI_TOO_LONG;
        }
        // The field lines as sent (names, values, `: ` and line ends): a little more than the
        // names and values `Limits` counts, which only matters for a header refused for
        // something else within a few bytes of the limit.
        let fields_bytes = match self.request_line {
            Some(line) => self.bytes.saturating_sub(line),
            None => 0,
        };
        // Pingora's 1 MiB counts the request line too.
        if self.fields > limits.max_headers.min(PINGORA_MAX_FIELDS)
            || fields_bytes > limits.max_header_bytes
            || self.bytes > PINGORA_MAX_HEADER
        {
            return errors::HEADERS_TOO_LARGE;
        }
        errors::BAD_REQUEST
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_uri_bytes: 100,
            max_header_bytes: 200,
            max_headers: 5,
        }
    }

    fn scan_whole(bytes: &[u8]) -> HeadScan {
        let mut s = HeadScan::default();
        s.feed(bytes);
        s
    }

    /// Every split of the bytes into two reads, and one byte per read, count as one read does.
    fn assert_split_invariant(bytes: &[u8]) {
        let whole = scan_whole(bytes);
        let key = |s: &HeadScan| (s.bytes, s.request_line, s.fields, s.done, s.method_label());
        for cut in 0..=bytes.len() {
            let mut s = HeadScan::default();
            s.feed(&bytes[..cut]);
            s.feed(&bytes[cut..]);
            assert_eq!(key(&s), key(&whole), "cut at {cut} of {bytes:?}");
        }
        let mut s = HeadScan::default();
        for b in bytes {
            s.feed(std::slice::from_ref(b));
        }
        assert_eq!(key(&s), key(&whole), "byte by byte: {bytes:?}");
    }

    #[test]
    fn lines_and_bytes_are_counted_however_the_reads_fall() {
        for bytes in [
            &b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\r\nbody\r\nmore\r\n"[..],
            b"GET /a HTTP/1.1\nHost: x\n\nbody\n",
            b"\r\n\r\nPOST /b HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\r\nX-Unfinished: yes",
            b"GET /aaaaaaaaaaaaaaaaaaaa",
            b"",
        ] {
            assert_split_invariant(bytes);
        }
        let s = scan_whole(b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\r\nbody\r\nmore\r\n");
        assert_eq!(s.request_line, Some(15));
        assert_eq!(s.fields, 2);
        assert!(s.done);
        assert_eq!(s.bytes, 36, "the body is not the header's");
        let s = scan_whole(b"\r\n\r\nPOST /b HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!((s.request_line, s.fields), (Some(16), 1));
        assert_eq!(
            s.method_label(),
            "POST",
            "empty lines before the request line"
        );
    }

    #[test]
    fn refusals_are_picked_as_the_limits_would() {
        let l = limits();
        let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(100));
        assert_eq!(
            scan_whole(long.as_bytes()).refusal(&l),
            errors::URI_TOO_LONG
        );
        let fits = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(99));
        assert_eq!(scan_whole(fits.as_bytes()).refusal(&l), errors::BAD_REQUEST);
        // A request line still coming counts too (a header over 1 MiB that never ends).
        let coming = format!("GET /{}", "a".repeat(150));
        assert_eq!(
            scan_whole(coming.as_bytes()).refusal(&l),
            errors::URI_TOO_LONG
        );
        let many: String = (0..6).map(|i| format!("X-{i}: 1\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(
            scan_whole(many.as_bytes()).refusal(&l),
            errors::HEADERS_TOO_LARGE
        );
        let big = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "v".repeat(200));
        assert_eq!(
            scan_whole(big.as_bytes()).refusal(&l),
            errors::HEADERS_TOO_LARGE
        );
        let two_hosts = b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n";
        assert_eq!(scan_whole(two_hosts).refusal(&l), errors::BAD_REQUEST);
        // Pingora's own limits hold whatever strangler's are.
        let wide = Limits {
            max_uri_bytes: usize::MAX,
            max_header_bytes: usize::MAX,
            max_headers: usize::MAX,
        };
        let huge = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(PINGORA_MAX_TARGET));
        assert_eq!(
            scan_whole(huge.as_bytes()).refusal(&wide),
            errors::URI_TOO_LONG
        );
        let lots: String = (0..=PINGORA_MAX_FIELDS)
            .map(|i| format!("X-{i}: 1\r\n"))
            .collect();
        let lots = format!("GET / HTTP/1.1\r\n{lots}\r\n");
        assert_eq!(
            scan_whole(lots.as_bytes()).refusal(&wide),
            errors::HEADERS_TOO_LARGE
        );
        // Pingora stops reading at 1 MiB, request line included: a header it gave up on is
        // too large even where the proxy's own limit is higher.
        let mut over = HeadScan::default();
        over.feed(b"GET /a HTTP/1.1\r\nX-Big: ");
        over.feed(&vec![b'v'; PINGORA_MAX_HEADER]);
        assert_eq!(over.refusal(&wide), errors::HEADERS_TOO_LARGE);
        // Nothing read: a plain 400.
        assert_eq!(HeadScan::default().refusal(&l), errors::BAD_REQUEST);
    }

    #[test]
    fn methods_are_labelled_and_head_is_told() {
        assert_eq!(scan_whole(b"GET / HTTP/1.1\r\n").method_label(), "GET");
        assert_eq!(scan_whole(b"DELETE /x").method_label(), "DELETE");
        assert_eq!(scan_whole(b"PROPFIND / HTTP/1.1").method_label(), "OTHER");
        assert_eq!(scan_whole(b"\x16\x03\x01\x02").method_label(), "OTHER");
        assert!(scan_whole(b"HEAD / HTTP/1.1\r\n").is_head());
        assert!(scan_whole(b"\r\n\nHEAD / HTTP/1.1\r\n").is_head());
        let mut dripped = HeadScan::default();
        for b in b"\r\nHE" {
            dripped.feed(std::slice::from_ref(b));
        }
        dripped.feed(b"AD / HTTP/1.1\r\n");
        assert!(dripped.is_head());
        assert!(!scan_whole(b"HEADER / HTTP/1.1\r\n").is_head());
        assert!(!scan_whole(b"GET / HTTP/1.1\r\n").is_head());
    }
}
