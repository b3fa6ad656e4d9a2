//! The zone: every name graven answers, built from the controllers' published snapshots, and
//! the answer to one query. Pure: no socket, no clock; the server swaps a new zone in whole.
//!
//! Names, under the zone's origin (`graven.` by default):
//! - `SERVICE.ENVIRONMENT.APP.` — the address of the service's route;
//! - `_NAME._tcp.SERVICE.ENVIRONMENT.APP.` — SRV with the route's port (NAME is the
//!   service's `srv_name`, else `http` for an HTTP route, the service's name for a TCP one);
//! - `instances.SERVICE.ENVIRONMENT.APP.` — the addresses of the instances the route sends
//!   new requests to (healthy and routed), no others;
//! - the origin itself — SOA and NS (`ns.ORIGIN.`, the address the query came to).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, NS, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use crate::controller::Snapshot;
use crate::events::{Lifecycle, RouteKind};

/// The largest UDP answer sent to a client that offers EDNS: the size DNS flag day 2020
/// settled on, which crosses the Internet's paths without fragmenting.
pub const EDNS_PAYLOAD: u16 = 1232;

/// Where a query came from, which decides the address a route is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    /// The address the query was sent to: `ns.ORIGIN`'s answer.
    pub server: IpAddr,
    /// Set when the query came over the bridge, from an instance with a network of its own:
    /// a route on loopback (or on every address) is reached there through this address,
    /// the daemon's own on the bridge.
    pub bridge: Option<Ipv4Addr>,
}

impl View {
    /// The address a client in this view reaches a route listening on `ip` at.
    pub fn route_ip(&self, ip: IpAddr) -> IpAddr {
        match self.bridge {
            Some(bridge) if ip.is_loopback() || ip.is_unspecified() => IpAddr::V4(bridge),
            _ if ip == IpAddr::V4(Ipv4Addr::UNSPECIFIED) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            _ if ip == IpAddr::V6(Ipv6Addr::UNSPECIFIED) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            _ => ip,
        }
    }
}

/// What one name holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Node {
    /// A service's route, answered as `View::route_ip` says.
    route: Option<IpAddr>,
    /// Instances' own addresses, answered as they are.
    addresses: Vec<IpAddr>,
    /// SRV: the route's port and the service's name.
    srv: Option<(u16, Name)>,
}

/// Every name of one daemon's apps and environments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    origin: Name,
    ttl: u32,
    serial: u32,
    /// By lowercase name; names that only lead to others (`ENVIRONMENT.APP.ORIGIN`) are here
    /// empty, so they answer NODATA, not NXDOMAIN (RFC 8020).
    nodes: HashMap<Name, Node>,
}

impl Zone {
    /// An empty zone for `origin` (a name ending with a dot): SOA and NS only.
    pub fn empty(origin: &Name, ttl: u32) -> Zone {
        let origin = origin.to_lowercase();
        let mut nodes = HashMap::new();
        nodes.insert(origin.clone(), Node::default());
        nodes.insert(ns_name(&origin), Node::default());
        Zone {
            origin,
            ttl,
            serial: 0,
            nodes,
        }
    }

    /// The zone the controllers' `snapshots` describe. `serial` is the SOA's: it should
    /// change whenever the answers do.
    pub fn build(origin: &Name, ttl: u32, serial: u32, snapshots: &[Arc<Snapshot>]) -> Zone {
        let mut zone = Zone::empty(origin, ttl);
        zone.serial = serial;
        for snapshot in snapshots {
            let state = &snapshot.state;
            for service in state.wanted_services() {
                let Some(base) =
                    zone.name(&[service.as_str(), &snapshot.environment, &snapshot.app])
                else {
                    continue;
                };
                let route = snapshot.routes.get(service).copied();
                let release = state.wanted_release(service);
                let kind = release.map(|r| r.config.route_kind).unwrap_or_default();
                let declared = release.and_then(|r| r.config.srv_name.as_deref());
                if let Some(route) = route {
                    let label = match (declared, kind) {
                        (Some(name), _) => name,
                        (None, RouteKind::Http) => "http",
                        (None, RouteKind::Tcp) => service.as_str(),
                    };
                    if let Ok(srv) = Name::from_ascii(format!("_{label}._tcp"))
                        .and_then(|prefix| prefix.append_name(&base))
                    {
                        zone.insert(srv).srv = Some((route.port(), base.clone()));
                    }
                }
                zone.insert(base.clone()).route = route.map(|r| r.ip());
                let traffic = state.services.get(service).map(|s| &s.traffic);
                let mut addresses: Vec<IpAddr> = state
                    .instances_of(service)
                    .filter(|i| {
                        i.lifecycle == Lifecycle::Healthy
                            && traffic.is_some_and(|t| t.contains_key(&i.name))
                    })
                    .filter_map(|i| i.address.map(|a| a.ip()))
                    .collect();
                addresses.sort_unstable();
                addresses.dedup();
                if let Ok(instances) =
                    Name::from_ascii("instances").and_then(|prefix| prefix.append_name(&base))
                {
                    zone.insert(instances).addresses = addresses;
                }
            }
        }
        zone
    }

