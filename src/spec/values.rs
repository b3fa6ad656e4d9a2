//! The human forms `graven.toml` accepts for durations, sizes, CPU shares, routes and names,
//! each parsed into a plain value or a message saying what would be accepted instead.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use toml::Value;

use super::RouteKind;
use super::raw::describe;
use crate::size;

/// `"500ms"`, `"1s"`, `"2m"`, `"1h 30m"` (humantime's syntax).
pub(crate) fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|_| format!("{text:?} is not a duration (try \"1s\", \"500ms\")"))
}

/// A size in bytes: an integer, or a string with a unit (see [`crate::size::parse`]).
pub(crate) fn size(value: &Value) -> Result<u64, String> {
    match value {
        Value::Integer(bytes) => {
            u64::try_from(*bytes).map_err(|_| format!("{bytes} is not a size {}", size::HINT))
        }
        Value::String(text) => size::parse(text),
        other => Err(format!(
            "expected a size such as \"64MiB\", found {}",
            describe(other)
        )),
    }
}

/// A size limit: larger than zero.
pub fn nonzero_size(bytes: u64) -> Result<u64, String> {
    match bytes {
        0 => Err("a size limit must be larger than zero".to_owned()),
        bytes => Ok(bytes),
    }
}

/// CPU in thousandths of a core: a number of cores (`0.5`, `2`) or millicores (`"500m"`).
pub(crate) fn cpu_millis(value: &Value) -> Result<u64, String> {
    let millis = match value {
        Value::Integer(cores) => cores.checked_mul(1000).map(|m| m as f64),
        Value::Float(cores) if cores.is_finite() => Some((cores * 1000.0).round()),
        Value::String(text) => text
            .trim()
            .strip_suffix('m')
            .and_then(|m| m.parse::<u64>().ok())
            .map(|m| m as f64),
        _ => None,
    };
    match millis {
        Some(m) if m >= 1.0 && m <= u64::MAX as f64 => Ok(m as u64),
        Some(_) => Err(format!(
            "{} is not a cpu share: it must be at least 0.001 cores",
            value
        )),
        None => Err(format!(
            "expected cores (0.5, 2) or millicores (\"500m\"), found {}",
            describe(value)
        )),
    }
}

/// A route as written: an optional kind, `http://` (the default) or `tcp://`, then
/// `IP:PORT` or `[IPv6]:PORT`, or `:PORT` for 127.0.0.1, which keeps a service private to the
/// machine unless an address is written out. Port 0 asks for a free port.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Route {
    pub kind: RouteKind,
    pub listen: SocketAddr,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            RouteKind::Http => write!(f, "{}", self.listen),
            RouteKind::Tcp => write!(f, "tcp://{}", self.listen),
        }
    }
}

pub(crate) fn route(text: &str) -> Result<Route, String> {
    let (kind, address) = match text.split_once("://") {
        Some(("http", address)) => (RouteKind::Http, address),
        Some(("tcp", address)) => (RouteKind::Tcp, address),
        Some((scheme, _)) => {
            return Err(format!(
                "{text:?} is not a route: {scheme}:// is not a kind of route; write http:// \
                 (the default) or tcp://"
            ));
        }
        None => (RouteKind::Http, text),
    };
    let listen = match address.strip_prefix(':').map(str::parse::<u16>) {
        Some(Ok(port)) => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
        _ => address.parse().map_err(|_| {
            format!(
                "{text:?} is not a route: write IP:PORT, e.g. \"127.0.0.1:8000\", \":8000\" \
                 or \"tcp://:5432\""
            )
        })?,
    };
    Ok(Route { kind, listen })
}

/// Whether two routes would need the same listening socket.
pub(crate) fn routes_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// App, service, environment and volume names become DNS labels
/// (`web.production.graven`), so they follow RFC 1123's label rules.
pub(crate) fn dns_label(kind: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{kind} name {name:?} must be a DNS label: 1 to 63 lowercase letters, digits or '-', \
             not starting or ending with '-'"
        ))
    }
}

/// A service name as SRV records carry it (`_postgresql._tcp`): RFC 6335's rules, 1 to 15
/// lowercase letters, digits or '-', at least one letter, no '-' at either end or twice in a
/// row.
pub(crate) fn srv_name(name: &str) -> Result<(), String> {
    let ok = (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not an SRV service name: 1 to 15 lowercase letters, digits or '-', \
             with a letter, no '-' at either end or twice in a row (RFC 6335; e.g. \"postgresql\")"
        ))
    }
}

/// Environment variable names as POSIX shells accept them.
pub(crate) fn env_key(key: &str) -> Result<(), String> {
    let mut bytes = key.bytes();
    let ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !ok {
        return Err(format!(
            "{key:?} is not a valid environment variable name (letters, digits and '_', \
             not starting with a digit)"
        ));
    }
    if key == "PORT" {
        return Err("PORT is set by graven from the service's `port`; set `port` instead".into());
    }
    Ok(())
}

/// An env value as written: a plain string, or `{ secret = "name" }`, which names a secret
/// of the app's environment (its value is never in `graven.toml`, nor in a release).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EnvValue {
    Plain(String),
    Secret(String),
}

