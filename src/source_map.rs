//! Where each node of a YAML document sits (line, column), so that errors found after
//! deserialisation — an undefined backend, a duplicate name — can still point at `FILE:LINE:COL`.
//! serde_yaml reports positions only for its own errors; this walks the same text once with
//! yaml-rust2's event parser and records the position of every node by its key path
//! (`routes.3.to`).

use std::collections::{HashMap, HashSet};

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::TScalarStyle;

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

/// Key path → position of the node's value.
#[derive(Debug, Default)]
pub struct SourceMap {
    nodes: HashMap<String, Pos>,
    /// Each key written a second (or third…) time in one mapping: the mapping's path, the key,
    /// and where it stands. The paths above hold the last occurrence, as a reader that lets
    /// the last win.
    duplicates: Vec<(String, String, Pos)>,
}

impl SourceMap {
    /// Indexes `text`. A document the event parser cannot read yields an empty map: serde_yaml
    /// reports the syntax error itself, with its own position.
    pub fn new(text: &str) -> Self {
        let mut map = SourceMap::default();
        let mut parser = Parser::new_from_str(text);
        // One frame per open collection: the path prefix, and either the next sequence index or,
        // for a mapping, the key waiting for its value.
        enum Frame {
            Seq(String, usize),
            Map(String, Option<String>, HashSet<String>),
        }
        let mut stack: Vec<Frame> = Vec::new();
        // An empty value (`window:` with nothing after it) is placed where the parser found
        // out it was empty: at the next key, or at the end of the stream, past the last line.
        // Editors and CI annotations need the line it was written on. A mapping's is where its
        // key stands, a list's first item where the list starts (the events before them); a
        // later item's is left at the next one, or at the start of the last line.
        let lines = line_count(text);
        let mut last = Pos { line: 1, col: 1 };
        while let Ok((event, mark)) = parser.next_token() {
            let empty = matches!(&event, Event::Scalar(v, TScalarStyle::Plain, ..) if v.is_empty());
            let placed_by_last = matches!(
                stack.last(),
                Some(Frame::Map(_, Some(_), _) | Frame::Seq(_, 0))
            );
            let pos = if empty && placed_by_last {
                last
            } else if mark.line() > lines {
                Pos {
                    line: lines,
                    col: 1,
                }
            } else {
                Pos {
                    line: mark.line(),
                    col: mark.col() + 1,
                }
            };
            last = pos;
            // The path of the node this event starts, if it is a node and not a mapping key.
            let node_path = match stack.last_mut() {
                None => Some(String::new()),
                Some(Frame::Seq(prefix, i)) => match event {
                    Event::SequenceEnd => None,
                    _ => {
                        let p = join(prefix, &i.to_string());
                        *i += 1;
                        Some(p)
                    }
                },
                Some(Frame::Map(prefix, key, seen)) => match (&event, key.take()) {
                    (Event::MappingEnd, _) => None,
                    (_, Some(k)) => Some(join(prefix, &k)),
                    (Event::Scalar(k, ..), None) => {
                        // A key: remember it, and where it stands (for "unknown key" style errors).
                        if !seen.insert(k.clone()) {
                            map.duplicates.push((prefix.clone(), k.clone(), pos));
                        }
                        map.nodes.insert(format!("{}#key", join(prefix, k)), pos);
                        *key = Some(k.clone());
                        None
                    }
                    (_, None) => {
                        // A complex key (a mapping used as a key): give it a placeholder name.
                        *key = Some("?".into());
                        None
                    }
                },
            };
            match event {
                Event::StreamEnd => break,
                Event::Scalar(..) | Event::Alias(_) => {
                    if let Some(p) = node_path {
                        map.nodes.insert(p, pos);
                    }
                }
                Event::SequenceStart(..) => {
                    let p = node_path.unwrap_or_default();
                    map.nodes.insert(p.clone(), pos);
                    stack.push(Frame::Seq(p, 0));
                }
                Event::MappingStart(..) => {
                    let p = node_path.unwrap_or_default();
                    map.nodes.insert(p.clone(), pos);
                    stack.push(Frame::Map(p, None, HashSet::new()));
                }
                Event::SequenceEnd | Event::MappingEnd => {
                    stack.pop();
                }
                _ => {}
            }
        }
        map
    }

