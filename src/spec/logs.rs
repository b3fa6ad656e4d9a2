//! `[logs]`: where graven listens for syslog (`listen`) and where it forwards lines
//! (`[[logs.forward]]`), read and checked into the syslog module's own config types.

use serde::Deserialize;
use toml::Spanned;

use super::problem::{Issues, did_you_mean, quoted_list};
use super::raw::Field;
use crate::logs::syslog::{Endpoint, Facility, ForwardConfig, ListenConfig, WireFormat, config};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLogs {
    pub listen: Option<Field<Vec<String>>>,
    pub forward: Option<Vec<Spanned<RawForward>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawForward {
    pub to: Option<Field<String>>,
    pub format: Option<Field<String>>,
    pub services: Option<Field<Vec<String>>>,
    pub buffer: Option<Field<i64>>,
    pub facility: Option<Field<String>>,
}

/// The checked `[logs]` table: nothing to listen on and nowhere to forward when absent. A
/// deploy carries it to the control plane, which runs it (`api::syslog`).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Logs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<ListenConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forward: Vec<ForwardConfig>,
}

impl Logs {
    pub fn is_empty(&self) -> bool {
        self.listen.is_none() && self.forward.is_empty()
    }
}

fn endpoint(text: &str) -> Result<Endpoint, String> {
    // The syslog error names the address already; the problem names the field.
    Endpoint::parse(text).map_err(|e| e.to_string())
}

pub(crate) fn check(
    raw: Option<&Spanned<RawLogs>>,
    services: &[&str],
    issues: &mut Issues,
) -> Logs {
    let mut logs = Logs::default();
    let Some(raw) = raw.map(Spanned::get_ref) else {
        return logs;
    };
    if let Some(field) = &raw.listen {
        match &field.value {
            Err(message) => issues.push(field.span.clone(), "logs.listen", message),
            Ok(addresses) => {
                let mut checked = Vec::new();
                for address in addresses {
                    match endpoint(address).and_then(|e| {
                        e.listen_addr().map_err(|e| e.to_string())?;
                        Ok(e)
                    }) {
                        Ok(e) => checked.push(e),
                        Err(message) => issues.push(field.span.clone(), "logs.listen", message),
                    }
                }
                logs.listen = Some(ListenConfig {
                    addresses: checked,
                    max_message: config::DEFAULT_MAX_MESSAGE,
                });
            }
        }
    }
    for (i, forward) in raw.forward.iter().flatten().enumerate() {
        let prefix = format!("logs.forward[{i}]");
        let f = forward.get_ref();
        let field = |name: &str| format!("{prefix}.{name}");
        let to = match &f.to {
            None => {
                issues.push(
                    forward.span(),
                    &prefix,
                    "missing field \"to\": the syslog server, e.g. to = \"tcp://logs.example.com:514\"",
                );
                continue;
            }
            Some(to) => match to
                .value
                .as_ref()
                .map_err(String::clone)
                .and_then(|t| endpoint(t))
            {
                Ok(e) => e,
                Err(message) => {
                    issues.push(to.span.clone(), field("to"), message);
                    continue;
                }
            },
        };
        let mut checked = ForwardConfig::new(to);
        if let Some(format) = &f.format {
            match format.value.as_ref().map(|v| WireFormat::parse(v)) {
                Ok(Some(w)) => checked.format = w,
                Ok(None) => issues.push(
                    format.span.clone(),
                    field("format"),
                    "the format must be \"rfc5424\" or \"rfc3164\"",
                ),
                Err(message) => issues.push(format.span.clone(), field("format"), message),
            }
        }
        if let Some(names) = &f.services {
            match &names.value {
                Ok(names) => {
                    for name in names {
                        if !services.contains(&name.as_str()) {
                            issues.push(
                                names_span(f),
                                field("services"),
                                format!(
                                    "no service {name:?} in [services] (known: {}){}",
                                    quoted_list(services.iter().copied()),
                                    did_you_mean(name, services.iter().copied())
                                ),
                            );
                        }
                    }
                    checked.services = names.clone();
                }
                Err(message) => issues.push(names.span.clone(), field("services"), message),
            }
        }
        if let Some(buffer) = &f.buffer {
            match buffer.value {
                Ok(n) if (1..=100_000_000).contains(&n) => checked.buffer = n as usize,
                Ok(n) => issues.push(
                    buffer.span.clone(),
                    field("buffer"),
                    format!("{n} is out of range: it must be between 1 and 100000000 lines"),
                ),
                Err(ref message) => issues.push(buffer.span.clone(), field("buffer"), message),
            }
        }
        if let Some(facility) = &f.facility {
            match facility.value.as_ref().map(|v| Facility::from_name(v)) {
                Ok(Some(code)) => checked.facility = code,
                Ok(None) => issues.push(
                    facility.span.clone(),
                    field("facility"),
                    "the facility must be a syslog facility name, e.g. \"user\" or \"local0\"",
                ),
                Err(message) => issues.push(facility.span.clone(), field("facility"), message),
            }
        }
        logs.forward.push(checked);
    }
    logs
}

