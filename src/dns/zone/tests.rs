use std::net::SocketAddr;
use std::sync::Arc;

use expect_test::{Expect, expect};
use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::{DNSClass, Name, RecordType};

use super::*;
use crate::controller::Snapshot;
use crate::events::{
    DeployReason, Envelope, Event, ReleaseNumber, RouteKind, RuntimeId, ServiceConfig, replay,
};
use crate::store::Digest;

const HOST: View = View {
    server: IpAddr::V4(Ipv4Addr::LOCALHOST),
    bridge: None,
};

const BRIDGE: View = View {
    server: IpAddr::V4(Ipv4Addr::new(10, 213, 0, 7)),
    bridge: Some(Ipv4Addr::new(10, 213, 0, 7)),
};

fn release(service: &str, number: u64, kind: RouteKind) -> Vec<Event> {
    vec![
        Event::ReleaseCreated {
            service: service.into(),
            release: ReleaseNumber(number),
            image: Digest::of(b"image"),
            config_digest: format!("cfg-{number}"),
            config: ServiceConfig {
                route_kind: kind,
                ..ServiceConfig::test(2, 1, 0)
            },
            source: None,
        },
        Event::DeployStarted {
            service: service.into(),
            from: None,
            to: ReleaseNumber(number),
            reason: DeployReason::Deploy,
        },
    ]
}

fn instance(service: &str, release: u64, name: &str, ip: [u8; 4]) -> Vec<Event> {
    vec![
        Event::InstanceLaunched {
            service: service.into(),
            release: ReleaseNumber(release),
            instance: name.into(),
        },
        Event::InstanceStarted {
            instance: name.into(),
            runtime_id: RuntimeId(format!("rt-{name}")),
            address: SocketAddr::from((ip, 8080)),
        },
        Event::InstanceHealthy {
            instance: name.into(),
        },
    ]
}

fn routed(service: &str, instances: &[&str]) -> Event {
    Event::TrafficChanged {
        service: service.into(),
        routed: instances.iter().map(|i| ((*i).into(), 1)).collect(),
    }
}

/// `hello/production`: `web` (HTTP route on loopback, two instances routed and a third
/// healthy but not routed yet), `db` (TCP route on every address, one instance that turned
/// unhealthy), `worker` (no route).
fn hello() -> Arc<Snapshot> {
    let mut events = Vec::new();
    events.extend(release("web", 1, RouteKind::Http));
    events.extend(release("db", 2, RouteKind::Tcp));
    events.extend(release("worker", 3, RouteKind::Http));
    events.extend(instance("web", 1, "web-1", [10, 213, 0, 11]));
    events.extend(instance("web", 1, "web-2", [10, 213, 0, 12]));
    events.extend(instance("web", 1, "web-3", [10, 213, 0, 13]));
    events.push(routed("web", &["web-1", "web-2"]));
    events.extend(instance("db", 2, "db-1", [10, 213, 0, 21]));
    events.push(routed("db", &["db-1"]));
    events.push(Event::InstanceUnhealthy {
        instance: "db-1".into(),
        detail: "connection refused".to_owned(),
    });
    snapshot(
        "hello",
        "production",
        events,
        &[("web", "127.0.0.1:8080"), ("db", "0.0.0.0:5432")],
    )
}

fn snapshot(
    app: &str,
    environment: &str,
    events: Vec<Event>,
    routes: &[(&str, &str)],
) -> Arc<Snapshot> {
    let envelopes: Vec<Envelope<Event>> = events
        .into_iter()
        .enumerate()
        .map(|(i, payload)| Envelope {
            seq: i as u64 + 1,
            at_ms: (i as u64 + 1) * 1000,
            actor: "test".into(),
            version: 1,
            payload,
        })
        .collect();
    Arc::new(Snapshot {
        app: app.to_owned(),
        environment: environment.to_owned(),
        state: Arc::new(replay(&envelopes)),
        routes: routes
            .iter()
            .map(|(s, r)| ((*s).into(), r.parse().unwrap()))
            .collect(),
        ..Snapshot::default()
    })
}