    /// `labels` (most specific first) under the origin, lowercase; `None` when they do not
    /// make a valid name.
    fn name(&self, labels: &[&str]) -> Option<Name> {
        let relative = Name::from_ascii(labels.join(".")).ok()?;
        Some(relative.append_name(&self.origin).ok()?.to_lowercase())
    }

    /// The node of `name`, made with every empty node between it and the origin.
    fn insert(&mut self, name: Name) -> &mut Node {
        let name = name.to_lowercase();
        let mut parent = name.base_name();
        while parent.num_labels() > self.origin.num_labels() {
            self.nodes.entry(parent.clone()).or_default();
            parent = parent.base_name();
        }
        self.nodes.entry(name).or_default()
    }

    pub fn origin(&self) -> &Name {
        &self.origin
    }

    /// The routes on loopback or on every address: what a client on the bridge reaches
    /// through the daemon's own address there, by port.
    pub fn bridged_routes(snapshots: &[Arc<Snapshot>]) -> Vec<SocketAddr> {
        let mut routes: Vec<SocketAddr> = snapshots
            .iter()
            .flat_map(|s| s.routes.values().copied())
            .filter(|r| r.ip().is_loopback())
            .collect();
        routes.sort_unstable();
        routes.dedup();
        routes
    }

    /// The answer to `request` as a client in `view` gets it.
    pub fn answer(&self, request: &Message, view: &View) -> Message {
        let mut response = Message::response(request.metadata.id, request.metadata.op_code);
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        if request.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(EDNS_PAYLOAD);
            response.set_edns(edns);
        }
        if request.metadata.op_code != OpCode::Query {
            response.metadata.response_code = ResponseCode::NotImp;
            return response;
        }
        let [query] = request.queries.as_slice() else {
            response.metadata.response_code = ResponseCode::FormErr;
            return response;
        };
        response.add_query(query.clone());
        let name = query.name().to_lowercase();
        // Graven is authoritative for its zone only and resolves nothing else: no open
        // resolver.
        if query.query_class() != DNSClass::IN || !self.origin.zone_of(&name) {
            response.metadata.response_code = ResponseCode::Refused;
            return response;
        }
        response.metadata.authoritative = true;
        let Some(node) = self.nodes.get(&name) else {
            response.metadata.response_code = ResponseCode::NXDomain;
            response.add_authority(self.soa());
            return response;
        };
        let owner = query.name().clone();
        let wanted = query.query_type();
        let wants = |kind: RecordType| wanted == kind || wanted == RecordType::ANY;
        let record = |data: RData| Record::from_rdata(owner.clone(), self.ttl, data);
        let is_origin = name == self.origin;
        if is_origin && wants(RecordType::SOA) {
            response.add_answer(self.soa());
        }
        if is_origin && wants(RecordType::NS) {
            response.add_answer(record(RData::NS(NS(ns_name(&self.origin)))));
        }
        let server = (name == ns_name(&self.origin)).then_some(view.server);
        let route = node.route.map(|ip| view.route_ip(ip));
        for ip in route.iter().chain(&node.addresses).chain(&server) {
            match ip {
                IpAddr::V4(ip) if wants(RecordType::A) => {
                    response.add_answer(record(RData::A(A(*ip))))
                }
                IpAddr::V6(ip) if wants(RecordType::AAAA) => {
                    response.add_answer(record(RData::AAAA(AAAA(*ip))))
                }
                _ => &mut response,
            };
        }
        if let Some((port, target)) = &node.srv
            && wants(RecordType::SRV)
        {
            response.add_answer(record(RData::SRV(SRV::new(0, 0, *port, target.clone()))));
        }
        if response.answers.is_empty() {
            // NODATA: the name exists, without the asked type.
            response.add_authority(self.soa());
        }
        response
    }

    fn soa(&self) -> Record {
        let soa = SOA::new(
            ns_name(&self.origin),
            Name::from_ascii("hostmaster")
                .and_then(|h| h.append_name(&self.origin))
                .unwrap_or_else(|_| self.origin.clone()),
            self.serial,
            // Refresh, retry, expire: no secondary copies this zone; the values are the
            // usual ones. The minimum is the negative answers' TTL (RFC 2308): the same short
            // one, so a name that appears is found as soon as a present one changes.
            3600,
            600,
            86400,
            self.ttl,
        );
        Record::from_rdata(self.origin.clone(), self.ttl, RData::SOA(soa))
    }
}

fn ns_name(origin: &Name) -> Name {
    Name::from_ascii("ns")
        .and_then(|ns| ns.append_name(origin))
        .unwrap_or_else(|_| origin.clone())
}

/// The answer to bytes that do not parse as a query: FORMERR with the query's id when there
/// is a header to take it from (and the bytes are not an answer themselves: answering those
/// could make two servers talk forever), nothing otherwise.
pub fn malformed(bytes: &[u8]) -> Option<Message> {
    let header: &[u8; 12] = bytes.get(..12)?.try_into().ok()?;
    if header[2] & 0x80 != 0 {
        return None;
    }
    let id = u16::from_be_bytes([header[0], header[1]]);
    let op = OpCode::from_u8((header[2] >> 3) & 0x0f);
    let mut response = Message::error_msg(id, op, ResponseCode::FormErr);
    response.metadata.message_type = MessageType::Response;
    Some(response)
}

#[cfg(test)]
mod tests;
