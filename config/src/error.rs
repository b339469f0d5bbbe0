//! The pair file's errors, and how a toml/serde error or a bad value is
//! turned into one line naming the file, the line and the key.

use std::fmt;
use std::net::IpAddr;
use std::ops::Range;

/// Why the pair file was refused. Display is one line naming the file, and
/// where it applies the line and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read it: {error}")]
    Read {
        /// The path as given.
        file: String,
        /// What the OS said.
        error: std::io::Error,
    },
    /// TOML syntax, a value of the wrong type, or an unknown key.
    #[error("{file}{}: {message}", at_line(*.line))]
    Toml {
        /// The file name as given.
        file: String,
        /// 1-based, where the toml crate says.
        line: Option<usize>,
        /// The toml crate's message, prefixed with the section and key.
        message: String,
    },
    /// `[vm]` or `[hosts]` is absent.
    #[error("{file}: missing section [{section}]")]
    MissingSection {
        /// The file name as given.
        file: String,
        /// `vm` or `hosts`.
        section: &'static str,
    },
    /// A required key is absent.
    #[error("{file}:{line}: [{section}] missing key {key}: {what}")]
    MissingKey {
        /// The file name as given.
        file: String,
        /// Line of the section (or host entry) that lacks it.
        line: usize,
        /// `vm`, `hosts`, `ft`.
        section: &'static str,
        /// Key within the section, e.g. `kernel`, `b.address`.
        key: String,
        /// What it is for.
        what: &'static str,
    },
    /// A value that parsed as TOML but is not acceptable.
    #[error("{file}:{line}: [{section}] {key} = {value} {problem}")]
    Invalid {
        /// The file name as given.
        file: String,
        /// Line of the value (of the section, for a defaulted one).
        line: usize,
        /// `vm`, `hosts`, `ft`.
        section: &'static str,
        /// Key within the section, e.g. `mem`, `a.address`, `net[0].mac`.
        key: String,
        /// The value as written in TOML.
        value: String,
        /// What is wrong with it.
        problem: String,
    },
    /// `--host` names neither a nor b.
    #[error("--host {0:?}: expected a or b")]
    BadHostFlag(String),
    /// No `--host`, and neither host's address is local.
    #[error("this machine has none of the addresses in [hosts] ({a}, {b}); pass --host a|b")]
    NoLocalHost {
        /// Host a's IP.
        a: IpAddr,
        /// Host b's IP.
        b: IpAddr,
    },
    /// No `--host`, and both hosts' addresses are local.
    #[error("this machine matches both a ({a}) and b ({b}) in [hosts]; pass --host a|b")]
    BothLocal {
        /// Host a's IP.
        a: IpAddr,
        /// Host b's IP.
        b: IpAddr,
    },
}

fn at_line(line: Option<usize>) -> String {
    line.map(|l| format!(":{l}")).unwrap_or_default()
}

/// The file being parsed, for error messages.
pub(super) struct Ctx<'a> {
    pub file: &'a str,
    pub text: &'a str,
}

impl Ctx<'_> {
    /// 1-based line of byte `offset`.
    pub(super) fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        1 + self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
    }

    pub(super) fn missing_section(&self, section: &'static str) -> ConfigError {
        ConfigError::MissingSection {
            file: self.file.to_owned(),
            section,
        }
    }

    pub(super) fn missing(
        &self,
        at: &Range<usize>,
        section: &'static str,
        key: impl Into<String>,
        what: &'static str,
    ) -> ConfigError {
        ConfigError::MissingKey {
            file: self.file.to_owned(),
            line: self.line(at.start),
            section,
            key: key.into(),
            what,
        }
    }

    pub(super) fn invalid(
        &self,
        at: &Range<usize>,
        section: &'static str,
        key: impl Into<String>,
        value: impl fmt::Display,
        problem: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_owned(),
            line: self.line(at.start),
            section,
            key: key.into(),
            value: value.to_string(),
            problem: problem.into(),
        }
    }

    /// A toml/serde error, with the section and key it happened in when the
    /// message does not already name them.
    pub(super) fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let message = e.message().trim().replace('\n', " ");
        let Some(span) = e.span() else {
            return ConfigError::Toml {
                file: self.file.to_owned(),
                line: None,
                message,
            };
        };
        let mut prefix = String::new();
        if let Some(section) = section_at(self.text, span.start) {
            prefix = format!("[{section}] ");
        }
        // A value's error names the key before it; a key's error (duplicate
        // key) names the key itself unless the message already does.
        let key = key_before(self.text, span.start).or_else(|| {
            let own = self.text.get(span.clone())?;
            own.chars().all(is_bare_key_char).then_some(own)
        });
        if let Some(key) = key.filter(|k| !k.is_empty() && !message.contains(&format!("`{k}`"))) {
            prefix.push_str(&format!("{key}: "));
        }
        ConfigError::Toml {
            file: self.file.to_owned(),
            line: Some(self.line(span.start)),
            message: prefix + &message,
        }
    }
}

/// The table that byte `offset` is in: the last header (`[name]` or
/// `[[name]]`) before its line, or for an offset on a header line, that
/// header's parent. None at the top level.
fn section_at(text: &str, offset: usize) -> Option<String> {
    let before = text.get(..offset)?;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[line_start..]
        .find('\n')
        .map_or(text.len(), |i| line_start + i);
    if let Some(header) = header_name(&text[line_start..line_end]) {
        return header
            .rsplit_once('.')
            .map(|(parent, _)| parent.trim().to_owned());
    }
    before[..line_start].lines().rev().find_map(header_name)
}

/// `name` for a line `[name]` or `[[name]]` (comments allowed after it).
fn header_name(line: &str) -> Option<String> {
    let line = line.split('#').next()?.trim();
    let inner = line.strip_prefix('[')?.strip_suffix(']')?;
    let inner = inner.trim_start_matches('[').trim_end_matches(']').trim();
    let is_key = |c: char| is_bare_key_char(c) || " \"'".contains(c);
    (!inner.is_empty() && inner.chars().all(is_key)).then(|| inner.to_owned())
}

/// The key of the `key = value` whose value starts at byte `offset`, if the
/// text there has that shape.
fn key_before(text: &str, offset: usize) -> Option<&str> {
    let before = text.get(..offset)?.trim_end().strip_suffix('=')?.trim_end();
    let start = before
        .char_indices()
        .rev()
        .find(|&(_, c)| !is_bare_key_char(c))
        .map_or(0, |(i, c)| i + c.len_utf8());
    let key = &before[start..];
    (!key.is_empty()).then_some(key)
}

/// A character of a bare (or dotted) TOML key.
fn is_bare_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_-.".contains(c)
}
