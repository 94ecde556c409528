//! Properties (issue 6) of the pure parts: matching does not depend on the order of routes and
//! agrees with the spec's precedence rules; normalisation is idempotent; a split only ever
//! moves clients to `to` as its percentage grows.

use proptest::prelude::*;
use proptest::test_runner::Config;

use strangler::path::normalize;
use strangler::router::RoutingTable;
use strangler::split::{bucket, decide, goes_to_target, BUCKETS};

// ---------------------------------------------------------------------------------------------
// Route tables
// ---------------------------------------------------------------------------------------------

/// One generated route.
#[derive(Debug, Clone)]
struct GenRoute {
    name: String,
    segments: Vec<&'static str>,
    exact: bool,
    methods: Option<Vec<&'static str>>,
    to: &'static str,
}

impl GenRoute {
    fn path(&self) -> String {
        if self.segments.is_empty() {
            "/".to_string()
        } else {
            format!("/{}", self.segments.join("/"))
        }
    }
}

const LITERALS: [&str; 3] = ["a", "b", "c"];

fn pattern_segment() -> impl Strategy<Value = &'static str> {
    // Mostly `{id}`, sometimes `{x}`: `/a/{id}` and `/a/{x}` are the same pattern and must
    // conflict whatever the order.
    prop_oneof![
        3 => prop::sample::select(LITERALS.to_vec()),
        2 => Just("{id}"),
        1 => Just("{x}"),
    ]
}

fn gen_route() -> impl Strategy<Value = (Vec<&'static str>, bool, Option<Vec<&'static str>>, bool)>
{
    (
        prop::collection::vec(pattern_segment(), 0..=3),
        prop::bool::weighted(0.25),
        prop::option::weighted(
            0.4,
            prop::sample::subsequence(vec!["GET", "POST", "DELETE"], 1..=2),
        ),
        any::<bool>(),
    )
}

/// A table of 1..10 routes with unique path strings and names, plus the same routes shuffled.
fn tables() -> impl Strategy<Value = (Vec<GenRoute>, Vec<GenRoute>)> {
    prop::collection::vec(gen_route(), 1..10)
        .prop_map(|raw| {
            let mut seen = std::collections::HashSet::new();
            raw.into_iter()
                .filter(|(segs, exact, methods, _)| {
                    seen.insert((segs.clone(), *exact, methods.clone()))
                })
                .enumerate()
                .map(|(i, (segments, exact, methods, new))| GenRoute {
                    name: format!("r{i}"),
                    segments,
                    exact,
                    methods,
                    to: if new { "new" } else { "legacy" },
                })
                .collect::<Vec<_>>()
        })
        .prop_flat_map(|routes| {
            let shuffled = Just(routes.clone()).prop_shuffle();
            (Just(routes), shuffled)
        })
}

fn yaml(routes: &[GenRoute]) -> String {
    let mut y = String::from(
        "backends:\n  legacy: {url: 'http://127.0.0.1:1'}\n  new: {url: 'http://127.0.0.1:2'}\ndefault: legacy\nroutes:\n",
    );
    for r in routes {
        y.push_str(&format!(
            "  - name: {}\n    path: '{}'\n    to: {}\n",
            r.name,
            r.path(),
            r.to
        ));
        if r.exact {
            y.push_str("    exact: true\n");
        }
        if let Some(ms) = &r.methods {
            y.push_str(&format!("    methods: [{}]\n", ms.join(", ")));
        }
    }
    y
}

fn build(routes: &[GenRoute]) -> Result<RoutingTable, String> {
    let text = yaml(routes);
    let (file, source) =
        strangler::config::parse("routing.yaml", &text).map_err(|e| format!("parse: {e}"))?;
    RoutingTable::build(file, &source).map_err(|e| e.to_string())
}

/// The route name a table gives a request, or "default".
fn route_of(table: &RoutingTable, target: &str, method: &str) -> String {
    let path = normalize(target).unwrap_or_else(|e| panic!("{target}: {e}"));
    match table.lookup(&path, method) {
        Some(i) => table.routes[i].name.to_string(),
        None => "default".to_string(),
    }
}