    /// The position of the value at `path` (`routes.3.to`), else of its nearest ancestor, else
    /// line 1 column 1.
    pub fn pos(&self, path: &str) -> Pos {
        let mut p = path;
        loop {
            if let Some(pos) = self.nodes.get(p) {
                return *pos;
            }
            match p.rfind('.') {
                Some(i) => p = &p[..i],
                None => {
                    return self
                        .nodes
                        .get("")
                        .copied()
                        .unwrap_or(Pos { line: 1, col: 1 })
                }
            }
        }
    }

    /// The position of the key `path` (`routes.3.split`) itself, falling back to its value.
    pub fn key_pos(&self, path: &str) -> Pos {
        self.nodes
            .get(&format!("{path}#key"))
            .copied()
            .unwrap_or_else(|| self.pos(path))
    }

    /// The keys written more than once in their mapping, in file order: each repetition's
    /// mapping (`routes.1`), key (`to`) and position.
    pub fn duplicates(&self) -> &[(String, String, Pos)] {
        &self.duplicates
    }
}

/// The lines of `text` as YAML counts them (§5.4: a line ends at LF, CRLF or a lone CR; a
/// last line without a break counts too).
pub fn line_count(text: &str) -> usize {
    let bytes = text.as_bytes();
    let breaks = bytes
        .iter()
        .enumerate()
        .filter(|&(i, &b)| b == b'\n' || (b == b'\r' && bytes.get(i + 1) != Some(&b'\n')))
        .count();
    let unterminated = !matches!(bytes.last(), None | Some(b'\n' | b'\r'));
    (breaks + usize::from(unterminated)).max(1)
}

/// `mapping.key`, or `key` at the top.
pub fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nodes_by_key_path() {
        let text = "backends:\n  legacy:\n    url: http://a:1\nroutes:\n  - path: /x\n    to: new\n  - {path: /y, to: legacy}\n";
        let m = SourceMap::new(text);
        assert_eq!(m.pos("backends.legacy.url"), Pos { line: 3, col: 10 });
        assert_eq!(m.pos("routes.0.to"), Pos { line: 6, col: 9 });
        assert_eq!(m.key_pos("routes.0.to"), Pos { line: 6, col: 5 });
        assert_eq!(m.pos("routes.1.to").line, 7);
        assert_eq!(m.pos("routes.0").line, 5);
        // Unknown paths fall back to the nearest ancestor.
        assert_eq!(m.pos("routes.0.nothing"), m.pos("routes.0"));
        assert!(m.duplicates().is_empty());
        // An empty value is where its key is, at the end of the file (comments after it) or
        // not; lines end as YAML ends them, a lone CR included.
        for text in [
            "a:\n  b: 1\n  c: \n",
            "a:\n  b: 1\n  c:\n\n# end\n",
            "a:\n  b: 1\n  c:\nd: 2\n",
            "a:\r  b: 1\r  c:\r",
        ] {
            let m = SourceMap::new(text);
            assert_eq!(m.pos("a.c"), Pos { line: 3, col: 3 }, "{text:?}");
            assert_eq!(m.pos("a.b"), Pos { line: 2, col: 6 }, "{text:?}");
        }
        // An empty list item: the first where the list starts, the last on the last line.
        let m = SourceMap::new("l:\n  -\n  - {a: 1}\n  -\n");
        assert_eq!(m.pos("l.0").line, 2);
        assert_eq!(m.pos("l.2").line, 4);
        // Characters past a block scalar's first 16 count once, whatever their width.
        let m = SourceMap::new(&format!("a: |\n  {}\nb: 1\n", "\u{e9}".repeat(30)));
        assert_eq!(m.pos("b"), Pos { line: 3, col: 4 });
    }

    #[test]
    fn finds_each_repeated_key_in_its_own_mapping() {
        // The same key in two mappings that share a path (a backend defined twice) is no
        // repetition; the second definition's name is one, and so is a key repeated within it.
        let text = "backends:\n  a:\n    url: x\n  a:\n    url: y\n    url: z\nroutes:\n  - {to: a, to: b, to: c}\n";
        let map = SourceMap::new(text);
        let got: Vec<(&str, &str, usize, usize)> = map
            .duplicates()
            .iter()
            .map(|(m, k, pos)| (m.as_str(), k.as_str(), pos.line, pos.col))
            .collect();
        assert_eq!(
            got,
            [
                ("backends", "a", 4, 3),
                ("backends.a", "url", 6, 5),
                ("routes.0", "to", 8, 13),
                ("routes.0", "to", 8, 20),
            ]
        );
    }
}
