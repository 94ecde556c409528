//! Route matching (SPEC §3): a segment trie from path patterns to route indexes. Pure: it knows
//! patterns, segments and methods, nothing about backends, files or requests.
//!
//! Precedence falls out of the walk order: at each segment the literal child is tried before the
//! `{param}` child (a literal beats a parameter), deeper nodes are tried before the routes that
//! end at the current node (more segments beat fewer), and among the routes ending at one node a
//! route whose `methods` include the method beats one without `methods`. The cost of a lookup
//! depends on the depth of the path, never on the number of routes or their order in the file.

use std::collections::HashMap;

use crate::path::NormalPath;

/// One segment of a route's path pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PatternSegment {
    /// Matches exactly this segment (case-sensitive).
    Literal(String),
    /// `{name}`: matches any one non-empty segment.
    Param(String),
}

/// The most segments a route's path may have. Real APIs stay under a dozen; the bound keeps the
/// trie (whose nodes nest one level per segment, and are freed recursively) shallow whatever
/// the file says, so no routing file can exhaust a thread's stack.
pub const MAX_PATTERN_SEGMENTS: usize = 128;

/// Parses a route path (`/itineraries/{id}/itinerary_maps`) into segments. The caller has
/// already checked it starts with `/`; empty segments (`//`, trailing `/`) are ignored, as they
/// are in requests.
pub fn parse_pattern(path: &str) -> Result<Vec<PatternSegment>, String> {
    let mut out = Vec::new();
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        if out.len() == MAX_PATTERN_SEGMENTS {
            return Err(format!(
                "a route's path may have at most {MAX_PATTERN_SEGMENTS} segments"
            ));
        }
        if let Some(inner) = seg
            .strip_prefix('{')
            .filter(|i| i.ends_with('}') || !i.contains('}'))
        {
            let name = inner
                .strip_suffix('}')
                .ok_or_else(|| format!("segment {seg:?} opens '{{' but does not close it"))?;
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(format!(
                    "parameter {seg:?} must be {{name}} with letters, digits, '_' or '-'"
                ));
            }
            out.push(PatternSegment::Param(name.to_string()));
        } else if seg.contains(['{', '}']) {
            return Err(format!(
                "segment {seg:?}: a parameter must be a whole segment, like {{id}}"
            ));
        } else if seg == "." || seg == ".." {
            return Err(format!(
                "segment {seg:?} can never match: dot segments are refused"
            ));
        } else {
            out.push(PatternSegment::Literal(literal(seg)?));
        }
    }
    Ok(out)
}

/// A literal segment as requests are matched against it: in the form clients send. Requests are
/// matched after their unreserved escapes are decoded and with every other escape kept as
/// received (`path.rs`), so a literal writes unreserved characters plainly (`b`, not `%62`), and
/// a space or a non-ASCII character percent-encoded with upper-case hex (`caf%C3%A9`, what
/// browsers and HTTP libraries send: a raw one could never match them).
fn literal(seg: &str) -> Result<String, String> {
    let b = seg.as_bytes();
    let mut out = String::with_capacity(seg.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%' {
            let hex = |d: Option<&u8>| d.and_then(|d| (*d as char).to_digit(16));
            let (Some(hi), Some(lo)) = (hex(b.get(i + 1)), hex(b.get(i + 2))) else {
                return Err(format!(
                    "segment {seg:?}: '%' must start an escape of two hex digits"
                ));
            };
            let v = (hi * 16 + lo) as u8;
            if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') {
                return Err(format!(
                    "segment {seg:?}: write {:?} instead of {:?}: requests are matched with it decoded",
                    v as char,
                    &seg[i..i + 3]
                ));
            }
            if v.is_ascii_control() || v == b'\\' {
                return Err(format!(
                    "segment {seg:?}: an escaped control character or backslash is refused in requests, so it can never match"
                ));
            }
            out.push('%');
            out.push_str(&seg[i + 1..i + 3].to_ascii_uppercase());
            i += 3;
        } else if c.is_ascii_control() || matches!(c, b'\\' | b'?' | b'#') {
            return Err(format!(
                "segment {seg:?}: '?', '#', '\\\\' and control characters cannot be part of a path"
            ));
        } else if c == b' ' || !c.is_ascii() {
            let encoded: String = seg
                .bytes()
                .map(|c| {
                    if c == b' ' || !c.is_ascii() {
                        format!("%{c:02X}")
                    } else {
                        (c as char).to_string()
                    }
                })
                .collect();
            return Err(format!(
                "segment {seg:?}: clients send spaces and non-ASCII characters percent-encoded; write {encoded:?}"
            ));
        } else {
            out.push(c as char);
            i += 1;
        }
    }
    Ok(out)
}

