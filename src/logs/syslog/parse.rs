//! Incoming messages: RFC 5424, and RFC 3164 as rsyslog and the BSD syslogs send it (loose:
//! the timestamp, the host name and the tag may each be missing). Pure: the receive time is
//! an argument.

use std::time::SystemTime;

use super::framing::BadInput;
use super::{Facility, Severity, time};

/// A message's fields, before the listener adds the receive time and the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub timestamp: Option<SystemTime>,
    pub hostname: Option<String>,
    pub app_name: Option<String>,
    pub procid: Option<String>,
    pub msgid: Option<String>,
    pub severity: Severity,
    pub facility: Facility,
    pub structured_data: Option<String>,
    pub message: Vec<u8>,
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Reads one message (the frame's bytes, without framing). A PRI missing or out of range,
/// bytes that are not UTF-8 or a malformed RFC 5424 header are refused, by kind.
pub fn parse(frame: &[u8], now: SystemTime) -> Result<Parsed, BadInput> {
    let frame = trim_end(frame);
    let (pri, rest) = pri(frame)?;
    if std::str::from_utf8(rest).is_err() {
        return Err(BadInput::InvalidUtf8);
    }
    let severity = Severity::from_code(pri % 8).ok_or(BadInput::Pri)?;
    let facility = Facility::new(pri / 8).ok_or(BadInput::Pri)?;
    match rest.strip_prefix(b"1 ") {
        Some(rest) => rfc5424(rest, severity, facility),
        None => Ok(rfc3164(rest, severity, facility, now)),
    }
}

fn trim_end(mut frame: &[u8]) -> &[u8] {
    while let [rest @ .., b'\n' | b'\r' | b'\0'] = frame {
        frame = rest;
    }
    frame
}

/// `<PRIVAL>`, 1 to 3 digits, 0 to 191 (RFC 5424 §6.2.1).
fn pri(frame: &[u8]) -> Result<(u8, &[u8]), BadInput> {
    let inner = frame.strip_prefix(b"<").ok_or(BadInput::Pri)?;
    let n = inner.iter().take_while(|b| b.is_ascii_digit()).count();
    if n == 0 || n > 3 || inner.get(n) != Some(&b'>') {
        return Err(BadInput::Pri);
    }
    let value: u32 = inner[..n]
        .iter()
        .fold(0, |a, b| a * 10 + u32::from(b - b'0'));
    if value > 191 {
        return Err(BadInput::Pri);
    }
    Ok((value as u8, &inner[n + 1..]))
}

/// The next space-separated header field; `-` is the nil value.
fn field<'a>(rest: &mut &'a [u8]) -> Result<Option<&'a str>, BadInput> {
    let end = rest
        .iter()
        .position(|&b| b == b' ')
        .ok_or(BadInput::Malformed)?;
    let value = &rest[..end];
    *rest = &rest[end + 1..];
    if value.is_empty() || !value.iter().all(u8::is_ascii_graphic) {
        return Err(BadInput::Malformed);
    }
    // Checked ASCII just above.
    let value = std::str::from_utf8(value).map_err(|_| BadInput::Malformed)?;
    Ok((value != "-").then_some(value))
}

fn rfc5424(mut rest: &[u8], severity: Severity, facility: Facility) -> Result<Parsed, BadInput> {
    let timestamp = match field(&mut rest)? {
        None => None,
        Some(t) => Some(time::parse_rfc3339(t).ok_or(BadInput::Malformed)?),
    };
    let hostname = field(&mut rest)?.map(str::to_owned);
    let app_name = field(&mut rest)?.map(str::to_owned);
    let procid = field(&mut rest)?.map(str::to_owned);
    let msgid = field(&mut rest)?.map(str::to_owned);
    let (structured_data, rest) = if let Some(after) = rest.strip_prefix(b"-") {
        (None, after)
    } else {
        let end = sd_end(rest).ok_or(BadInput::Malformed)?;
        let sd = std::str::from_utf8(&rest[..end]).map_err(|_| BadInput::InvalidUtf8)?;
        (Some(sd.to_owned()), &rest[end..])
    };
    let message = match rest {
        [] => &[][..],
        [b' ', msg @ ..] => msg.strip_prefix(BOM).unwrap_or(msg),
        _ => return Err(BadInput::Malformed),
    };
    Ok(Parsed {
        timestamp,
        hostname,
        app_name,
        procid,
        msgid,
        severity,
        facility,
        structured_data,
        message: message.to_vec(),
    })
}

