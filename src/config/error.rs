//! Configuration errors: every one names the file, and where it can, the line and column.

use std::fmt;
use std::path::{Path, PathBuf};

/// A place in a configuration file, 1-based.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub path: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl Location {
    /// Turns a byte offset into `source` into a line and column.
    pub fn from_offset(path: &Path, source: &str, offset: usize) -> Self {
        let offset = offset.min(source.len());
        let before = &source[..floor_char_boundary(source, offset)];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        Location {
            path: path.to_path_buf(),
            line,
            column,
        }
    }

    /// The start of a file, for errors that belong to the file as a whole.
    pub fn file(path: &Path) -> Self {
        Location {
            path: path.to_path_buf(),
            line: 1,
            column: 1,
        }
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.path.display(), self.line, self.column)
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not have the expected shape.
    #[error("{at}: {reason}")]
    Syntax { at: Location, reason: String },
    /// The file parses, but a value is wrong or refers to something that does not exist.
    #[error("{at}: {reason}")]
    Invalid {
        at: Location,
        reason: String,
        #[source]
        source: Option<BoxError>,
    },
}

impl ConfigError {
    pub fn invalid(at: Location, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            at,
            reason: reason.into(),
            source: None,
        }
    }

    pub fn invalid_because(
        at: Location,
        reason: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        ConfigError::Invalid {
            at,
            reason: reason.into(),
            source: Some(source.into()),
        }
    }

    /// Where the error is, if it has a place in a file.
    pub fn location(&self) -> Option<&Location> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Syntax { at, .. } | ConfigError::Invalid { at, .. } => Some(at),
        }
    }

    /// Parses TOML into `T`, turning toml's error into one with file:line:column.
    pub fn parse_toml<T: serde::de::DeserializeOwned>(
        path: &Path,
        source: &str,
    ) -> Result<T, ConfigError> {
        toml::from_str(source).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            ConfigError::Syntax {
                at: Location::from_offset(path, source, offset),
                reason: e.message().trim().to_string(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_become_one_based_lines_and_columns() {
        let src = "a = 1\nbb = 2\n";
        let at = Location::from_offset(Path::new("f.toml"), src, 7);
        assert_eq!((at.line, at.column), (2, 2));
        assert_eq!(at.to_string(), "f.toml:2:2");
    }
}
