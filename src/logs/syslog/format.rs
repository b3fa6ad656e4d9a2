//! Outgoing messages: a record to RFC 5424 or RFC 3164 bytes, and the octet-counting frame
//! (RFC 6587 §3.4.1) TCP carries them in. Pure.
//!
//! RFC 5424: `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [SD] MSG` where APP-NAME is the
//! service, PROCID the instance, MSGID the stream, and the structured data element
//! `graven@32473` carries app, environment, release and instance. 32473 is the private
//! enterprise number RFC 5612 reserves for documentation: graven has none of its own, and an
//! SD-ID with `@` is a private one by RFC 5424 §7.2.2, so it collides with no registered ID.

use super::{Facility, OutRecord, time};

/// The structured data ID graven's elements carry (see the module's head).
pub const SD_ID: &str = "graven@32473";

/// The largest datagram the UDP forwarder sends: RFC 5426 §3.2's size every receiver SHOULD
/// take whole. A longer message is cut to it (on a UTF-8 boundary when the line is text).
pub const UDP_MAX: usize = 2048;

/// RFC 5424's limits on its header fields, in printable ASCII (33-126) characters.
const APP_NAME_MAX: usize = 48;
const PROCID_MAX: usize = 128;
const HOSTNAME_MAX: usize = 255;
/// RFC 3164's TAG is at most 32 alphanumeric characters.
const TAG_MAX: usize = 32;

/// PRINTUSASCII only, at most `max` characters, `-` (the nil value) when nothing is left:
/// anything else a name holds becomes `_`, so a field never breaks the header apart.
pub fn header_field(value: &str, max: usize) -> String {
    let field: String = value
        .chars()
        .take(max)
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .collect();
    if field.is_empty() { "-".into() } else { field }
}

/// An SD-PARAM value with `"`, `\` and `]` escaped as RFC 5424 §6.3.3 says.
pub fn escape_sd_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn pri(facility: Facility, record: &OutRecord) -> u8 {
    facility.code() * 8 + record.stream.severity() as u8
}

/// A line without its line ending.
fn body(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The RFC 5424 message of a record.
pub fn rfc5424(record: &OutRecord, facility: Facility, hostname: &str) -> Vec<u8> {
    let head = format!(
        "<{}>1 {} {} {} {} {} [{SD_ID} app=\"{}\" environment=\"{}\" release=\"{}\" instance=\"{}\"] ",
        pri(facility, record),
        time::rfc3339(record.time),
        header_field(hostname, HOSTNAME_MAX),
        header_field(&record.service, APP_NAME_MAX),
        header_field(&record.instance, PROCID_MAX),
        match record.stream {
            super::Stream::Stdout => "stdout",
            super::Stream::Stderr => "stderr",
        },
        escape_sd_value(&record.app),
        escape_sd_value(&record.environment),
        record.release,
        escape_sd_value(&record.instance),
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(body(&record.line));
    out
}

/// The RFC 3164 message of a record: `<PRI>Mmm dd hh:mm:ss HOSTNAME service[instance]: line`,
/// the timestamp in UTC. Release, app and environment have no place in it.
pub fn rfc3164(record: &OutRecord, facility: Facility, hostname: &str) -> Vec<u8> {
    let tag: String = record
        .service
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(TAG_MAX)
        .collect();
    let instance: String = record
        .instance
        .chars()
        .filter(|c| c.is_ascii_graphic() && !matches!(c, '[' | ']'))
        .collect();
    let head = format!(
        "<{}>{} {} {}[{}]: ",
        pri(facility, record),
        time::rfc3164(record.time),
        header_field(hostname, HOSTNAME_MAX),
        if tag.is_empty() { "graven" } else { &tag },
        instance,
    );
    let mut out = head.into_bytes();
    // Line breaks would end the message early for a receiver reading RFC 3164 loosely.
    out.extend(
        body(&record.line)
            .iter()
            .map(|&b| if b == b'\n' || b == b'\r' { b' ' } else { b }),
    );
    out
}

/// `LEN SP MSG`: RFC 6587's octet-counting frame.
pub fn octet_counted(message: &[u8]) -> Vec<u8> {
    let mut out = format!("{} ", message.len()).into_bytes();
    out.extend_from_slice(message);
    out
}

/// A message cut to `max` bytes; when it is UTF-8, at a character boundary.
pub fn truncate(mut message: Vec<u8>, max: usize) -> Vec<u8> {
    if message.len() <= max {
        return message;
    }
    let mut end = max;
    if std::str::from_utf8(&message).is_ok() {
        while end > 0 && (message[end] & 0xC0) == 0x80 {
            end -= 1;
        }
    }
    message.truncate(end);
    message
}

/// The host name forwarded messages carry: the kernel's node name.
pub fn local_hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::super::Stream;
    use super::*;

    fn sample() -> OutRecord {
        OutRecord {
            time: UNIX_EPOCH + Duration::new(1_796_554_963, 5_000),
            app: "shop".into(),
            environment: "prod \"eu]\\".into(),
            service: "web".into(),
            release: 7,
            instance: "web-7-x1".into(),
            stream: Stream::Stderr,
            line: b"boom\n".to_vec(),
            cursor: 3,
        }
    }

    #[test]
    fn rfc5424_has_every_field_and_escapes_sd_values() {
        let out = rfc5424(&sample(), Facility::LOCAL0, "host one");
        expect_test::expect![[r#"<131>1 2026-12-06T11:02:43.000005Z host_one web web-7-x1 stderr [graven@32473 app="shop" environment="prod \"eu\]\\" release="7" instance="web-7-x1"] boom"#]]
            .assert_eq(&String::from_utf8(out).unwrap());
    }

    #[test]
    fn rfc3164_is_traditional() {
        let out = rfc3164(&sample(), Facility::USER, "h");
        assert_eq!(out, b"<11>Dec  6 11:02:43 h web[web-7-x1]: boom");
    }

    #[test]
    fn app_name_is_at_most_48_printable_characters() {
        let long = "é".repeat(60);
        assert_eq!(header_field(&long, 48), "_".repeat(48));
        assert_eq!(header_field("", 48), "-");
    }

    #[test]
    fn truncation_keeps_utf8_whole() {
        assert_eq!(truncate("aé".as_bytes().to_vec(), 2), b"a");
        assert_eq!(truncate(vec![0xff; 5], 2), vec![0xff; 2]);
        assert_eq!(octet_counted(b"<1>x"), b"4 <1>x");
    }
}