/// Where the structured data ends: one or more `[ID PARAM="VALUE"...]` elements, `\` escaping
/// inside the quotes.
fn sd_end(s: &[u8]) -> Option<usize> {
    let mut i = 0;
    while s.get(i) == Some(&b'[') {
        i += 1;
        let mut quoted = false;
        loop {
            match *s.get(i)? {
                b'\\' if quoted => i += 1,
                b'"' => quoted = !quoted,
                b']' if !quoted => break,
                _ => {}
            }
            i += 1;
        }
        i += 1;
    }
    (i > 0).then_some(i)
}

fn is_hostname(token: &[u8]) -> bool {
    !token.is_empty()
        && token
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'))
}

/// RFC 3164 read loosely, as rsyslog's own parser does: `TIMESTAMP HOSTNAME TAG: MSG` where a
/// missing timestamp leaves no host name, and a first word not ending in `:` (or `]:`) is
/// message, not tag.
fn rfc3164(rest: &[u8], severity: Severity, facility: Facility, now: SystemTime) -> Parsed {
    let mut rest = rest;
    let mut timestamp = None;
    if rest.len() >= 16
        && rest[15] == b' '
        && let Some(t) = time::parse_rfc3164(&rest[..15], now)
    {
        timestamp = Some(t);
        rest = &rest[16..];
    }
    if timestamp.is_none() {
        // rsyslog's high-precision variant: an RFC 3339 timestamp in place of the BSD one.
        if let Some(end) = rest.iter().position(|&b| b == b' ') {
            let t = std::str::from_utf8(&rest[..end]).ok();
            if let Some(t) = t.and_then(time::parse_rfc3339) {
                timestamp = Some(t);
                rest = &rest[end + 1..];
            }
        }
    }
    let mut hostname = None;
    if timestamp.is_some()
        && let Some(end) = rest.iter().position(|&b| b == b' ')
    {
        let token = &rest[..end];
        // A tag right after the timestamp (`TAG: msg`) is not a host name.
        if is_hostname(token) && !token.ends_with(b":") {
            hostname = Some(String::from_utf8_lossy(token).into_owned());
            rest = &rest[end + 1..];
        }
    }
    let (mut app_name, mut procid) = (None, None);
    let word_end = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
    let word = &rest[..word_end];
    if let Some(tag) = word.strip_suffix(b":") {
        let (name, pid) = match tag.strip_suffix(b"]").and_then(|t| {
            let open = t.iter().position(|&b| b == b'[')?;
            Some((&t[..open], &t[open + 1..]))
        }) {
            Some((name, pid)) => (name, Some(pid)),
            None => (tag, None),
        };
        if !name.is_empty() && name.iter().all(u8::is_ascii_graphic) {
            app_name = Some(String::from_utf8_lossy(name).into_owned());
            procid = pid.map(|p| String::from_utf8_lossy(p).into_owned());
            rest = &rest[word_end..];
            rest = rest.strip_prefix(b" ").unwrap_or(rest);
        }
    }
    Parsed {
        timestamp,
        hostname,
        app_name,
        procid,
        msgid: None,
        severity,
        facility,
        structured_data: None,
        message: rest.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_796_554_963)
    }

    fn check(input: &str, expected: expect_test::Expect) {
        let got = match parse(input.as_bytes(), now()) {
            Ok(p) => format!(
                "ts={:?} host={:?} app={:?} pid={:?} msgid={:?} sev={:?} fac={} sd={:?} msg={:?}",
                p.timestamp.map(time::rfc3339),
                p.hostname,
                p.app_name,
                p.procid,
                p.msgid,
                p.severity,
                p.facility,
                p.structured_data,
                String::from_utf8_lossy(&p.message)
            ),
            Err(e) => format!("error: {e:?}"),
        };
        expected.assert_eq(&got);
    }

    #[test]
    fn rfc5424_messages() {
        check(
            r#"<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 [exampleSDID@32473 iut="3" eventSource="Application\]"][x@1 a="b"] An application event"#,
            expect_test::expect![[
                r#"ts=Some("2003-10-11T22:14:15.003000Z") host=Some("mymachine.example.com") app=Some("evntslog") pid=None msgid=Some("ID47") sev=Notice fac=local4 sd=Some("[exampleSDID@32473 iut=\"3\" eventSource=\"Application\\]\"][x@1 a=\"b\"]") msg="An application event""#
            ]],
        );
        check(
            "<34>1 - - - - - -",
            expect_test::expect![[
                r#"ts=None host=None app=None pid=None msgid=None sev=Crit fac=auth sd=None msg="""#
            ]],
        );
        check(
            "<13>1 2003-10-11T22:14:15Z h a p m - \u{feff}hé\n",
            expect_test::expect![[
                r#"ts=Some("2003-10-11T22:14:15.000000Z") host=Some("h") app=Some("a") pid=Some("p") msgid=Some("m") sev=Notice fac=user sd=None msg="hé""#
            ]],
        );
        check(
            "<13>1 yesterday h a p m - x",
            expect_test::expect!["error: Malformed"],
        );
        check(
            "<13>1 - h a p m [x a=\"b\" x",
            expect_test::expect!["error: Malformed"],
        );
    }

    #[test]
    fn rfc3164_as_rsyslog_sends_it() {
        check(
            "<30>Dec  6 10:00:01 box sshd[123]: Accepted key",
            expect_test::expect![[
                r#"ts=Some("2026-12-06T10:00:01.000000Z") host=Some("box") app=Some("sshd") pid=Some("123") msgid=None sev=Info fac=daemon sd=None msg="Accepted key""#
            ]],
        );
        check(
            "<13>2026-12-06T10:00:01.5+00:00 box app: hi",
            expect_test::expect![[
                r#"ts=Some("2026-12-06T10:00:01.500000Z") host=Some("box") app=Some("app") pid=None msgid=None sev=Notice fac=user sd=None msg="hi""#
            ]],
        );
        check(
            "<13>Dec  6 10:00:01 tag: only a tag",
            expect_test::expect![[
                r#"ts=Some("2026-12-06T10:00:01.000000Z") host=None app=Some("tag") pid=None msgid=None sev=Notice fac=user sd=None msg="only a tag""#
            ]],
        );
        check(
            "<13>just text",
            expect_test::expect![[
                r#"ts=None host=None app=None pid=None msgid=None sev=Notice fac=user sd=None msg="just text""#
            ]],
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        #[test]
        fn any_bytes_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = parse(&data, now());
            let mut prefixed = b"<13>1 ".to_vec();
            prefixed.extend_from_slice(&data);
            let _ = parse(&prefixed, now());
        }

        #[test]
        fn what_graven_sends_reads_back(
            service in "\\PC{0,60}",
            instance in "[a-z0-9][a-z0-9-]{0,19}",
            app in "\\PC{0,20}",
            line in "\\PC{0,80}",
            release in 0u64..1_000_000,
            stderr in proptest::prelude::any::<bool>(),
            facility in 0u8..24,
        ) {
            use super::super::{OutRecord, Stream, format};
            let record = OutRecord {
                time: now(),
                app,
                environment: "production".into(),
                service: service.clone(),
                release,
                instance: instance.clone(),
                stream: if stderr { Stream::Stderr } else { Stream::Stdout },
                line: line.clone().into_bytes(),
                cursor: 0,
            };
            let facility = Facility::new(facility).unwrap();
            let p = parse(&format::rfc5424(&record, facility, "host"), now()).unwrap();
            proptest::prop_assert_eq!(p.app_name.unwrap_or_else(|| "-".into()), format::header_field(&service, 48));
            proptest::prop_assert_eq!(p.procid.as_deref(), Some(instance.as_str()));
            proptest::prop_assert_eq!(p.severity, record.stream.severity());
            proptest::prop_assert_eq!(p.facility, facility);
            let sd = p.structured_data.unwrap();
            let release_param = format!("release=\"{release}\"");
            proptest::prop_assert!(sd.contains(&release_param));
            proptest::prop_assert_eq!(p.message, line.as_bytes());
        }
    }

    #[test]
    fn bad_pri_and_bytes_are_refused_by_kind() {
        check("<192>1 - - - - - -", expect_test::expect!["error: Pri"]);
        check("<1234>x", expect_test::expect!["error: Pri"]);
        check("13>x", expect_test::expect!["error: Pri"]);
        check("<>x", expect_test::expect!["error: Pri"]);
        assert_eq!(
            parse(b"<13>1 - - - - - - \xff", now()),
            Err(BadInput::InvalidUtf8)
        );
    }
}