/// SPEC §3 written out directly: among the routes that match, compare segment by segment from
/// the left (a literal beats `{param}`; more segments beat fewer), then `methods` beats none.
/// (`exact` never decides: an exact route and a prefix route with the same pattern and
/// overlapping methods are refused like any two such routes.)
fn spec_model(routes: &[GenRoute], segs: &[&str], method: &str) -> String {
    // (segment ranks, has methods) of the best route so far, and its name.
    type Key = (Vec<u8>, u8);
    let mut best: Option<(Key, &str)> = None;
    for r in routes {
        if r.segments.len() > segs.len() || (r.exact && r.segments.len() != segs.len()) {
            continue;
        }
        let matches = r
            .segments
            .iter()
            .zip(segs)
            .all(|(p, s)| p.starts_with('{') || p == s);
        if !matches {
            continue;
        }
        if let Some(ms) = &r.methods {
            if !ms.contains(&method) {
                continue;
            }
        }
        let key = (
            r.segments
                .iter()
                .map(|p| if p.starts_with('{') { 1u8 } else { 2u8 })
                .collect::<Vec<u8>>(),
            u8::from(r.methods.is_some()),
        );
        if best.as_ref().is_none_or(|(k, _)| key > *k) {
            best = Some((key, &r.name));
        }
    }
    best.map_or_else(|| "default".to_string(), |(_, n)| n.to_string())
}

fn request_paths() -> impl Strategy<Value = Vec<(Vec<&'static str>, bool, &'static str)>> {
    prop::collection::vec(
        (
            prop::collection::vec(
                prop::sample::select(vec!["a", "b", "c", "d", "a%2Fb"]),
                0..5,
            ),
            any::<bool>(),
            prop::sample::select(vec!["GET", "POST", "DELETE", "PUT"]),
        ),
        1..24,
    )
}

fn target_of(segs: &[&str], trailing: bool) -> String {
    let mut t = format!("/{}", segs.join("/"));
    if trailing && !segs.is_empty() {
        t.push('/');
    }
    t
}

