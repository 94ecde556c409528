//! What `routing.yaml` says (SPEC §2): the serde schema of the file, read with unknown keys
//! refused, and the errors that point at `FILE:LINE:COL`. This module only reads; turning the
//! file into the table that requests use (and every cross-field check) is `router.rs`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use serde::Deserialize;

use crate::source_map::{join, line_count, Pos, SourceMap};

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingFile {
    #[serde(deserialize_with = "unique_names")]
    pub backends: BTreeMap<String, BackendSpec>,
    /// The backend that serves every request no route matches. Required: there is no implicit
    /// default, because guessing which service answers is exactly what this file must not do.
    pub default: Option<String>,
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    /// Peers (IPs or CIDRs) whose `X-Forwarded-For` is believed when picking a split's sticky
    /// `ip` key. Empty by default: the TCP peer address is the client.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
}

/// `backends` as a map whose names are unique: YAML leaves a repeated key to the reader, and a
/// plain map would keep the last one without a word.
fn unique_names<'de, D>(de: D) -> Result<BTreeMap<String, BackendSpec>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Names;
    impl<'de> serde::de::Visitor<'de> for Names {
        type Value = BTreeMap<String, BackendSpec>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map of backend names to backends")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some(name) = map.next_key::<String>()? {
                if out.contains_key(&name) {
                    return Err(serde::de::Error::custom(format!(
                        "backend {name:?} is defined twice"
                    )));
                }
                let spec = map.next_value()?;
                out.insert(name, spec);
            }
            Ok(out)
        }
    }
    de.deserialize_map(Names)
}

/// `backends.NAME`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    pub url: String,
    #[serde(default)]
    pub trailing_slash: TrailingSlash,
    pub host: Option<String>,
    pub connect_timeout: Option<String>,
    pub timeout: Option<String>,
}

/// What a backend wants done with a trailing slash on the paths sent to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrailingSlash {
    /// Sent as the client wrote it.
    #[default]
    Keep,
    /// Always ends with `/` (Django's APPEND_SLASH wants this: it cannot redirect a POST).
    Add,
    /// Never ends with `/` (except the root).
    Strip,
}

/// One entry of `routes`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub name: Option<String>,
    pub path: String,
    pub methods: Option<Vec<String>>,
    pub to: String,
    #[serde(default)]
    pub exact: bool,
    /// Percent: `10`, `12.5` or `10%`.
    pub split: Option<PercentSpec>,
    pub sticky: Option<String>,
    pub shadow: Option<String>,
    #[serde(default)]
    pub shadow_ignore: Vec<String>,
    #[serde(default)]
    pub failover: bool,
    pub rewrite: Option<String>,
    pub rollback: Option<RollbackSpec>,
}

/// `routes[].rollback`: when to pin a route back to `default` by itself.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackSpec {
    pub error_rate: PercentSpec,
    pub min_requests: u64,
    pub window: String,
}

/// A percentage as written: `5%`, or a bare number meaning percent.
#[derive(Debug, Clone)]
pub enum PercentSpec {
    Number(f64),
    Text(String),
}

impl<'de> Deserialize<'de> for PercentSpec {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct Percent;
        impl serde::de::Visitor<'_> for Percent {
            type Value = PercentSpec;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a percentage like 5% or 12.5")
            }
            fn visit_f64<E>(self, v: f64) -> Result<PercentSpec, E> {
                Ok(PercentSpec::Number(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<PercentSpec, E> {
                Ok(PercentSpec::Number(v as f64))
            }
            fn visit_u64<E>(self, v: u64) -> Result<PercentSpec, E> {
                Ok(PercentSpec::Number(v as f64))
            }
            fn visit_str<E>(self, v: &str) -> Result<PercentSpec, E> {
                Ok(PercentSpec::Text(v.to_string()))
            }
        }
        de.deserialize_any(Percent)
    }
}

/// One error in a routing file, with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub pos: Pos,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.pos.line, self.pos.col, self.message
        )
    }
}

/// Every error found in one file; displayed one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A file read and parsed, with what is needed to report on it later.
#[derive(Debug)]
pub struct Source {
    /// The name used in error messages: the path as given.
    pub file: String,
    /// The text, kept to locate errors: the position index is built only when there is an
    /// error to report, so a valid file is parsed once.
    text: String,
    map: OnceLock<SourceMap>,
    /// Hex SHA-256 of the bytes read: the audit trail names the config by it.
    pub sha256: String,
}

impl Source {
    /// The position of the value at `path` (`routes.3.to`).
    pub fn pos(&self, path: &str) -> Pos {
        self.map
            .get_or_init(|| SourceMap::new(&self.text))
            .pos(path)
    }

    /// An error at the key of `path` (the name of `backends.NAME`).
    pub fn error_at_key(&self, path: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            pos: self
                .map
                .get_or_init(|| SourceMap::new(&self.text))
                .key_pos(path),
            message: message.into(),
        }
    }

    /// An error about the file as a whole (something missing): at its start.
    pub fn error_at_start(&self, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            pos: Pos { line: 1, col: 1 },
            message: message.into(),
        }
    }

    /// An error at the value of `path` (`routes.3.to`).
    pub fn error_at(&self, path: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            pos: self.pos(path),
            message: message.into(),
        }
    }
}

/// The UTF-8 byte-order mark.
pub const BOM: &str = "\u{feff}";

/// A file that does not read as a routing file: its errors and, when each of them is a key that
/// can be taken out (an unknown key, or an optional key of a route or a backend holding a value
/// of the wrong type), the file read without those keys, so that the semantic checks (undefined
/// backends, ranges, conflicts) can report on the rest in the same run: `check` lists every
/// error, not the schema's first and the others on the next try.
#[derive(Debug)]
pub struct Unread {
    pub errors: ConfigErrors,
    pub without_faulty_keys: Option<Box<(RoutingFile, Source)>>,
}

/// Reads and parses `path` (see [`parse`]), keeping what can still be checked of a file with
/// faulty keys ([`Unread`]).
pub fn read_checked(path: &Path) -> Result<(RoutingFile, Source), Unread> {
    let bytes = std::fs::read(path).map_err(|e| unreadable(path, e))?;
    let sha256 = sha256_hex(&bytes);
    bytes_checked(path, bytes, sha256)
}

/// [`read_checked`] on bytes already read from `path` and their [`sha256_hex`] (the reload
/// loop reads the file once, to hash it, and loads the very bytes it hashed).
pub fn bytes_checked(
    path: &Path,
    bytes: Vec<u8>,
    sha256: String,
) -> Result<(RoutingFile, Source), Unread> {
    // Worded as `read_to_string` words it.
    let text = String::from_utf8(bytes)
        .map_err(|_| unreadable(path, "stream did not contain valid UTF-8"))?;
    parse_checked_digested(&path.display().to_string(), text, Some(sha256))
}