pub(crate) fn env_value(value: &toml::Value) -> Result<EnvValue, String> {
    const FORM: &str = "a string, or { secret = \"name\" } for a secret";
    let table = match value {
        toml::Value::String(text) => return Ok(EnvValue::Plain(text.clone())),
        toml::Value::Table(table) => table,
        other => {
            return Err(format!(
                "expected {FORM}, found {}",
                super::raw::describe(other)
            ));
        }
    };
    if let Some(key) = table.keys().find(|key| key.as_str() != "secret") {
        let hint = match super::problem::did_you_mean(key, ["secret"]) {
            hint if hint.is_empty() => ": it has one field, { secret = \"name\" }".to_owned(),
            hint => hint,
        };
        return Err(format!("unknown field {key:?} in a secret reference{hint}"));
    }
    match table.get("secret") {
        Some(toml::Value::String(name)) => crate::secrets::check_name(name)
            .map(|()| EnvValue::Secret(name.clone()))
            .map_err(|error| error.to_string()),
        Some(other) => Err(format!(
            "a secret reference names the secret with a string, found {}",
            super::raw::describe(other)
        )),
        None => Err(format!("expected {FORM}, found an empty table")),
    }
}

/// An absolute path inside an instance, without `..` (a mount must not escape its parent).
/// A user as USER writes it: `name[:group]` or `uid[:gid]`. Whether it exists is the image's
/// to say, at deploy.
pub(crate) fn user(text: &String) -> Result<String, String> {
    let parts: Vec<&str> = text.split(':').collect();
    let part_ok = |p: &&str| !p.is_empty() && !p.contains(char::is_whitespace);
    if parts.len() > 2 || !parts.iter().all(part_ok) {
        return Err(format!(
            "{text:?} is not a user: write name[:group] or uid[:gid], e.g. \"www-data\""
        ));
    }
    Ok(text.clone())
}

