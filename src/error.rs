//! The library's error type: every failure a user can cause names the input and what to do.

use std::path::PathBuf;

/// Errors returned by the `dalle` library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("unknown preset `{name}`: valid presets are {valid}")]
    UnknownPreset { name: String, valid: String },

    #[error("invalid config: `{field}` {message}")]
    Config { field: String, message: String },

    // The io error is part of the message, not a `source`, so `{:#}` does not print it twice.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    #[error("{path}: {message}")]
    Input { path: PathBuf, message: String },

    #[error("dataset {path}: {message}")]
    Dataset { path: PathBuf, message: String },

    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },

    #[error("{0}")]
    Usage(String),

    #[error(transparent)]
    Runtime(#[from] dalle_runtimes::RuntimeError),

    #[error(transparent)]
    Export(#[from] dalle_export::ExportError),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias for the `dalle` library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }

    pub(crate) fn input(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Input {
            path: path.into(),
            message: message.into(),
        }
    }

    pub(crate) fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            message: message.into(),
        }
    }

    pub(crate) fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            message: message.into(),
        }
    }
}