/// A file that could not be read (or is not text), reported at its start.
fn unreadable(path: &Path, e: impl std::fmt::Display) -> Unread {
    Unread {
        errors: ConfigErrors(vec![ConfigError {
            file: path.display().to_string(),
            pos: Pos { line: 1, col: 1 },
            message: format!("cannot read: {e}"),
        }]),
        without_faulty_keys: None,
    }
}

/// `parse`, keeping what can still be checked of a file with faulty keys ([`Unread`]).
pub fn parse_checked(file: &str, text: impl Into<String>) -> Result<(RoutingFile, Source), Unread> {
    parse_checked_digested(file, text.into(), None)
}

/// `parse_checked` of `text`, whose digest is `sha256` when known.
fn parse_checked_digested(
    file: &str,
    text: String,
    sha256: Option<String>,
) -> Result<(RoutingFile, Source), Unread> {
    parse_text(file, text, sha256).map_err(|(errors, text)| {
        // Each key taken out costs a parse of the whole file (a reload of a 10 000-route file
        // with a typo must not hold the reloader for seconds): a few, not a file full.
        let removable = errors.0.len() <= MAX_KEYS_TAKEN_OUT
            && errors.0.iter().all(|e| fault(&e.message).is_some());
        let mut errors = errors;
        let without_faulty_keys = removable
            .then(|| without_faulty_keys(file, &text))
            .flatten()
            .map(Box::new);
        if without_faulty_keys.is_none() {
            // The semantic checks will not run: what the file lacks at its top is said here.
            missing_at_top(file, &text, &mut errors.0);
        }
        Unread {
            errors,
            without_faulty_keys,
        }
    })
}

/// The message for a file without `default` (a semantic check: serde reads it as optional).
pub const DEFAULT_MISSING: &str =
    "`default` is missing: name the backend that serves unmatched requests";

/// A file refused by its schema whose other parts cannot be checked still has every required
/// top-level key it lacks reported: serde names only the first thing it stops at, and a missing
/// `backends` or `default` would otherwise wait for the next run of `check`.
fn missing_at_top(file: &str, text: &str, errors: &mut Vec<ConfigError>) {
    let top = match lenient_value(text) {
        Some(serde_yaml::Value::Mapping(top)) => top,
        // A file of comments only, or empty.
        Some(serde_yaml::Value::Null) => serde_yaml::Mapping::new(),
        _ => return,
    };
    let mut add = |message: String| {
        if !errors.iter().any(|e| e.message == message) {
            errors.push(ConfigError {
                file: file.to_string(),
                pos: Pos { line: 1, col: 1 },
                message,
            });
        }
    };
    if !top.contains_key("backends") {
        add("missing field `backends`".into());
    }
    if top.get("default").is_none_or(serde_yaml::Value::is_null) {
        add(DEFAULT_MISSING.into());
    }
    errors.sort_by_key(|e| (e.pos.line, e.pos.col));
}

/// At most this many faulty keys are taken out to check the rest of a file.
const MAX_KEYS_TAKEN_OUT: usize = 16;

/// The key a schema error (as `schema_errors` words it) blames, when taking it out leaves a
/// file whose other parts can still be checked: the mapping it sits in (as path steps) and its
/// name. An unknown key anywhere; a value of the wrong type only below a route or a backend
/// (a top-level key, a whole route or a whole backend taken out would make the semantic checks
/// report it missing or undefined). A missing or duplicate key is not one.
fn faulty_key(message: &str) -> Option<(Vec<&str>, &str)> {
    let (inner, own) = split_serde_path(message);
    let inner = inner.unwrap_or("");
    let unknown = backticked(own, "unknown field `");
    // A backend's name may hold dots (`api.v2`): under `backends` the path is `backends.NAME`
    // for a key in that backend, `backends.NAME.KEY` for its value (backend keys hold none).
    let steps: Vec<&str> = match inner.strip_prefix("backends.") {
        Some(name) if unknown.is_some() => vec!["backends", name],
        Some(rest) => match rest.rsplit_once('.') {
            Some((name, key)) => vec!["backends", name, key],
            None => vec!["backends", rest],
        },
        None => inner
            .split(['.', '[', ']'])
            .filter(|s| !s.is_empty())
            .collect(),
    };
    if let Some(key) = unknown {
        return Some((steps, key));
    }
    if own.starts_with("missing field") {
        // Only a route's `rollback` has required keys of its own, and [`fault`] gives them
        // stand-ins before it asks here; what is left of it is taken out whole. A route's or
        // backend's own required key is [`Fault::RouteStandIn`]'s or
        // [`Fault::BackendStandIn`]'s.
        return (steps.len() == 3 && steps[0] == "routes").then(|| (steps[..2].to_vec(), steps[2]));
    }
    const WRONG: [&str; 4] = [
        "invalid type",
        "invalid value",
        "invalid length",
        "unknown variant",
    ];
    if !WRONG.iter().any(|w| own.starts_with(w)) {
        return None;
    }
    // A list element's fault is its list's: `methods[1]` takes `methods` out; a nested key's
    // is the route's or backend's key it sits in (a `rollback` key [`fault`] has no stand-in
    // for takes `rollback` out).
    let last_key = steps.iter().rposition(|s| s.parse::<usize>().is_err())?;
    let at = last_key.min(2);
    (last_key >= 2).then(|| (steps[..at].to_vec(), steps[at]))
}