/// What a route asks of a request besides its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constraint {
    /// The request must have exactly as many segments as the pattern.
    pub exact: bool,
    /// Methods (upper-case) the route serves; `None` for every method.
    pub methods: Option<Vec<String>>,
}

impl Constraint {
    /// Whether two routes with the same pattern would compete for a request. `exact` does not
    /// tell them apart: SPEC §2 refuses two routes with the same path pattern and overlapping
    /// methods, and `exact` is not part of the pattern.
    fn overlaps(&self, other: &Constraint) -> bool {
        match (&self.methods, &other.methods) {
            (None, None) => true,
            (Some(a), Some(b)) => a.iter().any(|m| b.contains(m)),
            // One with methods and one without coexist: the one with methods wins for its methods.
            _ => false,
        }
    }
}

#[derive(Debug)]
struct Entry {
    route: usize,
    constraint: Constraint,
}

#[derive(Debug, Default)]
struct Node {
    /// Keyed with aHash, randomly seeded (once per trie) as std's SipHash is (no chosen
    /// collisions), and quicker on the one request segment a lookup hashes per level: lookups
    /// 14–20 % faster (BENCHMARKS.md, fourth session).
    literals: HashMap<Box<str>, Node, ahash::RandomState>,
    param: Option<Box<Node>>,
    /// Routes whose pattern ends at this node, in insertion order (order never decides).
    here: Vec<Entry>,
}

impl Node {
    /// An empty node whose map is keyed with the trie's seed.
    fn new(hasher: &ahash::RandomState) -> Node {
        Node {
            literals: HashMap::with_hasher(hasher.clone()),
            param: None,
            here: Vec::new(),
        }
    }
}

/// Two routes that can never be told apart: same pattern (parameter names aside), overlapping
/// methods (`exact` or not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conflict {
    /// The route already in the trie.
    pub existing: usize,
    /// Whether that route is `exact` (so a message can say which of the two are).
    pub existing_exact: bool,
    /// The route being inserted.
    pub new: usize,
}

/// The segment trie. Built once per table, then shared read-only by every request.
#[derive(Debug, Default)]
pub struct RouteTrie {
    root: Node,
    len: usize,
    /// One random seed per trie, cloned into each node's map: seeding every node afresh was
    /// 7 % of a 10 000-route build (BENCHMARKS.md, twenty-second session).
    hasher: ahash::RandomState,
}

impl RouteTrie {
    /// Adds route `route` under `pattern`, refusing one that conflicts with a route already added.
    pub fn insert(
        &mut self,
        pattern: &[PatternSegment],
        constraint: Constraint,
        route: usize,
    ) -> Result<(), Conflict> {
        let hasher = &self.hasher;
        let mut node = &mut self.root;
        for seg in pattern {
            node = match seg {
                PatternSegment::Literal(s) => {
                    // Look up before inserting: most segments of a big table already exist, and
                    // `entry` would allocate the key every time.
                    if !node.literals.contains_key(s.as_str()) {
                        node.literals.insert(s.as_str().into(), Node::new(hasher));
                    }
                    node.literals.get_mut(s.as_str()).expect("inserted above")
                }
                PatternSegment::Param(_) => node
                    .param
                    .get_or_insert_with(|| Box::new(Node::new(hasher))),
            };
        }
        if let Some(e) = node
            .here
            .iter()
            .find(|e| e.constraint.overlaps(&constraint))
        {
            return Err(Conflict {
                existing: e.route,
                existing_exact: e.constraint.exact,
                new: route,
            });
        }
        node.here.push(Entry { route, constraint });
        self.len += 1;
        Ok(())
    }

