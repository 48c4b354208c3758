//! Outline of a YAML document: the YAML path and source range of every node and mapping
//! entry, read from raw parser events (aliases are not expanded, so it costs one pass).
//!
//! It serves two purposes: giving located errors a YAML path (`pools.php82.timeouts.read`)
//! and finding the entry to blank out so deserialization can resume past an error, which
//! is how `parse_yaml` reports every schema error instead of serde's first one.

use serde_saphyr::granit_parser::{Event, Marker, Parser, StructureStyle};

use super::error::ConfigError;

/// Documents with more nodes than this get no outline (errors then carry no path and only
/// the first schema error is reported); real configs are orders of magnitude smaller.
const MAX_NODES: usize = 100_000;

/// A `(line, column)` position, both 1-based; ordered so ranges can be compared.
pub type Pos = (usize, usize);

/// Why no outline could be built.
pub enum OutlineError {
    /// The YAML is malformed; the error carries the parser's message and location.
    Syntax(ConfigError),
    /// Valid YAML this outline does not model (complex keys, huge documents).
    Unsupported,
}

/// A node (scalar, alias, mapping or sequence) or a mapping entry (key through value).
struct Range {
    path: String,
    start: Pos,
    end: Pos,
    /// Char offsets of the range, for blanking.
    start_char: usize,
    end_char: usize,
}

/// A mapping entry plus what blanking it needs to know about its mapping.
struct Entry {
    range: Range,
    flow: bool,
    siblings: usize,
}

/// Paths and ranges of the first document of a YAML text.
pub struct Outline {
    nodes: Vec<Range>,
    entries: Vec<Entry>,
}

enum Frame {
    Map {
        node: usize,
        path: String,
        flow: bool,
        entries: Vec<usize>,
        key: Option<usize>,
    },
    Seq {
        node: usize,
        path: String,
        next: usize,
    },
}