/// What a schema error leaves to set aside before the rest of the file can be checked.
enum Fault<'a> {
    /// A key to take out ([`faulty_key`]): the mapping it sits in (as path steps), its name.
    Key(Vec<&'a str>, &'a str),
    /// A key written twice: the reader keeps the last, as YAML readers commonly do.
    Repeated,
    /// A route (its index) or a backend (its name) whose own required key is missing or of
    /// the wrong type, or which is not a mapping at all: what it means is not guessed at, but
    /// the routes and backends around it are still checked, with a stand-in in its place
    /// ([`route_stand_in`], [`backend_stand_in`]).
    RouteStandIn(&'a str),
    BackendStandIn(&'a str),
    /// A required key of route `.0`'s `rollback` block, missing or of the wrong type: a
    /// [`stand_in`] takes its place.
    RollbackStandIn(&'a str, &'a str),
}

/// The [`Fault`] behind a schema error (as `schema_errors` words it), if what is left can
/// still be checked.
fn fault(message: &str) -> Option<Fault<'_>> {
    let (inner, own) = split_serde_path(message);
    // A required key of a route's `rollback` block, missing or of the wrong type: a stand-in in
    // its place, so that the block's other keys are still checked.
    if let Some((i, rest)) = inner
        .and_then(|p| p.strip_prefix("routes["))
        .and_then(|r| r.split_once("].rollback"))
    {
        let key = match rest.strip_prefix('.') {
            Some(key) if own.starts_with("invalid type") || own.starts_with("invalid value") => {
                Some(key)
            }
            None if rest.is_empty() => backticked(own, "missing field `"),
            _ => None,
        };
        if let Some(key) = key.filter(|k| stand_in(Part::Rollback, k).is_some()) {
            return Some(Fault::RollbackStandIn(i, key));
        }
    }
    // A required key of the wrong type: the stand-in at once (taking the key out first would
    // cost a reading of the file more, and [`MAX_KEYS_TAKEN_OUT`] counts faults, not readings).
    if own.starts_with("invalid type") {
        let inner = inner.unwrap_or("");
        if let Some(i) = inner
            .strip_prefix("routes[")
            .and_then(|r| r.strip_suffix("].to").or_else(|| r.strip_suffix("].path")))
        {
            return Some(Fault::RouteStandIn(i));
        }
        if let Some(name) = inner
            .strip_prefix("backends.")
            .and_then(|r| r.strip_suffix(".url"))
        {
            return Some(Fault::BackendStandIn(name));
        }
    }
    if let Some((steps, key)) = faulty_key(message) {
        return Some(Fault::Key(steps, key));
    }
    if own.starts_with("duplicate field") || own.ends_with("is defined twice") {
        return Some(Fault::Repeated);
    }
    if !(own.starts_with("missing field") || own.starts_with("invalid type")) {
        return None;
    }
    let inner = inner?;
    if let Some(i) = inner
        .strip_prefix("routes[")
        .and_then(|r| r.strip_suffix(']'))
    {
        return Some(Fault::RouteStandIn(i));
    }
    inner.strip_prefix("backends.").map(Fault::BackendStandIn)
}

/// A route that can be checked in place of route `at`, whose required keys are faulty, and
/// that no check can find fault with: under that route's name if it has one, on a path of its
/// own, to the `default` backend (or the first one). `None` when the file names no backend.
fn route_stand_in(doc: &serde_yaml::Value, at: usize) -> Option<serde_yaml::Value> {
    use serde_yaml::{Mapping, Value};
    let backends = doc.get("backends")?.as_mapping()?;
    let to = doc
        .get("default")
        .and_then(Value::as_str)
        .filter(|d| backends.contains_key(*d))
        .or_else(|| backends.keys().find_map(Value::as_str))?;
    let mut m = Mapping::new();
    if let Some(name) = doc
        .get("routes")?
        .get(at)?
        .get("name")
        .and_then(Value::as_str)
    {
        m.insert("name".into(), name.into());
    }
    m.insert("path".into(), format!("/.stand-in-for-route-{at}").into());
    m.insert("to".into(), to.into());
    Some(Value::Mapping(m))
}

/// A backend in place of one whose `url` is faulty: at an address never resolved (`check`
/// resolves nothing), so that the routes sent to it are still checked.
fn backend_stand_in() -> serde_yaml::Value {
    let mut m = serde_yaml::Mapping::new();
    m.insert("url".into(), "http://stand-in.invalid:1".into());
    serde_yaml::Value::Mapping(m)
}

/// The file with every [`Fault`] set aside, read again. `text` is the file as `parse_text`
/// read it (without a byte-order mark); the source keeps it whole, so errors found in what is
/// left point into the file as written (setting faults aside moves no other node's path). Its
/// digest is never shown: the table built from it is only checked, never served. `None` when
/// something else stands in the way, such as a top-level key of the wrong type.
fn without_faulty_keys(file: &str, text: &str) -> Option<(RoutingFile, Source)> {
    use serde_yaml::Value;
    let mut doc = lenient_value(text)?;
    for _ in 0..=MAX_KEYS_TAKEN_OUT {
        let e = match serde_yaml::from_str::<RoutingFile>(&serde_yaml::to_string(&doc).ok()?) {
            Ok(parsed) => {
                let source = Source {
                    file: file.to_string(),
                    sha256: sha256_hex(text.as_bytes()),
                    text: text.to_string(),
                    map: OnceLock::new(),
                };
                return Some((parsed, source));
            }
            Err(e) => e,
        };
        let msg = clean_serde_message(&e.to_string());
        match fault(&msg)? {
            Fault::Key(steps, key) => {
                let mut node = &mut doc;
                for step in steps {
                    node = match node {
                        Value::Mapping(m) => m.get_mut(step)?,
                        Value::Sequence(v) => v.get_mut(step.parse::<usize>().ok()?)?,
                        _ => return None,
                    };
                }
                node.as_mapping_mut()?.remove(key)?;
            }
            // The lenient reading keeps one of each repeated key: no reading of it has any.
            Fault::Repeated => return None,
            Fault::RouteStandIn(i) => {
                let i: usize = i.parse().ok()?;
                let new = route_stand_in(&doc, i)?;
                *doc.get_mut("routes")?.get_mut(i)? = new;
            }
            Fault::BackendStandIn(name) => {
                *doc.get_mut("backends")?.get_mut(name)? = backend_stand_in();
            }
            Fault::RollbackStandIn(i, key) => {
                let i: usize = i.parse().ok()?;
                let block = doc.get_mut("routes")?.get_mut(i)?.get_mut("rollback")?;
                block
                    .as_mapping_mut()?
                    .insert(key.into(), stand_in(Part::Rollback, key)?);
            }
        }
    }
    None
}

/// The document as plain YAML, a key written twice keeping its last value (as [`SourceMap`]'s
/// positions do). serde_yaml's own `Value` refuses a whole document for one repeated key; the
/// checks that read the file part by part must still see every other part.
fn lenient_value(text: &str) -> Option<serde_yaml::Value> {
    use serde::de::{Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor};
    use serde_yaml::value::{Tag, TaggedValue};
    use serde_yaml::{Mapping, Value};

    struct Lenient(Value);
    impl<'de> Deserialize<'de> for Lenient {
        fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
            de.deserialize_any(AnyValue).map(Lenient)
        }
    }
    struct AnyValue;
    impl<'de> Visitor<'de> for AnyValue {
        type Value = Value;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any YAML value")
        }
        fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
            Ok(Value::Bool(v))
        }
        fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
            Ok(Value::Number(v.into()))
        }
        fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
            Ok(Value::Number(v.into()))
        }
        fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
            Ok(Value::Number(v.into()))
        }
        fn visit_str<E>(self, v: &str) -> Result<Value, E> {
            Ok(Value::String(v.to_owned()))
        }
        fn visit_string<E>(self, v: String) -> Result<Value, E> {
            Ok(Value::String(v))
        }
        fn visit_unit<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_none<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_some<D: Deserializer<'de>>(self, de: D) -> Result<Value, D::Error> {
            de.deserialize_any(AnyValue)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
            let mut out = Vec::new();
            while let Some(Lenient(v)) = seq.next_element()? {
                out.push(v);
            }
            Ok(Value::Sequence(out))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
            let mut out = Mapping::new();
            while let Some(Lenient(k)) = map.next_key()? {
                let Lenient(v) = map.next_value()?;
                out.insert(k, v);
            }
            Ok(Value::Mapping(out))
        }
        fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Value, A::Error> {
            let (tag, variant) = data.variant::<String>()?;
            let Lenient(value) = variant.newtype_variant()?;
            Ok(Value::Tagged(Box::new(TaggedValue {
                tag: Tag::new(tag),
                value,
            })))
        }
    }
    serde_yaml::from_str::<Lenient>(text).ok().map(|l| l.0)
}

