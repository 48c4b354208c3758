//! `ConfigError`: one problem found in a config file, with the YAML path it concerns and,
//! when the parser could tell, the line and column. Every stage (YAML syntax, schema,
//! semantic checks) reports through this one type so `fpmgate check` prints them uniformly.

use std::fmt::Write as _;

/// One configuration problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", render(.path, *.location, .message))]
pub struct ConfigError {
    /// YAML path of the offending node, e.g. `vhosts[0].pool` or `pools.php82.timeouts.read`;
    /// empty for whole-file problems (unreadable file, syntax error outside any key).
    pub path: String,
    /// 1-based `(line, column)` in the config file, when known.
    pub location: Option<(usize, usize)>,
    /// What is wrong, in words meant for the person editing the file.
    pub message: String,
}

impl ConfigError {
    /// An error at `path` whose location is not (yet) known.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            location: None,
            message: message.into(),
        }
    }

    /// The same error pinned to a 1-based `(line, column)`; `None` leaves it unlocated.
    #[must_use]
    pub fn at(mut self, location: Option<(usize, usize)>) -> Self {
        self.location = location;
        self
    }
}

/// `line:col: path: message`, dropping the parts that are unknown. Control characters
/// (they can come from the file itself) are escaped so one error stays one terminal line.
fn render(path: &str, location: Option<(usize, usize)>, message: &str) -> String {
    let mut out = String::new();
    if let Some((line, col)) = location {
        let _ = write!(out, "{line}:{col}: ");
    }
    if !path.is_empty() {
        push_clean(&mut out, path);
        out.push_str(": ");
    }
    push_clean(&mut out, message);
    out
}

/// Appends `text` with control characters escaped (`\n`, `\u{1b}`, ...).
pub(crate) fn push_clean(out: &mut String, text: &str) {
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
}