    /// Number of routes in the trie.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the trie holds no route.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most specific route for this normalised path and method, if any.
    pub fn lookup(&self, path: &NormalPath, method: &str) -> Option<usize> {
        walk(&self.root, path, 0, method)
    }
}

fn walk(node: &Node, path: &NormalPath, i: usize, method: &str) -> Option<usize> {
    if i < path.len() {
        let seg = path.segment(i);
        let child = node.literals.get(seg).or_else(|| {
            // Escapes are written with upper-case hex in a route; a client's `%2f` is the same
            // byte (RFC 3986 §6.2.2.1). Rare: only a missed segment with a lower-case escape
            // is copied.
            upper_hex_escapes(seg).and_then(|s| node.literals.get(s.as_str()))
        });
        if let Some(child) = child {
            if let Some(r) = walk(child, path, i + 1, method) {
                return Some(r);
            }
        }
        if let Some(child) = &node.param {
            if let Some(r) = walk(child, path, i + 1, method) {
                return Some(r);
            }
        }
    }
    pick(&node.here, i == path.len(), method)
}

/// `seg` with its escapes' hex digits in upper case, when one of them is in lower case.
fn upper_hex_escapes(seg: &str) -> Option<String> {
    let b = seg.as_bytes();
    let lower_at = |i: usize| b.get(i).is_some_and(|c| matches!(c, b'a'..=b'f'));
    let has_lower = b
        .iter()
        .enumerate()
        .any(|(i, &c)| c == b'%' && (lower_at(i + 1) || lower_at(i + 2)));
    if !has_lower {
        return None;
    }
    let mut out = b.to_vec();
    let mut i = 0;
    while i < out.len() {
        if out[i] == b'%' {
            for d in out.iter_mut().skip(i + 1).take(2) {
                d.make_ascii_uppercase();
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    // Only ASCII letters changed case: still UTF-8.
    String::from_utf8(out).ok()
}

/// Among the routes ending at one node: methods that name the request's method beat no
/// `methods`. At most one route of each kind can match (the others conflict at build time).
fn pick(here: &[Entry], at_end: bool, method: &str) -> Option<usize> {
    let mut without_methods = None;
    for e in here.iter().filter(|e| at_end || !e.constraint.exact) {
        match &e.constraint.methods {
            Some(ms) if ms.iter().any(|m| m == method) => return Some(e.route),
            Some(_) => {}
            None => without_methods = Some(e.route),
        }
    }
    without_methods
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (pattern, exact, methods) in file order; the route index is the position.
    type Spec<'a> = (&'a str, bool, Option<&'a [&'a str]>);

    fn build(routes: &[Spec]) -> RouteTrie {
        let mut t = RouteTrie::default();
        for (i, (p, exact, methods)) in routes.iter().enumerate() {
            let c = Constraint {
                exact: *exact,
                methods: methods.map(|m| m.iter().map(|s| s.to_string()).collect()),
            };
            t.insert(&parse_pattern(p).unwrap(), c, i).unwrap();
        }
        t
    }

    fn find(t: &RouteTrie, method: &str, path: &str) -> Option<usize> {
        let n = crate::path::normalize(path).unwrap();
        t.lookup(&n, method)
    }

    const TABLE: &[Spec] = &[
        ("/bookings", false, None), // 0
        (
            "/itineraries/{id}/itinerary_maps",
            false,
            Some(&["GET", "HEAD"]),
        ), // 1
        ("/itineraries", false, None), // 2
        ("/departures", true, None), // 3
        ("/a/{id}/x", false, None), // 4
        ("/a/b", false, None),      // 5
        ("/a", false, None),        // 6
        ("/tours/{id}", false, Some(&["POST"])), // 7
        ("/tours/{id}", false, None), // 8
        ("/tours/{id}", true, Some(&["GET"])), // 9
        ("/x/{p}/y", false, None),  // 10
        ("/x/lit", true, None),     // 11
        ("/esc/a%2fb", false, None), // 12
        ("/esc/caf%C3%a9", false, None), // 13
    ];

    #[test]
    fn matches_case_by_case() {
        let t = build(TABLE);
        let cases: &[(&str, &str, Option<usize>)] = &[
            ("GET", "/bookings", Some(0)),
            ("GET", "/bookings/", Some(0)),
            ("GET", "/bookings/42", Some(0)),
            ("POST", "/bookings/42/x", Some(0)),
            ("GET", "/bookingsX", None),
            ("GET", "/Bookings", None),
            ("GET", "//bookings", Some(0)),
            ("GET", "/%62ookings", Some(0)),
            ("GET", "/bookings%2F42", None),
            ("GET", "/bookings/a%2Fb", Some(0)),
            // a route's escapes match in either hex case, and only escapes change case
            ("GET", "/esc/a%2fb", Some(12)),
            ("GET", "/esc/a%2Fb", Some(12)),
            ("GET", "/esc/A%2fb", None),
            ("GET", "/esc/caf%c3%a9", Some(13)),
            ("GET", "/bookings?x=/itineraries", Some(0)),
            ("GET", "/itineraries/7/itinerary_maps", Some(1)),
            ("HEAD", "/itineraries/7/itinerary_maps/", Some(1)),
            ("POST", "/itineraries/7/itinerary_maps", Some(2)),
            ("GET", "/itineraries/7", Some(2)),
            ("GET", "/departures", Some(3)),
            ("GET", "/departures/", Some(3)),
            ("GET", "/departures/1", None),
            // literal beats param at the first differing segment, whatever the depth
            ("GET", "/a/b/x", Some(5)),
            ("GET", "/a/c/x", Some(4)),
            ("GET", "/a/c", Some(6)),
            ("GET", "/a", Some(6)),
            // methods beat no methods, exact or not
            ("POST", "/tours/1", Some(7)),
            ("GET", "/tours/1", Some(9)),
            ("GET", "/tours/1/more", Some(8)),
            ("POST", "/tours/1/more", Some(7)),
            ("GET", "/tours", None),
            // a failed literal branch falls back to the param branch
            ("GET", "/x/lit/y", Some(10)),
            ("GET", "/x/lit", Some(11)),
            ("GET", "/x/lit/z", None),
            ("GET", "/", None),
        ];
        for (m, p, want) in cases {
            assert_eq!(find(&t, m, p), *want, "{m} {p}");
        }
    }

    #[test]
    fn order_of_routes_never_decides() {
        let forward = build(TABLE);
        let reversed: Vec<Spec> = TABLE.iter().rev().cloned().collect();
        let backward = build(&reversed);
        let n = TABLE.len();
        for (m, p) in [
            ("GET", "/a/b/x"),
            ("GET", "/a/c/x"),
            ("POST", "/tours/1"),
            ("GET", "/tours/1"),
            ("GET", "/x/lit/y"),
            ("HEAD", "/itineraries/1/itinerary_maps"),
        ] {
            let a = find(&forward, m, p);
            let b = find(&backward, m, p).map(|i| n - 1 - i);
            assert_eq!(a, b, "{m} {p}");
        }
    }

    #[test]
    fn conflicts_are_refused() {
        let mut t = build(&[("/a/{id}", false, Some(&["GET", "PUT"]))]);
        let c = |methods: Option<&[&str]>, exact| Constraint {
            exact,
            methods: methods.map(|m| m.iter().map(|s| s.to_string()).collect()),
        };
        let p = parse_pattern("/a/{other}").unwrap();
        assert_eq!(
            t.insert(&p, c(Some(&["PUT"]), false), 1),
            Err(Conflict {
                existing: 0,
                existing_exact: false,
                new: 1
            })
        );
        assert!(t.insert(&p, c(Some(&["POST"]), false), 2).is_ok());
        assert!(t.insert(&p, c(None, false), 3).is_ok());
        assert!(t.insert(&p, c(None, false), 4).is_err());
        // `exact` is not part of the pattern: an exact twin conflicts like any other.
        assert!(matches!(
            t.insert(&p, c(None, true), 5),
            Err(Conflict {
                existing: 3,
                existing_exact: false,
                new: 5
            })
        ));
        assert!(t.insert(&p, c(Some(&["PUT"]), true), 6).is_err());
        assert!(t.insert(&p, c(Some(&["DELETE"]), true), 7).is_ok());
    }

    #[test]
    fn patterns_are_checked() {
        assert_eq!(
            parse_pattern("/a/{id}/b/").unwrap(),
            vec![
                PatternSegment::Literal("a".into()),
                PatternSegment::Param("id".into()),
                PatternSegment::Literal("b".into())
            ]
        );
        for bad in [
            "/a/{id",
            "/a/x{id}",
            "/a/{}",
            "/a/..",
            "/a/%41",
            "/a/{i.d}",
            "/a/{i d}",
            "/a/%4",
            "/a/%00",
            "/a/%5C",
            "/a b",
            "/caf\u{e9}",
            "/a\\b",
        ] {
            assert!(parse_pattern(bad).is_err(), "{bad}");
        }
        // Names as OpenAPI writes them: snake_case, camelCase, kebab-case.
        for good in ["/a/{booking_id}", "/a/{bookingId}", "/a/{booking-id}"] {
            assert!(parse_pattern(good).is_ok(), "{good}");
        }
        assert!(parse_pattern("/a/{id}x")
            .unwrap_err()
            .contains("a whole segment"));
        assert!(parse_pattern("/a/{id")
            .unwrap_err()
            .contains("does not close"));
        // Written as clients send them: escapes kept, hex in upper case.
        assert_eq!(
            parse_pattern("/caf%c3%A9/a%20b/x%2Fy").unwrap(),
            vec![
                PatternSegment::Literal("caf%C3%A9".into()),
                PatternSegment::Literal("a%20b".into()),
                PatternSegment::Literal("x%2Fy".into())
            ]
        );
        // ... and a request in that form matches them.
        let t = build(&[("/caf%c3%a9", false, None)]);
        assert_eq!(find(&t, "GET", "/caf%C3%A9/1"), Some(0));
        let err = parse_pattern("/caf\u{e9}").unwrap_err();
        assert!(err.contains("write \"caf%C3%A9\""), "{err}");
    }

    #[test]
    fn deep_paths_beyond_the_inline_buffer() {
        let t = build(&[("/a", false, None)]);
        let long = format!("/a{}", "/x".repeat(40));
        assert_eq!(find(&t, "GET", &long), Some(0));
    }

    #[test]
    fn patterns_are_bounded_in_depth() {
        let at_limit = "/a".repeat(MAX_PATTERN_SEGMENTS);
        let t = build(&[(&at_limit, false, None)]);
        assert_eq!(find(&t, "GET", &format!("{at_limit}/b")), Some(0));
        // Empty segments do not count; one real segment more is refused.
        assert!(parse_pattern(&format!("{at_limit}//")).is_ok());
        let err = parse_pattern(&format!("{at_limit}/a")).unwrap_err();
        assert!(err.contains("at most 128 segments"), "{err}");
        // What a file of 20 000 segments used to get through to (a trie whose drop overflowed
        // the reloader's stack): refused at the limit, whatever the length.
        assert!(parse_pattern(&"/a".repeat(20_000)).is_err());
    }
}