/// Parses `text` as the routing file named `file`. The text is kept (to locate errors found
/// later): pass a `String` to hand it over without a copy.
pub fn parse(file: &str, text: impl Into<String>) -> Result<(RoutingFile, Source), ConfigErrors> {
    parse_text(file, text.into(), None).map_err(|(errors, _)| errors)
}

/// `parse`, giving the text back with the errors. `sha256` is the text's digest when the
/// caller has it already (a 943 KB file takes ~0.5 ms to hash).
fn parse_text(
    file: &str,
    mut text: String,
    sha256: Option<String>,
) -> Result<(RoutingFile, Source), (ConfigErrors, String)> {
    // The digest is the file's, as `sha256sum` gives it; a byte-order mark (some Windows
    // editors write one) is not part of the YAML (YAML 1.2 §5.2), and positions count from
    // after it, as editors show them.
    let sha256 = sha256.unwrap_or_else(|| sha256_hex(text.as_bytes()));
    if text.starts_with(BOM) {
        text.drain(..BOM.len());
    }
    let parsed: RoutingFile = match serde_yaml::from_str(&text) {
        Ok(parsed) => parsed,
        Err(e) => {
            let errors = schema_errors(file, &text, &e);
            return Err((errors, text));
        }
    };
    let source = Source {
        file: file.to_string(),
        text,
        map: OnceLock::new(),
        sha256,
    };
    Ok((parsed, source))
}

/// Every schema error of a file serde refused with `e` (its first).
fn schema_errors(file: &str, text: &str, e: &serde_yaml::Error) -> ConfigErrors {
    // serde_yaml hands the part of a document before a syntax error to the deserialiser, which
    // can stop first at a key missing from that part: the syntax error is the one to report.
    let syntax = serde_yaml::from_str::<serde::de::IgnoredAny>(text).err();
    let e = syntax.as_ref().unwrap_or(e);
    let pos = e
        .location()
        .map(|l| Pos {
            line: l.line(),
            col: l.column(),
        })
        .unwrap_or(Pos { line: 1, col: 1 });
    let message = clean_serde_message(&e.to_string());
    let lines = line_count(text);
    let (pos, message) = if message.contains("more than one document") {
        (second_document(text).unwrap_or(pos), message)
    } else if let Some(at) = syntax
        .as_ref()
        .and_then(|e| unfinished(&e.to_string(), lines))
    {
        at
    } else {
        (within(lines, pos), message)
    };
    // serde_yaml puts a key written twice (or a backend defined twice) at the start of its
    // mapping: the part-by-part reading below knows where the repetition stands.
    let repeated = matches!(fault(&message), Some(Fault::Repeated));
    let first = ConfigError {
        file: file.to_string(),
        pos,
        message,
    };
    let mut errors = vec![first];
    // Every error of every part of the file: serde's first is one of them, perhaps worded
    // otherwise (a bare `-` route is "missing field `path`" for serde, "invalid type: unit
    // value" for the part read alone). That one is left out, once; the part's others stay.
    // Unless serde stopped in the first of two copies of a mapping (a backend defined twice):
    // the part-by-part reading sees the last, whose errors are others.
    let map = SourceMap::new(text);
    let others = other_schema_errors(file, text, &map);
    let first_part = split_serde_path(&errors[0].message).0.map(str::to_owned);
    let in_repeated = first_part.as_deref().is_some_and(|part| {
        let node = part.replace('[', ".").replace(']', "");
        map.duplicates().iter().any(|(mapping, key, _)| {
            let repeated = join(mapping, key);
            match node.strip_prefix(&repeated) {
                Some("") => true,
                // A backend's name may hold dots: below `backends.NAME`, only its own keys.
                Some(rest) => rest
                    .strip_prefix('.')
                    .is_some_and(|field| mapping != "backends" || BACKEND_KEYS.contains(&field)),
                None => false,
            }
        })
    });
    let mut reworded = first_part.is_some()
        && !in_repeated
        && !others.iter().any(|o| o.message == errors[0].message);
    let mut seen: HashSet<(String, Pos)> =
        HashSet::from([(errors[0].message.clone(), errors[0].pos)]);
    let mut met_first = false;
    for mut more in others {
        // The same message from the last copy of a repeated mapping is that copy's own.
        if !met_first && (repeated || !in_repeated) && more.message == errors[0].message {
            met_first = true;
            // The same fault; where a key is written twice, the part's reading knows which.
            if repeated {
                errors[0].pos = more.pos;
            }
            continue;
        }
        if reworded && split_serde_path(&more.message).0 == first_part.as_deref() {
            reworded = false;
            continue;
        }
        more.pos = within(lines, more.pos);
        if seen.insert((more.message.clone(), more.pos)) {
            errors.push(more);
        }
    }
    errors.sort_by_key(|e| (e.pos.line, e.pos.col));
    ConfigErrors(errors)
}

/// A syntax error found at the end of the file, inside something left open (`[`, `{`, a
/// quote): reported where that begins, which is what needs closing, instead of past the last
/// line. libyaml words it `PROBLEM at line L column C, while CONTEXT at line L2 column C2`.
fn unfinished(raw: &str, lines: usize) -> Option<(Pos, String)> {
    fn mark(s: &str) -> Option<(&str, Pos)> {
        let (before, at) = s.rsplit_once(" at line ")?;
        let (line, col) = at.split_once(" column ")?;
        Some((
            before,
            Pos {
                line: line.parse().ok()?,
                col: col.parse().ok()?,
            },
        ))
    }
    let (problem, context) = raw.split_once(", while ")?;
    let (problem, found) = mark(problem)?;
    let (context, start) = mark(context)?;
    let end = if problem.contains("end of stream") {
        ""
    } else {
        " before the end of the file"
    };
    (found.line > lines).then(|| {
        (
            start,
            format!("{problem}{end}, while {context} that starts here"),
        )
    })
}

