//! [`Secret`]: a value that must never be printed, and [`MASK`], what is
//! printed instead.

use std::fmt;

use serde::{Serialize, Serializer};

/// What secrets are replaced with wherever they are printed.
pub const MASK: &str = "[masked]";

/// A value that must never be printed: `Debug`, `Display` and `Serialize` all
/// give [`MASK`], so a secret cannot reach a log line or the printed
/// configuration by accident.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that needs it (auth, connecting).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the secret is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

impl Serialize for Secret {
    /// An unset (empty) secret prints as empty: printed as the mask, it
    /// would read back as a secret that is set, to the mask.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.0.is_empty() {
            serializer.serialize_str("")
        } else {
            serializer.serialize_str(MASK)
        }
    }
}