fn zone(snapshots: &[Arc<Snapshot>]) -> Zone {
    Zone::build(&Name::from_ascii("graven.").unwrap(), 5, 7, snapshots)
}

fn query(name: &str, kind: RecordType) -> Message {
    let mut request = Message::query();
    request.metadata.id = 4242;
    request.metadata.recursion_desired = true;
    request.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
    request
}

/// The answer as `dig +noall +comments +answer +authority` would sum it up.
fn render(response: &Message) -> String {
    let mut out = format!(
        "{}{}",
        response.metadata.response_code,
        if response.metadata.authoritative {
            " aa"
        } else {
            ""
        },
    );
    for record in &response.answers {
        out += &format!("\n{record}");
    }
    for record in &response.authorities {
        out += &format!("\nauthority {record}");
    }
    out + "\n"
}

fn check(zone: &Zone, view: &View, name: &str, kind: RecordType, expected: Expect) {
    let request = query(name, kind);
    let response = zone.answer(&request, view);
    assert_eq!(response.metadata.id, request.metadata.id);
    // The answer goes through the wire and back unchanged.
    let bytes = response.to_vec().unwrap();
    assert_eq!(Message::from_vec(&bytes).unwrap().answers, response.answers);
    expected.assert_eq(&render(&response));
}

#[test]
fn a_service_name_answers_its_route() {
    let zone = zone(&[hello()]);
    check(
        &zone,
        &HOST,
        "web.production.hello.graven.",
        RecordType::A,
        expect![[r#"
        No Error aa
        web.production.hello.graven. 5 IN A 127.0.0.1
    "#]],
    );
    // Names are matched whatever their case, and answered as asked.
    check(
        &zone,
        &HOST,
        "WEB.Production.hello.graven.",
        RecordType::A,
        expect![[r#"
        No Error aa
        WEB.Production.hello.graven. 5 IN A 127.0.0.1
    "#]],
    );
    // A route on every address is reached on loopback from the host.
    check(
        &zone,
        &HOST,
        "db.production.hello.graven.",
        RecordType::A,
        expect![[r#"
        No Error aa
        db.production.hello.graven. 5 IN A 127.0.0.1
    "#]],
    );
}

#[test]
fn from_the_bridge_a_loopback_route_is_the_daemons_bridge_address() {
    let zone = zone(&[hello()]);
    check(
        &zone,
        &BRIDGE,
        "web.production.hello.graven.",
        RecordType::A,
        expect![[r#"
        No Error aa
        web.production.hello.graven. 5 IN A 10.213.0.7
    "#]],
    );
    check(
        &zone,
        &BRIDGE,
        "db.production.hello.graven.",
        RecordType::A,
        expect![[r#"
        No Error aa
        db.production.hello.graven. 5 IN A 10.213.0.7
    "#]],
    );
    let routes: Vec<String> = Zone::bridged_routes(&[hello()])
        .iter()
        .map(|r| r.to_string())
        .collect();
    assert_eq!(
        routes,
        ["127.0.0.1:8080"],
        "a route on every address listens on the bridge already"
    );
}

#[test]
fn srv_names_the_route_port() {
    let zone = zone(&[hello()]);
    check(
        &zone,
        &HOST,
        "_http._tcp.web.production.hello.graven.",
        RecordType::SRV,
        expect![[r#"
        No Error aa
        _http._tcp.web.production.hello.graven. 5 IN SRV 0 0 8080 web.production.hello.graven.
    "#]],
    );
    check(
        &zone,
        &HOST,
        "_db._tcp.db.production.hello.graven.",
        RecordType::SRV,
        expect![[r#"
        No Error aa
        _db._tcp.db.production.hello.graven. 5 IN SRV 0 0 5432 db.production.hello.graven.
    "#]],
    );
}

#[test]
fn instances_are_the_healthy_routed_ones_only() {
    let zone = zone(&[hello()]);
    // web-3 is healthy but not routed yet.
    check(
        &zone,
        &HOST,
        "instances.web.production.hello.graven.",
        RecordType::A,
        expect![[r#"
        No Error aa
        instances.web.production.hello.graven. 5 IN A 10.213.0.11
        instances.web.production.hello.graven. 5 IN A 10.213.0.12
    "#]],
    );
    // db-1 is routed but unhealthy: the name stays, with no address.
    check(
        &zone,
        &HOST,
        "instances.db.production.hello.graven.",
        RecordType::A,
        expect![[r#"
        No Error aa
        authority graven. 5 IN SOA ns.graven. hostmaster.graven. 7 3600 600 86400 5
    "#]],
    );
}

#[test]
fn missing_names_are_nxdomain_and_missing_types_nodata() {
    let zone = zone(&[hello()]);
    check(
        &zone,
        &HOST,
        "nope.production.hello.graven.",
        RecordType::A,
        expect![[r#"
        Non-Existent Domain aa
        authority graven. 5 IN SOA ns.graven. hostmaster.graven. 7 3600 600 86400 5
    "#]],
    );
    check(
        &zone,
        &HOST,
        "web.production.hello.graven.",
        RecordType::AAAA,
        expect![[r#"
        No Error aa
        authority graven. 5 IN SOA ns.graven. hostmaster.graven. 7 3600 600 86400 5
    "#]],
    );
    // A name that only leads to others exists (RFC 8020).
    check(
        &zone,
        &HOST,
        "production.hello.graven.",
        RecordType::A,
        expect![[r#"
        No Error aa
        authority graven. 5 IN SOA ns.graven. hostmaster.graven. 7 3600 600 86400 5
    "#]],
    );
    // A worker without a route has a name and no address.
    check(
        &zone,
        &HOST,
        "worker.production.hello.graven.",
        RecordType::A,
        expect![[r#"
        No Error aa
        authority graven. 5 IN SOA ns.graven. hostmaster.graven. 7 3600 600 86400 5
    "#]],
    );
}

#[test]
fn the_apex_has_soa_and_ns() {
    let zone = zone(&[hello()]);
    check(
        &zone,
        &HOST,
        "graven.",
        RecordType::SOA,
        expect![[r#"
        No Error aa
        graven. 5 IN SOA ns.graven. hostmaster.graven. 7 3600 600 86400 5
    "#]],
    );
    check(
        &zone,
        &HOST,
        "graven.",
        RecordType::NS,
        expect![[r#"
        No Error aa
        graven. 5 IN NS ns.graven.
    "#]],
    );
    check(
        &zone,
        &BRIDGE,
        "ns.graven.",
        RecordType::A,
        expect![[r#"
        No Error aa
        ns.graven. 5 IN A 10.213.0.7
    "#]],
    );
}

#[test]
fn other_zones_are_refused() {
    let zone = zone(&[hello()]);
    check(
        &zone,
        &HOST,
        "example.com.",
        RecordType::A,
        expect![[r#"
        Query Refused
    "#]],
    );
    // A name that merely ends like the zone is not in it.
    check(
        &zone,
        &HOST,
        "notgraven.",
        RecordType::A,
        expect![[r#"
        Query Refused
    "#]],
    );
    let mut chaos = query("version.bind.", RecordType::TXT);
    chaos.queries[0].set_query_class(DNSClass::CH);
    assert_eq!(render(&zone.answer(&chaos, &HOST)), "Query Refused\n");
}

#[test]
fn removed_services_and_environments_have_no_names() {
    let mut events = release("web", 1, RouteKind::Http);
    events.extend(release("api", 2, RouteKind::Http));
    events.push(Event::ServiceRemoved {
        service: "api".into(),
    });
    let staging = snapshot("hello", "staging", events, &[("web", "127.0.0.1:9090")]);
    let zone = zone(&[hello(), staging]);
    check(
        &zone,
        &HOST,
        "web.staging.hello.graven.",
        RecordType::A,
        expect![[r#"
        No Error aa
        web.staging.hello.graven. 5 IN A 127.0.0.1
    "#]],
    );
    check(
        &zone,
        &HOST,
        "api.staging.hello.graven.",
        RecordType::A,
        expect![[r#"
        Non-Existent Domain aa
        authority graven. 5 IN SOA ns.graven. hostmaster.graven. 7 3600 600 86400 5
    "#]],
    );
}

#[test]
fn a_zone_of_its_own_name() {
    let zone = Zone::build(
        &Name::from_ascii("Internal.Example.").unwrap(),
        0,
        1,
        &[hello()],
    );
    check(
        &zone,
        &HOST,
        "web.production.hello.internal.example.",
        RecordType::A,
        expect![[r#"
        No Error aa
        web.production.hello.internal.example. 0 IN A 127.0.0.1
    "#]],
    );
    check(
        &zone,
        &HOST,
        "web.production.hello.graven.",
        RecordType::A,
        expect![[r#"
        Query Refused
    "#]],
    );
}

#[test]
fn edns_is_answered_and_odd_requests_are_errors() {
    let zone = zone(&[hello()]);
    let mut request = query("web.production.hello.graven.", RecordType::A);
    request.set_edns(Edns::new());
    let response = zone.answer(&request, &HOST);
    assert_eq!(response.edns.map(|e| e.max_payload()), Some(EDNS_PAYLOAD));
    let mut two = query("web.production.hello.graven.", RecordType::A);
    two.add_query(Query::query(
        Name::from_ascii("graven.").unwrap(),
        RecordType::A,
    ));
    assert_eq!(render(&zone.answer(&two, &HOST)), "Form Error\n");
    // Bytes that do not parse get FORMERR with their id; an answer or a scrap, nothing.
    let mut bytes = query("web.production.hello.graven.", RecordType::A)
        .to_vec()
        .unwrap();
    bytes.truncate(20);
    assert!(Message::from_vec(&bytes).is_err());
    let formerr = malformed(&bytes).unwrap();
    assert_eq!(
        (formerr.metadata.id, render(&formerr).as_str()),
        (4242, "Form Error\n")
    );
    bytes[2] |= 0x80;
    assert_eq!(malformed(&bytes), None);
    assert_eq!(malformed(&bytes[..11]), None);
}

#[test]
fn a_big_answer_is_truncated_over_plain_udp_and_whole_with_edns_or_tcp() {
    use crate::dns::server::{Transport, respond};
    let mut events = release("web", 1, RouteKind::Http);
    let names: Vec<String> = (0..50).map(|i| format!("web-{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        events.extend(instance("web", 1, name, [10, 213, 1, i as u8]));
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    events.push(routed("web", &names));
    let web = snapshot("hello", "production", events, &[("web", "127.0.0.1:8080")]);
    let zone = zone(&[web]);
    let ask = |edns: bool, transport: Transport| {
        let mut request = query("instances.web.production.hello.graven.", RecordType::A);
        if edns {
            // As dig offers it.
            let mut offer = Edns::new();
            offer.set_max_payload(1232);
            request.set_edns(offer);
        }
        let bytes = respond(&request.to_vec().unwrap(), &HOST, &zone, transport).unwrap();
        let response = Message::from_vec(&bytes).unwrap();
        assert_eq!(response.metadata.id, 4242);
        (
            response.metadata.truncation,
            response.answers.len(),
            bytes.len(),
        )
    };
    // 50 addresses are about 850 bytes: past 512, within EDNS's 1232.
    let (truncated, answers, size) = ask(false, Transport::Udp);
    assert!(truncated && answers == 0 && size <= 512, "{size}");
    let (truncated, answers, _) = ask(true, Transport::Udp);
    assert_eq!((truncated, answers), (false, 50));
    let (truncated, answers, _) = ask(false, Transport::Tcp);
    assert_eq!((truncated, answers), (false, 50));
}

#[test]
fn an_ipv6_route_is_aaaa() {
    let v6 = snapshot(
        "hello",
        "production",
        release("web", 1, RouteKind::Http),
        &[("web", "[::1]:8443")],
    );
    let zone = zone(&[v6]);
    check(
        &zone,
        &HOST,
        "web.production.hello.graven.",
        RecordType::AAAA,
        expect![[r#"
            No Error aa
            web.production.hello.graven. 5 IN AAAA ::1
        "#]],
    );
    check(
        &zone,
        &HOST,
        "web.production.hello.graven.",
        RecordType::A,
        expect![[r#"
            No Error aa
            authority graven. 5 IN SOA ns.graven. hostmaster.graven. 7 3600 600 86400 5
        "#]],
    );
    // Over the bridge, a loopback route is the daemon's bridge address, IPv4.
    check(
        &zone,
        &BRIDGE,
        "web.production.hello.graven.",
        RecordType::A,
        expect![[r#"
            No Error aa
            web.production.hello.graven. 5 IN A 10.213.0.7
        "#]],
    );
}

/// A UDP reader answers a query it has seen with the bytes it made the first time, under the
/// new query's own ID; another name, or the same name in another case, is made afresh, and
/// so is everything once the zone is swapped.
#[test]
fn a_cached_answer_carries_its_query_s_id_and_follows_the_zone() {
    use crate::dns::server::{AnswerCache, Transport, respond};
    let first = Arc::new(zone(&[hello()]));
    let mut cache = AnswerCache::new(first.clone());
    let mut ask = |zone: &Arc<Zone>, id: u16, name: &str| {
        let mut request = query(name, RecordType::A);
        request.metadata.id = id;
        let bytes = request.to_vec().unwrap();
        let mut made = false;
        let answer = cache
            .answer(zone, &bytes, |zone| {
                made = true;
                respond(&bytes, &HOST, zone, Transport::Udp)
            })
            .map(|answer| Message::from_vec(answer).unwrap())
            .unwrap();
        assert_eq!(answer.metadata.id, id);
        (render(&answer), made)
    };
    let web = "web.production.hello.graven.";
    let (answer, made) = ask(&first, 1, web);
    assert!(made);
    assert_eq!(ask(&first, 2, web), (answer.clone(), false));
    assert_eq!(ask(&first, 3, web), (answer.clone(), false));
    let (shouted, made) = ask(&first, 4, "WEB.production.hello.graven.");
    assert!(made);
    assert!(shouted.contains("WEB.production"), "{shouted}");
    let (_, made) = ask(&first, 5, "db.production.hello.graven.");
    assert!(made);
    // A zone without the service: the name is gone at once.
    let second = Arc::new(zone(&[]));
    let (gone, made) = ask(&second, 6, web);
    assert!(made);
    assert!(gone.starts_with("Non-Existent Domain"), "{gone}");
    assert_ne!(gone, answer);
}

/// A service's `srv_name` names its SRV record in place of the route kind's default, and the
/// default name is then gone.
#[test]
fn a_declared_srv_name_replaces_the_default_one() {
    let mut events = release("db", 2, RouteKind::Tcp);
    if let Event::ReleaseCreated { config, .. } = &mut events[0] {
        config.srv_name = Some("postgresql".to_owned());
    }
    let zone = zone(&[snapshot(
        "hello",
        "production",
        events,
        &[("db", "0.0.0.0:5432")],
    )]);
    check(
        &zone,
        &HOST,
        "_postgresql._tcp.db.production.hello.graven.",
        RecordType::SRV,
        expect![[r#"
            No Error aa
            _postgresql._tcp.db.production.hello.graven. 5 IN SRV 0 0 5432 db.production.hello.graven.
        "#]],
    );
    let response = zone.answer(
        &query("_db._tcp.db.production.hello.graven.", RecordType::SRV),
        &HOST,
    );
    assert_eq!(response.metadata.response_code, ResponseCode::NXDomain);
}