fn config() -> Config {
    Config {
        cases: 256,
        failure_persistence: None,
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// The outcome never depends on the order of routes in the file: the same routes in another
    /// order build (or fail to build) alike and give every request the same route.
    #[test]
    fn matching_is_independent_of_route_order((routes, shuffled) in tables(), reqs in request_paths()) {
        let a = build(&routes);
        let b = build(&shuffled);
        match (&a, &b) {
            (Ok(a), Ok(b)) => {
                for (segs, trailing, method) in &reqs {
                    let t = target_of(segs, *trailing);
                    prop_assert_eq!(
                        route_of(a, &t, method),
                        route_of(b, &t, method),
                        "{} {} with\n{}\nand\n{}", method, t, yaml(&routes), yaml(&shuffled)
                    );
                }
            }
            (Err(_), Err(_)) => {}
            _ => prop_assert!(
                false,
                "one order builds, the other does not:\n{}\n=> {:?}\n{}\n=> {:?}",
                yaml(&routes), a.as_ref().err(), yaml(&shuffled), b.as_ref().err()
            ),
        }
    }

    /// The trie agrees with the precedence rules of SPEC §3 spelled out as a brute-force search.
    #[test]
    fn matching_agrees_with_the_spec_precedence((routes, _) in tables(), reqs in request_paths()) {
        // Only tables without two spellings of one pattern (those are refused: see above).
        let Ok(table) = build(&routes) else { return Ok(()); };
        for (segs, trailing, method) in &reqs {
            let t = target_of(segs, *trailing);
            prop_assert_eq!(
                route_of(&table, &t, method),
                spec_model(&routes, segs, method),
                "{} {} with\n{}", method, t, yaml(&routes)
            );
        }
    }

    /// A table refuses two spellings of one pattern (`{id}` vs `{x}`) with overlapping methods,
    /// `exact` or not, and accepts every table without them.
    #[test]
    fn conflicts_are_exactly_the_indistinguishable_routes((routes, _) in tables()) {
        let shape = |r: &GenRoute| {
            r.segments.iter().map(|s| if s.starts_with('{') { "{}" } else { s }).collect::<Vec<_>>()
        };
        let overlap = |a: &GenRoute, b: &GenRoute| match (&a.methods, &b.methods) {
            (None, None) => true,
            (Some(x), Some(y)) => x.iter().any(|m| y.contains(m)),
            _ => false,
        };
        let conflict = routes.iter().enumerate().any(|(i, a)| {
            routes[i + 1..].iter().any(|b| shape(a) == shape(b) && overlap(a, b))
        });
        let built = build(&routes);
        prop_assert_eq!(built.is_err(), conflict, "{}\n=> {:?}", yaml(&routes), built.err());
    }
}

// ---------------------------------------------------------------------------------------------
// Normalisation
// ---------------------------------------------------------------------------------------------

fn target_strategy() -> impl Strategy<Value = String> {
    let token = prop::sample::select(vec![
        "/",
        "//",
        "a",
        "b",
        "bookings",
        "42",
        "%2F",
        "%2f",
        "%62",
        "%41",
        "%2e",
        "%2E",
        ".",
        "..",
        "...",
        ".a",
        "%25",
        "%7E",
        "%7e",
        "~",
        "-",
        "_",
        "\u{e9}",
        "\u{1F600}",
        "%zz",
        "%",
        "%4",
        "?",
        "x=1",
        "&",
        "#",
        "%00",
        "%0A",
        "\\",
        "%5C",
        " ",
        "%20",
        "%C3%A9",
        "+",
        ";",
        "=",
        ":",
        "@",
        "!",
        "$",
        "'",
        "(",
        "*",
        ",",
    ]);
    prop_oneof![
        4 => prop::collection::vec(token.clone(), 0..12).prop_map(|t| format!("/{}", t.concat())),
        1 => prop::collection::vec(token, 0..12).prop_map(|t| t.concat()),
        1 => any::<String>().prop_map(|s| format!("/{s}")),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// normalize(normalize(x).path()) == normalize(x): the path that is matched and forwarded
    /// is a fixed point, so a backend normalising again agrees with the proxy.
    #[test]
    fn normalisation_is_idempotent(target in target_strategy()) {
        if let Ok(once) = normalize(&target) {
            let path = once.path();
            prop_assert!(path.starts_with('/'), "{:?} -> {:?}", target, path);
            prop_assert!(!path.contains("//"), "{:?} -> {:?}", target, path);
            let twice = normalize(path);
            prop_assert!(twice.is_ok(), "{:?} -> {:?} -> {:?}", target, path, twice);
            let twice = twice.unwrap();
            prop_assert_eq!(twice.path(), path, "from {:?}", target);
            prop_assert_eq!(
                twice.segments().collect::<Vec<_>>(),
                once.segments().collect::<Vec<_>>()
            );
            prop_assert_eq!(twice.trailing_slash(), once.trailing_slash());
            // The query is kept byte for byte.
            prop_assert_eq!(once.query(), target.split_once('?').map(|(_, q)| q));
            prop_assert!(twice.query().is_none());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Split
// ---------------------------------------------------------------------------------------------

/// SPEC §5: the buckets below `split × 100`, the split taken to millionths of a percent (so what
/// floating point adds below that does not count: `0.07 × 100` is 7). `m / 10⁴` is exact when it
/// is whole and at least 10⁻⁴ from a whole number otherwise, so `ceil` is exact too.
fn threshold(p: f64) -> u32 {
    ((p * 1e6).round() / 1e4).ceil().max(0.0) as u32
}

/// Percentages as operators write them: whole, one or two decimals, and the ends.
fn percent() -> impl Strategy<Value = f64> {
    prop_oneof![
        (0u32..=100).prop_map(f64::from),
        (0u32..=10_000).prop_map(|c| f64::from(c) / 100.0),
        0.0f64..=100.0,
        Just(0.0),
        Just(100.0),
    ]
}

fn split_table(route: &str, p: f64) -> RoutingTable {
    let text = format!(
        "backends:\n  legacy: {{url: 'http://127.0.0.1:1'}}\n  new: {{url: 'http://127.0.0.1:2'}}\ndefault: legacy\nroutes:\n  - {{name: '{route}', path: /tours, to: new, split: {p:?}}}\n"
    );
    let (file, source) = strangler::config::parse("routing.yaml", &text).unwrap();
    RoutingTable::build(file, &source).unwrap_or_else(|e| panic!("{text}: {e}"))
}

proptest! {
    #![proptest_config(config())]

    /// Raising a split only ever moves clients from `default` to `to`: in `to` at p1 implies in
    /// `to` at every p2 > p1. Checked on the thresholds the table itself computes.
    #[test]
    fn split_is_monotonic_in_the_percentage(
        route in "[a-z][a-z0-9_-]{0,11}",
        keys in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 1..16),
        a in percent(),
        b in percent(),
    ) {
        let (p1, p2) = if a <= b { (a, b) } else { (b, a) };
        let t1 = split_table(&route, p1).routes[0].split.as_ref().unwrap().threshold;
        let t2 = split_table(&route, p2).routes[0].split.as_ref().unwrap().threshold;
        prop_assert_eq!(t1, threshold(p1), "split {}", p1);
        prop_assert_eq!(t2, threshold(p2), "split {}", p2);
        prop_assert!(t1 <= t2);
        for key in &keys {
            let bk = bucket(&route, key);
            prop_assert!(bk < BUCKETS);
            prop_assert_eq!(bk, bucket(&route, key), "stable");
            if goes_to_target(bk, t1) {
                prop_assert!(goes_to_target(bk, t2), "key {:?} left `to` when the split grew from {} to {}", key, p1, p2);
            }
            // The request-path decision is the same function of the bucket.
            let table = split_table(&route, p1);
            let split = table.routes[0].split.as_ref().unwrap();
            prop_assert_eq!(decide(&route, split, Some(key)), goes_to_target(bk, t1));
        }
        // The ends: 0 % sends nobody, 100 % everybody.
        prop_assert!(!goes_to_target(0, threshold(0.0)));
        prop_assert!(goes_to_target(BUCKETS - 1, threshold(100.0)));
    }
}

// ---------------------------------------------------------------------------------------------
// Broken files
// ---------------------------------------------------------------------------------------------

/// The sample file, broken by a few line edits: a line taken out, written twice, indented,
/// or its value replaced by one of the kind a hurried edit leaves.
fn broken_sample() -> impl Strategy<Value = String> {
    const VALUES: [&str; 10] = [
        "",
        "[1]",
        "nope",
        "-5",
        "{}",
        "200",
        "/x/{id}",
        "http://a..b",
        "5 parsecs",
        "{a: 1, a: 2}",
    ];
    let edits = prop::collection::vec(
        (0..4u8, any::<prop::sample::Index>(), 0..VALUES.len()),
        1..6,
    );
    edits.prop_map(|edits| {
        let mut lines: Vec<String> = include_str!("../routing.yaml")
            .lines()
            .map(String::from)
            .collect();
        for (op, at, value) in edits {
            let i = at.index(lines.len());
            match op {
                0 => {
                    lines.remove(i);
                }
                1 => lines.insert(i, lines[i].clone()),
                2 => {
                    if let Some((key, _)) = lines[i].split_once(": ") {
                        lines[i] = format!("{key}: {}", VALUES[value]);
                    }
                }
                _ => lines[i] = format!("  {}", lines[i]),
            }
        }
        lines.join("\n") + "\n"
    })
}

proptest! {
    #![proptest_config(config())]

    /// A broken file is refused with errors that point into it, never a panic; `check` lists
    /// at least what the schema pass alone finds (setting faults aside to check the rest of the
    /// file loses none of them).
    #[test]
    fn a_broken_file_gets_errors_that_point_into_it(text in broken_sample()) {
        use strangler::config::{parse, parse_checked};
        let lines = text.lines().count().max(1);
        let checked = RoutingTable::build_checked(parse_checked("r.yaml", text.clone()));
        let Err(errors) = checked else { return Ok(()) };
        prop_assert!(!errors.0.is_empty());
        for e in &errors.0 {
            prop_assert!((1..=lines).contains(&e.pos.line) && e.pos.col >= 1, "{} in\n{}", e, text);
        }
        if let Err(schema) = parse("r.yaml", text.clone()) {
            for e in &schema.0 {
                prop_assert!(
                    errors.0.iter().any(|c| c.message == e.message),
                    "{} missing from {} in\n{}", e, errors, text
                );
            }
        }
    }
}
