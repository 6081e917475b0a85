//! Names of hosts, VMs and heartbeat paths, and the millisecond clock of the pure state machines.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Milliseconds on a monotonic clock. The pure state machines never read a clock: the caller
/// passes `now` in, so the simulator can drive them with virtual time.
pub type Millis = u64;

/// Longest accepted host or VM name (bytes).
pub const MAX_NAME_LEN: usize = 64;

/// A name that is not acceptable as a host or VM identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The name is empty.
    #[error("empty name")]
    Empty,
    /// The name is longer than [`MAX_NAME_LEN`].
    #[error("name of {0} bytes is longer than {MAX_NAME_LEN}")]
    TooLong(usize),
    /// The name holds a character outside `[A-Za-z0-9._:-]`.
    #[error("name {0:?} holds a character outside [A-Za-z0-9._:-]")]
    BadChar(String),
}

fn check_name(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > MAX_NAME_LEN {
        return Err(IdError::TooLong(s.len()));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
    {
        return Err(IdError::BadChar(s.to_string()));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Checks and wraps a name.
            ///
            /// # Errors
            /// [`IdError`] when the name is empty, too long or holds odd characters.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                check_name(&s)?;
                Ok(Self(s))
            }

            /// The name as text.
            #[must_use]
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// A host (one agent) of the pool.
    HostId
);
name_type!(
    /// A protected VM (its name-label or uuid).
    VmId
);

/// One way two agents hear each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PathId {
    /// A-link path number N (direct cable between the two hosts).
    Alink(u8),
    /// The management network (the network xapi and the quorum servers are on).
    Mgmt,
    /// The heartbeat file on shared storage.
    Storage,
}

impl fmt::Display for PathId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathId::Alink(n) => write!(f, "alink{n}"),
            PathId::Mgmt => f.write_str("mgmt"),
            PathId::Storage => f.write_str("storage"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_odd_characters_are_rejected() {
        assert!(HostId::new("host-1.pool").is_ok());
        assert_eq!(HostId::new(""), Err(IdError::Empty));
        assert!(matches!(HostId::new("a/b"), Err(IdError::BadChar(_))));
        assert!(matches!(
            VmId::new("x".repeat(65)),
            Err(IdError::TooLong(65))
        ));
        let parsed: Result<VmId, _> = serde_json::from_str("\"bad name\"");
        assert!(parsed.is_err());
    }
}