/// `pos` if it is on one of the file's `lines`; else the start of its last line. serde_yaml
/// places what it found missing at the end of the stream, which is past the last line of a file
/// ending in a newline (a file of comments only, a route left as a bare `-`): editors and CI
/// annotations need a line that exists.
fn within(lines: usize, pos: Pos) -> Pos {
    if pos.line > lines {
        Pos {
            line: lines,
            col: 1,
        }
    } else {
        pos
    }
}

/// Where a second YAML document starts: the `---` after the first document's content (or the
/// second `---`), which serde_yaml reports at 1:1.
fn second_document(text: &str) -> Option<Pos> {
    let (mut content, mut markers) = (false, 0);
    for (i, line) in text.lines().enumerate() {
        let is_marker = line == "---" || line.starts_with("--- ") || line.starts_with("---\t");
        if is_marker {
            markers += 1;
            if content || markers == 2 {
                return Some(Pos {
                    line: i + 1,
                    col: 1,
                });
            }
            content = !line[3..].trim().is_empty() && !line[3..].trim_start().starts_with('#');
        } else if !line.trim().is_empty() && !line.trim_start().starts_with('#') {
            content = true;
        }
    }
    None
}

/// The keys of a backend, as `BackendSpec` names them (`tests::backend_keys` checks the list
/// against serde's own).
const BACKEND_KEYS: [&str; 5] = [
    "url",
    "trailing_slash",
    "host",
    "connect_timeout",
    "timeout",
];

/// The keys of the file's top level, as `RoutingFile` names them (`tests::top_level_keys`
/// checks the list against serde's own).
const TOP_LEVEL: [&str; 4] = ["backends", "default", "routes", "trusted_proxies"];

/// serde stops at the first schema error (an unknown key, a wrong type). To report every one,
/// as `check` promises, the document is read again as plain YAML and each part deserialised on
/// its own: every top-level key, every backend, every route. Only on the error path; the
/// semantic checks (undefined backends, conflicts, …) run once the schema holds, or on the
/// file without its unknown keys ([`Unread`]).
fn other_schema_errors(file: &str, text: &str, map: &SourceMap) -> Vec<ConfigError> {
    use serde_yaml::Value;
    let Some(Value::Mapping(top)) = lenient_value(text) else {
        return Vec::new(); // a syntax error: serde's one message is all there is
    };
    // Each key written twice, worded as serde words the first it meets.
    let mut out: Vec<ConfigError> = map
        .duplicates()
        .iter()
        .map(|(mapping, key, pos)| {
            let shown = match mapping.strip_prefix("routes.") {
                Some(rest) => match rest.split_once('.') {
                    Some((i, more)) => format!("routes[{i}].{more}"),
                    None => format!("routes[{rest}]"),
                },
                None => mapping.clone(),
            };
            let message = match shown.as_str() {
                "" => format!("duplicate field `{key}`"),
                "backends" => format!("backends: backend {key:?} is defined twice"),
                _ => format!("{shown}: duplicate field `{key}`"),
            };
            ConfigError {
                file: file.to_string(),
                pos: *pos,
                message,
            }
        })
        .collect();
    for (key, value) in &top {
        let Some(key) = key.as_str() else { continue };
        match key {
            "backends" => match value {
                Value::Mapping(backends) => {
                    for (name, b) in backends {
                        if let Some(name) = name.as_str() {
                            let path = format!("backends.{name}");
                            out.extend(part_errors(file, map, b, &path, &path, Part::Backend));
                        }
                    }
                }
                _ => out.extend(part_errors(file, map, value, key, key, Part::Backends)),
            },
            "routes" => match value {
                Value::Sequence(routes) => {
                    for (i, r) in routes.iter().enumerate() {
                        let (path, shown) = (format!("routes.{i}"), format!("routes[{i}]"));
                        out.extend(part_errors(file, map, r, &path, &shown, Part::Route));
                    }
                }
                _ => out.extend(part_errors(file, map, value, key, key, Part::Routes)),
            },
            "default" => out.extend(part_errors(
                file,
                map,
                value,
                "default",
                "default",
                Part::Default,
            )),
            "trusted_proxies" => out.extend(part_errors(file, map, value, key, key, Part::Proxies)),
            other => out.push(ConfigError {
                file: file.to_string(),
                pos: map.key_pos(other),
                message: format!(
                    "unknown field `{other}`, expected one of {}",
                    TOP_LEVEL.map(|k| format!("`{k}`")).join(", ")
                ),
            }),
        }
    }
    out
}

/// Every error of one part of the file: the part is re-serialised and parsed alone (so that serde
/// names the field at fault), then the key at fault is taken out and the part read again. A
/// route's `rollback` block is a part of its own, so that every error inside it is found.
fn part_errors(
    file: &str,
    map: &SourceMap,
    value: &serde_yaml::Value,
    path: &str,
    shown: &str,
    part: Part,
) -> Vec<ConfigError> {
    let mut value = value.clone();
    let mut found = Vec::new();
    let mut removed: Vec<String> = Vec::new();
    for _ in 0..32 {
        let Ok(part_text) = serde_yaml::to_string(&value) else {
            break;
        };
        let result = match part {
            Part::Backends => {
                unique_names(serde_yaml::Deserializer::from_str(&part_text)).map(drop)
            }
            Part::Routes => {
                serde_yaml::from_str::<Vec<serde::de::IgnoredAny>>(&part_text).map(drop)
            }
            Part::Backend => serde_yaml::from_str::<BackendSpec>(&part_text).map(drop),
            Part::Route => serde_yaml::from_str::<RouteSpec>(&part_text).map(drop),
            Part::Rollback => serde_yaml::from_str::<RollbackSpec>(&part_text).map(drop),
            Part::Default => serde_yaml::from_str::<Option<String>>(&part_text).map(drop),
            Part::Proxies => serde_yaml::from_str::<Vec<String>>(&part_text).map(drop),
        };
        let Err(e) = result else { break };
        let msg = clean_serde_message(&e.to_string());
        let (inner, msg) = split_serde_path(&msg);
        if inner.is_none()
            && backticked(msg, "missing field `").is_some_and(|k| removed.iter().any(|r| r == k))
        {
            // Taken out below for its wrong type: it is there, not missing.
            break;
        }
        let unknown = backticked(msg, "unknown field `");
        // The part's own key at fault: the first step of the inner path, else the unknown key.
        let culprit = inner
            .map(|i| i.split(['.', '[']).next().unwrap_or(i))
            .or(unknown);
        let nested = matches!(part, Part::Route) && inner.is_some() && culprit == Some("rollback");
        if nested {
            // Inside a route's `rollback` block: the block's every error, read on its own.
            if let Some(block) = value.get("rollback") {
                found.extend(part_errors(
                    file,
                    map,
                    block,
                    &format!("{path}.rollback"),
                    &format!("{shown}.rollback"),
                    Part::Rollback,
                ));
            }
        } else {
            let (node, where_) = match inner {
                Some(inner) => (
                    format!("{path}.{}", inner.replace('[', ".").replace(']', "")),
                    format!("{shown}.{inner}"),
                ),
                None => (path.to_string(), shown.to_string()),
            };
            found.push(ConfigError {
                file: file.to_string(),
                pos: match unknown {
                    Some(key) => map.key_pos(&format!("{node}.{key}")),
                    None => map.pos(&node),
                },
                message: if where_.is_empty() {
                    msg.to_string()
                } else {
                    format!("{where_}: {msg}")
                },
            });
        }
        // A required key of a `rollback` block, missing or of the wrong type, gets a stand-in
        // (the block's other keys are still read); any other key at fault is taken out.
        let missing = backticked(msg, "missing field `").filter(|_| inner.is_none());
        if let Some((key, v)) = missing
            .or(culprit.filter(|_| unknown.is_none()))
            .and_then(|k| Some((k, stand_in(part, k)?)))
        {
            match value.as_mapping_mut() {
                Some(m) => {
                    m.insert(key.into(), v);
                    continue;
                }
                None => break,
            }
        }
        let taken_out = match (culprit, value.as_mapping_mut()) {
            (Some(k), Some(m)) => m.remove(k).map(|_| k.to_string()),
            _ => None,
        };
        match taken_out {
            Some(k) => removed.push(k),
            None => break,
        }
    }
    found
}

