//! Content digests: `sha256:` followed by 64 lowercase hex digits.

use std::fmt;
use std::io;
use std::path::Path;

use sha2::Digest as _;

#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{value:?} is not a digest: {reason}")]
pub struct DigestError {
    pub value: String,
    pub reason: &'static str,
}

impl Digest {
    pub fn of(bytes: &[u8]) -> Digest {
        Digest::from_sha256(sha2::Sha256::digest(bytes).into())
    }

    pub fn from_sha256(hash: [u8; 32]) -> Digest {
        Digest(format!("sha256:{}", hex::encode(hash)))
    }

    pub fn of_file(path: &Path) -> io::Result<Digest> {
        Ok(crate::store::digest_reader(std::fs::File::open(path)?)?.0)
    }

    pub fn parse(value: &str) -> Result<Digest, DigestError> {
        let err = |reason| DigestError {
            value: value.to_owned(),
            reason,
        };
        let hex = value
            .strip_prefix("sha256:")
            .ok_or_else(|| err("it must start with sha256:"))?;
        if hex.len() != 64 {
            return Err(err("a sha256 digest has 64 hex digits"));
        }
        if !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(err("it may hold only lowercase hex digits"));
        }
        Ok(Digest(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn algorithm(&self) -> &str {
        "sha256"
    }

    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    /// The first 12 hex digits, as listings show them.
    pub fn short(&self) -> &str {
        &self.hex()[..12]
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Digest {
    type Error = DigestError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Digest::parse(&value)
    }
}

impl From<Digest> for String {
    fn from(digest: Digest) -> String {
        digest.0
    }
}

impl std::str::FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let good = Digest::of(b"");
        assert_eq!(
            good.as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(Digest::parse(good.as_str()).unwrap(), good);
        for bad in [
            "",
            "sha256:",
            "md5:abc",
            &format!("sha256:{}", "A".repeat(64)),
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