fn pos(m: &Marker) -> Pos {
    (m.line(), m.col() + 1)
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

impl Outline {
    /// Reads the first document of `text`.
    pub fn build(text: &str) -> Result<Outline, OutlineError> {
        let mut out = Outline {
            nodes: Vec::new(),
            entries: Vec::new(),
        };
        let mut stack: Vec<Frame> = Vec::new();
        let mut parser = Parser::new_from_str(text);
        while let Some(next) = parser.next_event() {
            let (event, span) = next.map_err(|e| {
                let message = format!("YAML syntax error: {}", e.info().replace('\n', "; "));
                OutlineError::Syntax(ConfigError::new("", message).at(Some(pos(e.marker()))))
            })?;
            if out.nodes.len() > MAX_NODES {
                return Err(OutlineError::Unsupported);
            }
            let (start, end) = (&span.start, &span.end);
            let is_node = matches!(
                event,
                Event::Scalar(..)
                    | Event::Alias(..)
                    | Event::MappingStart(..)
                    | Event::SequenceStart(..)
            );
            if is_node {
                // A node in key position starts a new entry; only plain scalar keys are modelled.
                if let Some(Frame::Map {
                    path,
                    flow,
                    entries,
                    key,
                    ..
                }) = stack.last_mut()
                {
                    if key.is_none() {
                        let Event::Scalar(name, ..) = &event else {
                            return Err(OutlineError::Unsupported);
                        };
                        let path = join(path, name);
                        out.nodes.push(Range {
                            path: path.clone(),
                            ..range_of(start, end)
                        });
                        entries.push(out.entries.len());
                        *key = Some(out.entries.len());
                        let range = Range {
                            path,
                            ..range_of(start, end)
                        };
                        out.entries.push(Entry {
                            range,
                            flow: *flow,
                            siblings: 0,
                        });
                        continue;
                    }
                }
                let path = match stack.last_mut() {
                    Some(Frame::Map { key, .. }) => match key.take() {
                        Some(i) => out.entries[i].range.path.clone(),
                        None => String::new(),
                    },
                    Some(Frame::Seq { path, next, .. }) => {
                        *next += 1;
                        format!("{path}[{}]", *next - 1)
                    }
                    None => String::new(),
                };
                let node = out.nodes.len();
                out.nodes.push(Range {
                    path: path.clone(),
                    ..range_of(start, end)
                });
                match event {
                    Event::MappingStart(style, ..) => stack.push(Frame::Map {
                        node,
                        path,
                        flow: style == StructureStyle::Flow,
                        entries: Vec::new(),
                        key: None,
                    }),
                    Event::SequenceStart(..) => stack.push(Frame::Seq {
                        node,
                        path,
                        next: 0,
                    }),
                    _ => {}
                }
                continue;
            }
            match event {
                Event::MappingEnd => {
                    let Some(Frame::Map { node, entries, .. }) = stack.pop() else {
                        return Err(OutlineError::Unsupported);
                    };
                    out.close(node, end);
                    // An entry runs to where the next one starts, or to the mapping's end.
                    let starts: Vec<(Pos, usize)> = entries
                        .iter()
                        .skip(1)
                        .map(|&i| (out.entries[i].range.start, out.entries[i].range.start_char))
                        .chain(std::iter::once((pos(start), start.index())))
                        .collect();
                    for (&i, (p, c)) in entries.iter().zip(starts) {
                        let e = &mut out.entries[i];
                        (e.range.end, e.range.end_char, e.siblings) = (p, c, entries.len());
                    }
                }
                Event::SequenceEnd => {
                    let Some(Frame::Seq { node, .. }) = stack.pop() else {
                        return Err(OutlineError::Unsupported);
                    };
                    out.close(node, end);
                }
                Event::DocumentEnd => break,
                _ => {}
            }
        }
        Ok(out)
    }

    fn close(&mut self, node: usize, end: &Marker) {
        if let Some(n) = self.nodes.get_mut(node) {
            n.end = pos(end);
            n.end_char = end.index();
        }
    }

    /// YAML path of what an error at `at` is about. With `key`, the error concerns the
    /// mapping key there (unknown or repeated key); otherwise the node there, which for a
    /// block mapping starts where its own first key does, hence the outermost node.
    pub fn path_at(&self, at: Pos, key: bool) -> Option<&str> {
        if !key {
            if let Some(n) = self.nodes.iter().find(|n| n.start == at && n.end > n.start) {
                return Some(&n.path);
            }
        }
        let node = self
            .nodes
            .iter()
            .filter(|n| contains(n, at))
            .max_by_key(|n| n.start);
        let entry = self.innermost_entry(at, key).map(|e| &e.range);
        match (node, entry) {
            (Some(n), Some(e)) if e.start > n.start => Some(&e.path),
            (Some(n), _) => Some(&n.path),
            (None, e) => e.map(|e| e.path.as_str()),
        }
    }

    /// Location of `path`, or of its nearest ancestor that exists in the document (a missing
    /// key is reported where its mapping is).
    pub fn locate(&self, path: &str) -> Option<Pos> {
        let mut p = path;
        loop {
            if let Some(e) = self.entries.iter().find(|e| e.range.path == p) {
                return Some(e.range.start);
            }
            if let Some(n) = self.nodes.iter().find(|n| n.path == p && n.end > n.start) {
                return Some(n.start);
            }
            p = &p[..p.rfind(['.', '['])?];
        }
    }

    /// The innermost entry holding `at`; for a value error (`key` false) one whose key
    /// lies before `at`, so a bad value blanks its own entry, not its first inner key.
    fn innermost_entry(&self, at: Pos, key: bool) -> Option<&Entry> {
        self.entries
            .iter()
            .filter(|e| contains(&e.range, at) && (key || e.range.start < at))
            .max_by_key(|e| e.range.start)
    }

    /// `text` with the entry an error at `at` belongs to replaced by spaces (line breaks kept,
    /// so every other line and column stays put), plus that entry's path. A block mapping
    /// left with no entries gets `{}` so it stays a mapping rather than turning into null.
    pub fn blank_entry_at(&self, text: &str, at: Pos, key: bool) -> Option<(String, String)> {
        let entry = self.innermost_entry(at, key)?;
        let r = &entry.range;
        if r.end_char < r.start_char + 2 {
            return None;
        }
        let mut chars: Vec<char> = text.chars().collect();
        for c in chars.get_mut(r.start_char..r.end_char)? {
            if *c != '\n' && *c != '\r' {
                *c = ' ';
            }
        }
        if entry.siblings == 1 && !entry.flow {
            chars[r.start_char] = '{';
            chars[r.start_char + 1] = '}';
        }
        Some((chars.into_iter().collect(), r.path.clone()))
    }
}

fn range_of(start: &Marker, end: &Marker) -> Range {
    Range {
        path: String::new(),
        start: pos(start),
        end: pos(end),
        start_char: start.index(),
        end_char: end.index(),
    }
}

fn contains(r: &Range, at: Pos) -> bool {
    r.start <= at && at < r.end
}