/// A valid value for a required key of `part` that was missing or held the wrong type, so that
/// the rest of `part` can still be read and checked; `None` for every other key.
fn stand_in(part: Part, key: &str) -> Option<serde_yaml::Value> {
    match (part, key) {
        (Part::Rollback, "error_rate") => Some("50%".into()),
        (Part::Rollback, "min_requests") => Some(1.into()),
        (Part::Rollback, "window") => Some("60s".into()),
        _ => None,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    /// `backends` that is not a mapping, `routes` that is not a list: the part's own type.
    Backends,
    Routes,
    Backend,
    Route,
    /// A route's `rollback` block.
    Rollback,
    Default,
    Proxies,
}

/// serde_yaml writes `PATH: MESSAGE` when the error is below the top of what it parsed; serde's
/// own messages (and `unique_names`'s) start with one of these.
pub(crate) fn split_serde_path(msg: &str) -> (Option<&str>, &str) {
    const OWN: [&str; 8] = [
        "unknown field",
        "missing field",
        "duplicate field",
        "invalid type",
        "invalid value",
        "invalid length",
        "unknown variant",
        "backend ",
    ];
    if OWN.iter().any(|o| msg.starts_with(o)) {
        return (None, msg);
    }
    match msg.split_once(": ") {
        Some((path, rest)) if !path.contains(' ') => (Some(path), rest),
        _ => (None, msg),
    }
}

/// The text between `prefix` and the next backtick.
pub(crate) fn backticked<'a>(msg: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = msg.strip_prefix(prefix)?;
    rest.split_once('`').map(|(k, _)| k)
}

