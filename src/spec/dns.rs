//! `[dns]`: graven's DNS server as the project asks for it (the zone, where it listens, the
//! TTL of its answers, the per-source rate), read and checked into the dns module's
//! `DnsSettings`: only the keys it sets, which `graven up` runs and a deploy's control plane
//! must agree with.

use serde::Deserialize;

use super::problem::Issues;
use super::raw::Field;
use crate::dns::{DnsConfig, DnsSettings};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDns {
    pub zone: Option<Field<String>>,
    pub listen: Option<Field<Vec<String>>>,
    pub ttl: Option<Field<i64>>,
    pub rate_limit: Option<Field<i64>>,
}

/// The longest TTL `[dns] ttl` takes: answers change with every deploy, and a day-long
/// cache would hide that.
pub(crate) const MAX_TTL: i64 = 3600;

/// The highest per-source rate `[dns] rate_limit` takes; beyond it a limit limits nothing.
pub(crate) const MAX_RATE_LIMIT: i64 = 1_000_000;

pub(crate) fn check(raw: Option<&toml::Spanned<RawDns>>, issues: &mut Issues) -> DnsSettings {
    let mut dns = DnsSettings::default();
    let Some(raw) = raw.map(toml::Spanned::get_ref) else {
        return dns;
    };
    if let Some(field) = &raw.zone {
        match field
            .value
            .clone()
            .and_then(|zone| DnsConfig::zone(&zone).map_err(|e| e.to_string()))
        {
            Ok(zone) => dns.zone = Some(zone.to_ascii()),
            Err(message) => issues.push(field.span.clone(), "dns.zone", message),
        }
    }
    if let Some(field) = &raw.listen {
        match &field.value {
            Err(message) => issues.push(field.span.clone(), "dns.listen", message),
            Ok(addresses) => {
                let listen = dns.listen.insert(Vec::new());
                for address in addresses {
                    match address.parse() {
                        Ok(address) => listen.push(address),
                        Err(_) => issues.push(
                            field.span.clone(),
                            "dns.listen",
                            format!("{address:?} is not IP:PORT (e.g. \"127.0.0.1:1053\")"),
                        ),
                    }
                }
            }
        }
    }
    if let Some(field) = &raw.ttl {
        match field.value {
            Ok(ttl @ 0..=MAX_TTL) => dns.ttl = Some(ttl as u32),
            Ok(ttl) => issues.push(
                field.span.clone(),
                "dns.ttl",
                format!("{ttl} is not a TTL of 0 to {MAX_TTL} seconds"),
            ),
            Err(ref message) => issues.push(field.span.clone(), "dns.ttl", message.clone()),
        }
    }
    if let Some(field) = &raw.rate_limit {
        match field.value {
            Ok(limit @ 0..=MAX_RATE_LIMIT) => dns.rate_limit = Some(limit as u32),
            Ok(limit) => issues.push(
                field.span.clone(),
                "dns.rate_limit",
                format!(
                    "{limit} is not a rate of 0 (no limit) to {MAX_RATE_LIMIT} queries a second"
                ),
            ),
            Err(ref message) => issues.push(field.span.clone(), "dns.rate_limit", message.clone()),
        }
    }
    dns
}
