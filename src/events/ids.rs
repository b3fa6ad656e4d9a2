//! The names the log gives things, as types: a service, an instance, a release number and the
//! runtime's id of an instance. Each is a newtype so that a release number cannot be passed
//! where an instance count is meant, and a runtime id cannot be taken for the controller's
//! own instance name. They serialize as the bare string or number, so the log's JSON is what
//! it was when they were plain `String`s and `u64`s.

use std::borrow::Borrow;
use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        // Shown as the string it is, as it was when ids were plain strings.
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl $name {
            pub fn new(name: impl Into<String>) -> $name {
                $name(name.into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(&self.0)
            }
        }

        // Read as the string it is wherever a `&str` is asked for.
        impl std::ops::Deref for $name {
            type Target = str;

            fn deref(&self) -> &str {
                &self.0
            }
        }

        // Maps keyed by the id can be looked up with a plain `&str`.
        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl From<&str> for $name {
            fn from(name: &str) -> $name {
                $name(name.to_owned())
            }
        }

        impl From<String> for $name {
            fn from(name: String) -> $name {
                $name(name)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

string_id!(
    /// A service's name in graven.toml (`web`).
    ServiceName
);

string_id!(
    /// The name the controller gives an instance (`web-7`), unique within its app and
    /// environment and never used twice there.
    InstanceName
);

string_id!(
    /// What the runtime calls an instance; opaque to the log.
    RuntimeId
);

/// A release's number: 1, 2, 3… per app and environment, across its services, never reused.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ReleaseNumber(pub u64);

impl fmt::Debug for ReleaseNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl ReleaseNumber {
    pub fn get(self) -> u64 {
        self.0
    }

    pub fn next(self) -> ReleaseNumber {
        ReleaseNumber(self.0 + 1)
    }
}

impl fmt::Display for ReleaseNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl From<u64> for ReleaseNumber {
    fn from(number: u64) -> ReleaseNumber {
        ReleaseNumber(number)
    }
}

impl PartialEq<u64> for ReleaseNumber {
    fn eq(&self, other: &u64) -> bool {
        self.0 == *other
    }
}