/// serde_yaml appends " at line L column C" to its messages; the position is already in front.
pub fn clean_serde_message(msg: &str) -> String {
    let msg = match msg.rfind(" at line ") {
        Some(i) => &msg[..i],
        None => msg,
    };
    // serde names the Rust type it expected; say what the file should hold instead.
    const WORDS: [(&str, &str); 6] = [
        (
            "struct RoutingFile",
            "a mapping with backends, default and routes",
        ),
        ("struct BackendSpec", "a backend: a mapping with url"),
        ("struct RouteSpec", "a route: a mapping with path and to"),
        (
            "struct RollbackSpec",
            "a mapping with error_rate, min_requests and window",
        ),
        ("enum TrailingSlash", "keep, add or strip"),
        (
            "struct Case",
            "a case like {request: \"GET /path\", route: NAME}",
        ),
    ];
    let mut msg = msg.to_string();
    for (rust, words) in WORDS {
        if msg.contains(rust) {
            msg = msg.replace(rust, words);
        }
    }
    // A number too large or negative for a count (`min_requests`): serde names the integer
    // types it read and wanted.
    if msg.ends_with("expected u64") {
        msg = msg.replace(" as u128", "").replace(" as i128", "");
        msg.truncate(msg.len() - "u64".len());
        msg.push_str("a whole number");
    }
    msg
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut hex = String::with_capacity(64);
    for b in digest.as_ref() {
        hex.push(char::from(DIGITS[usize::from(b >> 4)]));
        hex.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    hex
}

/// Parses `2s`, `500ms`, `1.5s`, `1m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("duration {s:?} needs a unit: ms, s, m or h (e.g. 2s, 500ms)"))?;
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "duration {s:?} must be a number and a unit, like 2s or 500ms"
        ));
    }
    let n: f64 = num
        .parse()
        .map_err(|_| format!("duration {s:?}: {num:?} is not a number"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "duration {s:?}: unknown unit {unit:?} (use ms, s, m or h)"
            ))
        }
    };
    // Below a millisecond a timeout is zero in practice (`0.0000001s` would be a 504 for every
    // request that waits at all), and a window too short to count anything.
    if !(0.001..=86_400.0).contains(&secs) {
        return Err(format!(
            "duration {s:?} must be at least 1ms and at most 24h"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl PercentSpec {
    /// The value in percent (`5%` → 5.0), checked to lie in 0..=100. An error reads after the
    /// field's name (`split 150 is outside 0..100`).
    pub fn percent(&self) -> Result<f64, String> {
        let v = match self {
            PercentSpec::Number(n) => *n,
            PercentSpec::Text(t) => {
                let t = t.trim();
                let num = t.strip_suffix('%').unwrap_or(t).trim();
                num.parse::<f64>()
                    .map_err(|_| format!("{t:?} is not a percentage like 5%"))?
            }
        };
        if !(0.0..=100.0).contains(&v) || v.is_nan() {
            return Err(format!("{v} is outside 0..100"));
        }
        // `-0` is 0.
        Ok(v + 0.0)
    }
}

/// Test helper: the errors `got`, one for each line of `want`, in order, each starting with it.
#[cfg(test)]
pub(crate) fn assert_each_starts_with(got: &[String], want: &[&str]) {
    assert_eq!(got.len(), want.len(), "{got:#?}");
    for (g, w) in got.iter().zip(want) {
        assert!(g.starts_with(w), "want {w:?}, got {g:?}\nall: {got:#?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_is_lowercase_hex() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1ms"), Ok(Duration::from_millis(1)));
        for bad in [
            "2",
            "s",
            "2 sec",
            "-1s",
            "0s",
            "2d",
            "",
            "1.2.3s",
            "0.0000000001s",
            "0.5ms",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn percentages() {
        assert_eq!(PercentSpec::Text("5%".into()).percent(), Ok(5.0));
        assert_eq!(PercentSpec::Text("0.5 %".into()).percent(), Ok(0.5));
        assert_eq!(PercentSpec::Number(50.0).percent(), Ok(50.0));
        assert!(PercentSpec::Text("150%".into()).percent().is_err());
        assert!(PercentSpec::Text("x%".into()).percent().is_err());
    }

    /// Every error points at a line of the file: what serde found missing at the end of the
    /// stream is on the last line, a second document at its `---`.
    #[test]
    fn errors_point_at_lines_that_exist() {
        let first = |text: &str| parse("r.yaml", text).unwrap_err().0[0].pos;
        assert_eq!(first("\n\n# nothing yet\n"), Pos { line: 3, col: 1 });
        let bare_item =
            "backends: {legacy: {url: 'http://127.0.0.1:1'}}\ndefault: legacy\nroutes:\n  -\n";
        let errors = parse("r.yaml", bare_item).unwrap_err().0;
        assert_eq!(errors.len(), 1, "one fault, one error: {errors:?}");
        assert!(errors[0].pos.line <= 4, "{}", errors[0]);
        let two = "backends: {legacy: {url: 'http://127.0.0.1:1'}}\ndefault: legacy\n# next\n---\nroutes: []\n";
        assert_eq!(first(two), Pos { line: 4, col: 1 });
        let marked =
            "---\nbackends: {legacy: {url: 'http://127.0.0.1:1'}}\ndefault: legacy\n--- # again\n";
        assert_eq!(first(marked), Pos { line: 4, col: 1 });
    }

    #[test]
    fn a_duplicate_key_points_at_the_second_one() {
        for (text, line, col) in [
            ("backends: {legacy: {url: 'http://h:1'}}\ndefault: legacy\ndefault: legacy\n", 3, 1),
            ("backends: {legacy: {url: 'http://h:1'}}\ndefault: legacy\nroutes:\n  - path: /a\n    to: legacy\n    to: legacy\n", 6, 5),
        ] {
            let err = parse("d.yaml", text).unwrap_err();
            let e = &err.0[0];
            assert!(e.message.contains("duplicate field"), "{e}");
            assert_eq!((e.pos.line, e.pos.col), (line, col), "{e}");
        }
    }

    /// Each error `parse` gives `text` (which it must refuse), as printed.
    fn refused(text: &str) -> Vec<String> {
        let err = parse("r.yaml", text).unwrap_err();
        err.0.iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn each_repeated_key_is_reported_where_it_is_repeated() {
        // The first `url` repeated inside the first of two `legacy` backends; serde stops at
        // the first repetition, and would put it at the start of its mapping.
        let text = "backends:\n  legacy:\n    url: http://127.0.0.1:1\n    url: http://127.0.0.1:2\n  legacy:\n    url: http://127.0.0.1:3\ndefault: legacy\ndefault: legacy\nroutes:\n  - {path: /a, to: legacy, to: legacy, bogus: 1}\n  - {path: /b, to: legacy, rollback: {error_rate: 5%, min_requests: 1, window: 1s, window: 2s}}\n";
        let got = refused(text);
        let want = [
            "r.yaml:4:5: backends.legacy: duplicate field `url`",
            "r.yaml:5:3: backends: backend \"legacy\" is defined twice",
            "r.yaml:8:1: duplicate field `default`",
            "r.yaml:10:28: routes[0]: duplicate field `to`",
            "r.yaml:10:40: routes[0]: unknown field `bogus`",
            "r.yaml:11:84: routes[1].rollback: duplicate field `window`",
        ];
        crate::config::assert_each_starts_with(&got, &want);
    }

    #[test]
    fn lines_end_as_yaml_ends_them() {
        assert_eq!(line_count(""), 1);
        assert_eq!(line_count("a"), 1);
        assert_eq!(line_count("a\n"), 1);
        assert_eq!(line_count("a\r\nb\r\n"), 2);
        assert_eq!(line_count("a\rb\rc"), 3);
        // A file saved with lone CRs (classic Mac OS): errors on the lines they are on.
        let text =
            "backends:\r  legacy:\r    url: http://127.0.0.1:1\r    colour: red\rdefault: legacy\r";
        let err = parse("r.yaml", text).unwrap_err();
        assert!(err.to_string().starts_with("r.yaml:4:5: "), "{err}");
    }

    #[test]
    fn the_faults_of_both_copies_of_a_mapping_are_reported() {
        // The same fault in both copies of a backend: both; a backend whose name holds the
        // name of a repeated one and a dot is no part of it (its fault once).
        for (text, want) in [
            (
                "backends:\n  legacy: {url: 'http://h:9', colour: red}\n  legacy: {url: 'http://h:9', colour: red}\ndefault: legacy\n",
                &[
                    "r.yaml:2:31: backends.legacy: unknown field `colour`",
                    "r.yaml:3:3: backends: backend \"legacy\" is defined twice",
                    "r.yaml:3:31: backends.legacy: unknown field `colour`",
                ][..],
            ),
            (
                "backends:\n  api.v2:\n  api: {url: 'http://h:9'}\n  api: {url: 'http://h:9'}\ndefault: api\n",
                &[
                    "r.yaml:2:10: backends.api.v2: missing field `url`",
                    "r.yaml:4:3: backends: backend \"api\" is defined twice",
                ][..],
            ),
        ] {
            let got = refused(text);
            assert_eq!(got.len(), want.len(), "{got:#?}");
            crate::config::assert_each_starts_with(&got, want);
        }
    }

    #[test]
    fn every_fault_of_the_part_serde_stopped_in_is_reported() {
        let text = "backends:\n  legacy:\n    url: http://127.0.0.1:1\n    colour: red\n    timeout: [1]\n    shade: blue\ndefault: legacy\n";
        let got = refused(text);
        let want = [
            "r.yaml:4:5: backends.legacy: unknown field `colour`",
            "r.yaml:5:14: backends.legacy.timeout: invalid type: sequence",
            "r.yaml:6:5: backends.legacy: unknown field `shade`",
        ];
        crate::config::assert_each_starts_with(&got, &want);
    }

    #[test]
    fn unknown_keys_point_at_the_key() {
        let text =
            "backends:\n  legacy:\n    url: http://127.0.0.1:1\n    colour: red\ndefault: legacy\n";
        let err = parse("r.yaml", text).unwrap_err();
        let e = &err.0[0];
        assert_eq!((e.pos.line, e.pos.col), (4, 5), "{e}");
        assert!(e.message.contains("unknown field `colour`"), "{e}");
        assert!(err.to_string().starts_with("r.yaml:4:5: "), "{err}");
    }

    #[test]
    fn a_byte_order_mark_is_not_part_of_the_yaml() {
        let text = "backends:\n  legacy: {url: http://127.0.0.1:1}\ndefault: legacy\n";
        let (with_bom, source) = parse("r.yaml", format!("{BOM}{text}")).unwrap();
        assert_eq!(with_bom.default.as_deref(), Some("legacy"));
        assert_eq!(source.sha256, sha256_hex(format!("{BOM}{text}").as_bytes()));
        let err = parse("r.yaml", format!("{BOM}backends: {{}}\nbogus: 1\n")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("r.yaml:2:1: unknown field `bogus`"),
            "{err}"
        );
    }

    #[test]
    fn messages_name_what_the_file_should_hold_not_rust_types() {
        for (text, want) in [
            (
                "backends:\n  legacy: http://127.0.0.1:1\ndefault: legacy\n",
                "expected a backend: a mapping with url",
            ),
            (
                "backends: {}\ndefault: legacy\nroutes:\n  - ~\n",
                "expected a route: a mapping with path and to",
            ),
            (
                "just text\n",
                "expected a mapping with backends, default and routes",
            ),
            (
                "backends: {legacy: {url: 'http://127.0.0.1:1'}}\ndefault: legacy\nroutes:\n  - {path: /a, to: legacy, rollback: {error_rate: 5%, min_requests: 99999999999999999999999, window: 1m}}\n",
                "invalid type: integer `99999999999999999999999`, expected a whole number",
            ),
            (
                "backends: {legacy: {url: 'http://127.0.0.1:1'}}\ndefault: legacy\nroutes:\n  - {path: /a, to: legacy, rollback: {error_rate: 5%, min_requests: -1, window: 1m}}\n",
                "invalid type: integer `-1`, expected a whole number",
            ),
        ] {
            let err = parse("r.yaml", text).unwrap_err().to_string();
            assert!(
                err.contains(want) && !err.contains("struct") && !err.contains("u64"),
                "{err}"
            );
        }
    }

    #[test]
    fn every_schema_error_is_reported() {
        let text = "backends:\n  legacy:\n    url: http://127.0.0.1:1\n    colour: red\n  new:\n    url: http://127.0.0.1:2\n    timeout: [1]\ndefault: legacy\nroutes:\n  - path: /x\n    to: nope\n    bogus: 1\n  - path: /y\n    to: legacy\n    split: [1]\n    rollback: {error_rate: 5, min_requests: 1, window: 1s, extra: 2}\nextra_top: 1\n";
        let got = refused(text);
        let want = [
            "r.yaml:4:5: backends.legacy: unknown field `colour`",
            "r.yaml:7:14: backends.new.timeout: invalid type: sequence, expected a string",
            "r.yaml:12:5: routes[0]: unknown field `bogus`",
            "r.yaml:15:12: routes[1].split: invalid type: sequence, expected a percentage like 5% or 12.5",
            "r.yaml:16:60: routes[1].rollback: unknown field `extra`",
            "r.yaml:17:1: unknown field `extra_top`, expected one of `backends`, `default`, `routes`, `trusted_proxies`",
        ];
        crate::config::assert_each_starts_with(&got, &want);
    }

    #[test]
    fn a_key_of_the_wrong_type_is_not_also_missing() {
        for text in [
            "backends:\n  legacy:\n    url: http://127.0.0.1:1\n  new:\n    url: [a]\ndefault: legacy\n",
            "backends:\n  legacy: {url: 'http://127.0.0.1:1'}\ndefault: legacy\nroutes:\n  - {path: /a, to: [legacy]}\n",
        ] {
            let got = refused(text);
            assert_eq!(got.len(), 1, "{got:#?}");
            assert!(got[0].contains("invalid type: sequence"), "{got:#?}");
        }
    }

    #[test]
    fn a_syntax_error_is_reported_where_the_yaml_breaks() {
        // `to` indented one space short: serde would first miss `to` in the route above.
        let text = "backends:\n  legacy:\n    url: http://127.0.0.1:1\ndefault: legacy\nroutes:\n  - name: a\n    path: /a\n   to: legacy\n";
        let err = parse("r.yaml", text).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        let e = &err.0[0];
        assert_eq!((e.pos.line, e.pos.col), (8, 4), "{e}");
        assert!(!e.message.contains("missing field"), "{e}");
    }

    #[test]
    fn something_left_open_is_reported_where_it_begins() {
        for (text, want) in [
            (
                "backends:\n  legacy: {url: 'http://h:1'}\ndefault: legacy\nroutes: [\n  {path: /a, to: legacy},\n  {path: /b, to: legacy}\n\n",
                "r.yaml:4:9: did not find expected ',' or ']' before the end of the file, while parsing a flow sequence that starts here",
            ),
            (
                "backends:\n  legacy: {url: \"http://h:1}\ndefault: legacy\n",
                "r.yaml:2:17: found unexpected end of stream, while scanning a quoted scalar that starts here",
            ),
        ] {
            assert_eq!(refused(text), [want]);
        }
    }

    #[test]
    fn parts_of_the_wrong_kind_are_each_reported() {
        for (text, want) in [
            (
                "backends: [a]\ndefault: legacy\nroutes: {a: 1}\n",
                [
                    "r.yaml:1:11: backends: invalid type: sequence, expected a map of backend names to backends",
                    "r.yaml:3:9: routes: invalid type: map, expected a sequence",
                ],
            ),
            (
                "backends: {legacy: {url: 'http://127.0.0.1:1'}}\ndefault: [legacy]\nroutes: 5\n",
                [
                    "r.yaml:2:10: default: invalid type: sequence, expected a string",
                    "r.yaml:3:9: routes: invalid type: integer `5`, expected a sequence",
                ],
            ),
        ] {
            let got = refused(text);
            assert_eq!(got, want, "{text}");
        }
    }

    #[test]
    fn backend_keys() {
        let err = parse("r.yaml", "backends: {a: {url: 'http://h:1', nope: 1}}\n").unwrap_err();
        let expected = BACKEND_KEYS.map(|k| format!("`{k}`")).join(", ");
        assert!(err.0[0].message.ends_with(&expected), "{err}");
    }

    #[test]
    fn top_level_keys() {
        let err = parse("r.yaml", "nope: 1\n").unwrap_err();
        let expected = TOP_LEVEL.map(|k| format!("`{k}`")).join(", ");
        assert!(err.0[0].message.ends_with(&expected), "{err}");
    }

    #[test]
    fn a_backend_defined_twice_is_refused() {
        let text = "backends:\n  legacy:\n    url: http://127.0.0.1:1\n  legacy:\n    url: http://127.0.0.1:2\ndefault: legacy\n";
        let err = parse("r.yaml", text).unwrap_err();
        let e = &err.0[0];
        assert!(
            e.message.contains("backend \"legacy\" is defined twice"),
            "{e}"
        );
        // At the second definition.
        assert_eq!((e.pos.line, e.pos.col), (4, 3), "{e}");
    }
}
