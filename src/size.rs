//! Sizes as people write them (`512M`, `1GiB`, `64MB`): the one parser for `graven.toml`, the
//! command line and graven's environment settings, so a size means the same everywhere. Pure;
//! names no other module, so every layer may use it.

/// What a size looks like, for messages.
pub const HINT: &str = "(try \"64MiB\", \"512M\", \"1G\")";

/// A size written out: a number of bytes with an optional unit. `B`; `KB`, `MB`, `GB`, `TB`
/// are decimal (SI); `KiB`/`Ki`, `MiB`/`Mi`, … and bare `K`, `M`, `G`, `T` are binary, as
/// Docker reads `512m`. Units are case-insensitive. `graven.toml`, the command line and
/// `GRAVEN_MAX_IMAGE_SIZE` all read sizes with this.
pub fn parse(text: &str) -> Result<u64, String> {
    let bad = || format!("{text:?} is not a size {HINT}");
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(digits_end);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "k" | "ki" | "kib" => 1 << 10,
        "m" | "mi" | "mib" => 1 << 20,
        "g" | "gi" | "gib" => 1 << 30,
        "t" | "ti" | "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    number.checked_mul(multiplier).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        for (text, expected) in [
            ("0", Some(0)),
            ("1024", Some(1024)),
            ("512M", Some(512 << 20)),
            ("16G", Some(16 << 30)),
            ("2 GiB", Some(2 << 30)),
            ("1t", Some(1 << 40)),
            ("1KB", Some(1000)),
            ("", None),
            ("G", None),
            ("1.5G", None),
            ("-1", None),
            ("99999999999T", None),
        ] {
            assert_eq!(parse(text).ok(), expected, "{text:?}");
        }
    }
}