fn names_span(f: &RawForward) -> std::ops::Range<usize> {
    f.services.as_ref().map_or(0..0, |s| s.span.clone())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    fn check(logs: &str, expected: expect_test::Expect) {
        let source = format!("app = \"a\"\n[services.web]\nport = 1\n{logs}");
        let got = match super::super::parse(
            &source,
            Path::new("/app/graven.toml"),
            Path::new("/app"),
            "local",
        ) {
            Ok(p) => format!(
                "listen {:?}\n{}",
                p.logs.listen.map(|l| l
                    .addresses
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()),
                p.logs
                    .forward
                    .iter()
                    .map(|f| format!(
                        "forward {} {:?} {:?} buffer {} facility {}",
                        f.to, f.format, f.services, f.buffer, f.facility
                    ))
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
            Err(e) => e.to_string(),
        };
        expected.assert_eq(&got);
    }

    #[test]
    fn logs_keys() {
        check(
            "",
            expect_test::expect![[r#"
            listen None
        "#]],
        );
        check(
            r#"
[logs]
listen = ["udp://127.0.0.1:5514", "tcp://[::1]:5514"]
[[logs.forward]]
to = "tcp://logs.example.com:514"
[[logs.forward]]
to = "udp://10.0.0.1:514"
format = "rfc3164"
services = ["web"]
buffer = 500
facility = "local3"
"#,
            expect_test::expect![[r#"
                listen Some(["udp://127.0.0.1:5514", "tcp://[::1]:5514"])
                forward tcp://logs.example.com:514 Rfc5424 [] buffer 100000 facility user
                forward udp://10.0.0.1:514 Rfc3164 ["web"] buffer 500 facility local3"#]],
        );
    }

    #[test]
    fn bad_logs_keys_are_all_reported() {
        check(
            r#"
[logs]
listen = ["http://127.0.0.1:80", "tcp://example.com:514"]
[[logs.forward]]
to = "tcp://logs.example.com"
[[logs.forward]]
to = "udp://x:1"
format = "json"
services = ["wbe"]
buffer = 0
facility = "locl0"
[[logs.forward]]
format = "rfc5424"
"#,
            expect_test::expect![[r#"
                /app/graven.toml:6:10: logs.listen: bad syslog address "http://127.0.0.1:80": the scheme must be tcp or udp
                /app/graven.toml:8:6: logs.forward[0].to: bad syslog address "tcp://logs.example.com": a port is required
                /app/graven.toml:11:10: logs.forward[1].format: the format must be "rfc5424" or "rfc3164"
                /app/graven.toml:12:12: logs.forward[1].services: no service "wbe" in [services] (known: "web"); did you mean "web"?
                /app/graven.toml:13:10: logs.forward[1].buffer: 0 is out of range: it must be between 1 and 100000000 lines
                /app/graven.toml:14:12: logs.forward[1].facility: the facility must be a syslog facility name, e.g. "user" or "local0"
                /app/graven.toml:15:1: logs.forward[2]: missing field "to": the syslog server, e.g. to = "tcp://logs.example.com:514""#]],
        );
        check(
            "[[logs.forward]]\nto = \"tcp://x:1\"\ntx = 1\n",
            expect_test::expect![
                "/app/graven.toml:6:1: unknown field `tx`, expected one of `to`, `format`, `services`, `buffer`, `facility`"
            ],
        );
    }
}