pub(crate) fn mount_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} is not an absolute path"));
    }
    if path == "/" || path.split('/').any(|part| part == "..") {
        return Err(format!("{path:?} cannot be a mount point"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{Expect, expect};

    fn check(results: Vec<String>, expected: Expect) {
        expected.assert_eq(&results.join("\n"));
    }

    fn show<T: std::fmt::Debug>(
        input: impl std::fmt::Display,
        result: Result<T, String>,
    ) -> String {
        match result {
            Ok(value) => format!("{input} -> {value:?}"),
            Err(message) => format!("{input} -> error: {message}"),
        }
    }

    #[test]
    fn durations() {
        let inputs = ["500ms", "1s", "2m", "1h 30m", " 3s ", "1x", "", "-1s", "10"];
        check(
            inputs
                .iter()
                .map(|i| show(format!("{i:?}"), duration(i)))
                .collect(),
            expect![[r#"
                "500ms" -> 500ms
                "1s" -> 1s
                "2m" -> 120s
                "1h 30m" -> 5400s
                " 3s " -> 3s
                "1x" -> error: "1x" is not a duration (try "1s", "500ms")
                "" -> error: "" is not a duration (try "1s", "500ms")
                "-1s" -> error: "-1s" is not a duration (try "1s", "500ms")
                "10" -> error: "10" is not a duration (try "1s", "500ms")"#]],
        );
    }

    #[test]
    fn sizes() {
        let inputs = [
            Value::from("64MiB"),
            Value::from("512M"),
            Value::from("512m"),
            Value::from("1G"),
            Value::from("1 GB"),
            Value::from("10KB"),
            Value::from("100"),
            Value::from(4096),
            Value::from(-1),
            Value::from("1.5G"),
            Value::from("12 parsecs"),
            Value::from("99999999999T"),
            Value::from(true),
        ];
        check(
            inputs.iter().map(|i| show(i, size(i))).collect(),
            expect![[r#"
                "64MiB" -> 67108864
                "512M" -> 536870912
                "512m" -> 536870912
                "1G" -> 1073741824
                "1 GB" -> 1000000000
                "10KB" -> 10000
                "100" -> 100
                4096 -> 4096
                -1 -> error: -1 is not a size (try "64MiB", "512M", "1G")
                "1.5G" -> error: "1.5G" is not a size (try "64MiB", "512M", "1G")
                "12 parsecs" -> error: "12 parsecs" is not a size (try "64MiB", "512M", "1G")
                "99999999999T" -> error: "99999999999T" is not a size (try "64MiB", "512M", "1G")
                true -> error: expected a size such as "64MiB", found boolean true"#]],
        );
    }

    #[test]
    fn cpu() {
        let inputs = [
            Value::from(2),
            Value::from(0.5),
            Value::from("250m"),
            Value::from(0),
            Value::from(0.0001),
            Value::from("2"),
            Value::from(-1),
        ];
        check(
            inputs.iter().map(|i| show(i, cpu_millis(i))).collect(),
            expect![[r#"
                2 -> 2000
                0.5 -> 500
                "250m" -> 250
                0 -> error: 0 is not a cpu share: it must be at least 0.001 cores
                0.0001 -> error: 0.0001 is not a cpu share: it must be at least 0.001 cores
                "2" -> error: expected cores (0.5, 2) or millicores ("500m"), found string "2"
                -1 -> error: -1 is not a cpu share: it must be at least 0.001 cores"#]],
        );
    }

    #[test]
    fn routes() {
        let inputs = [
            "127.0.0.1:8000",
            ":8000",
            "0.0.0.0:80",
            "[::1]:8080",
            "127.0.0.1:0",
            "tcp://:5432",
            "http://0.0.0.0:80",
            "udp://:53",
            "localhost:8000",
            "8000",
            ":99999",
            "",
        ];
        check(
            inputs
                .iter()
                .map(|i| show(format!("{i:?}"), route(i)))
                .collect(),
            expect![[r#"
                "127.0.0.1:8000" -> 127.0.0.1:8000
                ":8000" -> 127.0.0.1:8000
                "0.0.0.0:80" -> 0.0.0.0:80
                "[::1]:8080" -> [::1]:8080
                "127.0.0.1:0" -> 127.0.0.1:0
                "tcp://:5432" -> tcp://127.0.0.1:5432
                "http://0.0.0.0:80" -> 0.0.0.0:80
                "udp://:53" -> error: "udp://:53" is not a route: udp:// is not a kind of route; write http:// (the default) or tcp://
                "localhost:8000" -> error: "localhost:8000" is not a route: write IP:PORT, e.g. "127.0.0.1:8000", ":8000" or "tcp://:5432"
                "8000" -> error: "8000" is not a route: write IP:PORT, e.g. "127.0.0.1:8000", ":8000" or "tcp://:5432"
                ":99999" -> error: ":99999" is not a route: write IP:PORT, e.g. "127.0.0.1:8000", ":8000" or "tcp://:5432"
                "" -> error: "" is not a route: write IP:PORT, e.g. "127.0.0.1:8000", ":8000" or "tcp://:5432""#]],
        );
    }

    #[test]
    fn overlapping_routes() {
        let r = |s: &str| route(s).unwrap().listen;
        assert!(routes_overlap(r(":8000"), r("127.0.0.1:8000")));
        assert!(routes_overlap(r("0.0.0.0:8000"), r("127.0.0.1:8000")));
        assert!(!routes_overlap(r("127.0.0.2:8000"), r("127.0.0.1:8000")));
        assert!(!routes_overlap(r(":8000"), r(":8001")));
        // One socket whatever the kind of route.
        assert!(routes_overlap(r("tcp://:8000"), r(":8000")));
        // Port 0 asks for a free port, so two of them never collide.
        assert!(!routes_overlap(r(":0"), r(":0")));
    }

    #[test]
    fn names_and_keys() {
        let labels = [
            "web",
            "api-2",
            "a",
            "Web",
            "-web",
            "web-",
            "we_b",
            "",
            &"x".repeat(64),
        ];
        let keys = ["GREETING", "_x", "a1", "1A", "A-B", "", "PORT"];
        let paths = ["/data", "/var/lib/db", "data", "/", "/a/../b"];
        let mut lines: Vec<String> = labels
            .iter()
            .map(|l| show(format!("{l:?}"), dns_label("service", l)))
            .collect();
        lines.extend(keys.iter().map(|k| show(format!("{k:?}"), env_key(k))));
        lines.extend(paths.iter().map(|p| show(format!("{p:?}"), mount_path(p))));
        check(
            lines,
            expect![[r#"
                "web" -> ()
                "api-2" -> ()
                "a" -> ()
                "Web" -> error: service name "Web" must be a DNS label: 1 to 63 lowercase letters, digits or '-', not starting or ending with '-'
                "-web" -> error: service name "-web" must be a DNS label: 1 to 63 lowercase letters, digits or '-', not starting or ending with '-'
                "web-" -> error: service name "web-" must be a DNS label: 1 to 63 lowercase letters, digits or '-', not starting or ending with '-'
                "we_b" -> error: service name "we_b" must be a DNS label: 1 to 63 lowercase letters, digits or '-', not starting or ending with '-'
                "" -> error: service name "" must be a DNS label: 1 to 63 lowercase letters, digits or '-', not starting or ending with '-'
                "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" -> error: service name "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" must be a DNS label: 1 to 63 lowercase letters, digits or '-', not starting or ending with '-'
                "GREETING" -> ()
                "_x" -> ()
                "a1" -> ()
                "1A" -> error: "1A" is not a valid environment variable name (letters, digits and '_', not starting with a digit)
                "A-B" -> error: "A-B" is not a valid environment variable name (letters, digits and '_', not starting with a digit)
                "" -> error: "" is not a valid environment variable name (letters, digits and '_', not starting with a digit)
                "PORT" -> error: PORT is set by graven from the service's `port`; set `port` instead
                "/data" -> ()
                "/var/lib/db" -> ()
                "data" -> error: "data" is not an absolute path
                "/" -> error: "/" cannot be a mount point
                "/a/../b" -> error: "/a/../b" cannot be a mount point"#]],
        );
    }
}
