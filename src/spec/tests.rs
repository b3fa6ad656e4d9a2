//! Data-driven tests of `parse`: a graven.toml in, the resolved project or every problem out.

use std::fmt::Write as _;
use std::path::Path;

use expect_test::{Expect, expect};

use super::*;

/// One line per fact of the resolved project, or one line per problem.
fn render(result: Result<Project, SpecErrors>) -> String {
    let project = match result {
        Ok(project) => project,
        Err(errors) => return errors.to_string(),
    };
    let mut out = format!(
        "app {} env {} build {:?} containerfile {} context {}\n",
        project.app,
        project.environment,
        project.build.map(|b| b.command),
        project.image.containerfile.display(),
        project.image.context.display(),
    );
    for service in project.services.values() {
        let h = &service.health;
        let d = &service.deploy;
        writeln!(
            out,
            "service {}: instances {} port {} route {:?} command {:?} env {:?}\n  \
             health {} every {:?} timeout {:?} up {} down {}\n  \
             deploy {:?} surge {} unavailable {} deadline {:?} stop_grace {:?}\n  \
             volumes {:?} limits {:?}",
            service.name,
            service.instances,
            service.port.map_or_else(
                || "none (EXPOSE, or a worker)".to_owned(),
                |p| p.to_string()
            ),
            service.route,
            service.command,
            service.env,
            h.path,
            h.interval,
            h.timeout,
            h.healthy_after,
            h.unhealthy_after,
            d.strategy,
            d.max_surge,
            d.max_unavailable,
            d.health_deadline,
            service.stop_grace,
            service
                .volumes
                .iter()
                .map(|v| format!("{}={}", v.name, v.path))
                .collect::<Vec<_>>(),
            service.limits,
        )
        .unwrap();
        // Only what differs from an http check without a start period, so the snapshots
        // written before health kinds existed stay as they were.
        if h.kind != crate::proxy::HealthKind::Http || !h.start_period.is_zero() {
            writeln!(
                out,
                "  health kind {:?} start_period {:?} table {}",
                h.kind, h.start_period, service.health_table
            )
            .unwrap();
        }
        if service.events_caught_up {
            writeln!(
                out,
                "  health events_caught_up table {}",
                service.health_table
            )
            .unwrap();
        }
    }
    out
}

fn check_env(source: &str, environment: &str, expected: Expect) {
    let result = parse(
        source,
        Path::new("graven.toml"),
        Path::new("/app"),
        environment,
    );
    expected.assert_eq(&render(result));
}

fn check(source: &str, expected: Expect) {
    check_env(source, "local", expected);
}

#[test]
fn a_minimal_file_takes_every_default() {
    check(
        r#"
app = "hello"
[services.web]
port = 8080
"#,
        expect![[r#"
            app hello env local build None containerfile /app/Containerfile context /app
            service web: instances 1 port 8080 route None command None env {}
              health /healthz every 1s timeout 1s up 2 down 3
              deploy Rolling surge 1 unavailable 0 deadline 30s stop_grace 10s
              volumes [] limits Limits { memory_bytes: None, pids: None, cpu_millis: None, tmp_bytes: None, log_bytes: None, log_age_s: None }
        "#]],
    );
}

#[test]
fn a_full_file_sets_every_field() {
    check(
        r#"
app = "shop"

[build]
command = "make"

[image]
containerfile = "deploy/Containerfile"
context = "./src"

[services.web]
instances = 1
port = 8080
route = ":8000"
command = ["/web", "--verbose"]
env = { GREETING = "hi", _X = "1" }
health = { path = "/ready", interval = "250ms", timeout = "100ms", healthy_after = 1, unhealthy_after = 5 }
deploy = { strategy = "rolling", max_surge = 2, max_unavailable = 1, health_deadline = "1m" }
stop_grace = "0s"
volumes = { cache = "/var/cache/web" }
limits = { memory = "512MiB", pids = 128, cpu = 1.5, tmp = "64M", log = "8MiB", log_age = "2d" }

[services.db]
instances = 0
port = 5432
"#,
        expect![[r#"
            app shop env local build Some("make") containerfile /app/deploy/Containerfile context /app/src
            service db: instances 0 port 5432 route None command None env {}
              health /healthz every 1s timeout 1s up 2 down 3
              deploy Rolling surge 1 unavailable 0 deadline 30s stop_grace 10s
              volumes [] limits Limits { memory_bytes: None, pids: None, cpu_millis: None, tmp_bytes: None, log_bytes: None, log_age_s: None }
            service web: instances 1 port 8080 route Some(127.0.0.1:8000) command Some(["/web", "--verbose"]) env {"GREETING": "hi", "_X": "1"}
              health /ready every 250ms timeout 100ms up 1 down 5
              deploy Rolling surge 2 unavailable 1 deadline 60s stop_grace 0ns
              volumes ["cache=/var/cache/web"] limits Limits { memory_bytes: Some(536870912), pids: Some(128), cpu_millis: Some(1500), tmp_bytes: Some(67108864), log_bytes: Some(8388608), log_age_s: Some(172800) }
        "#]],
    );
}

const OVERLAID: &str = r#"
app = "hello"

[services.web]
instances = 2
port = 8080
route = "127.0.0.1:8000"
env = { GREETING = "hello", LEVEL = "debug" }
health = { interval = "200ms", healthy_after = 3 }

[services.worker]
port = 9000

[environments.production.services.web]
instances = 4
route = "0.0.0.0:8080"
env = { LEVEL = "info" }
health = { timeout = "2s" }

[environments.staging]
"#;

#[test]
fn the_default_environment_ignores_overlays() {
    check(
        OVERLAID,
        expect![[r#"
            app hello env local build None containerfile /app/Containerfile context /app
            service web: instances 2 port 8080 route Some(127.0.0.1:8000) command None env {"GREETING": "hello", "LEVEL": "debug"}
              health /healthz every 200ms timeout 1s up 3 down 3
              deploy Rolling surge 1 unavailable 0 deadline 30s stop_grace 10s
              volumes [] limits Limits { memory_bytes: None, pids: None, cpu_millis: None, tmp_bytes: None, log_bytes: None, log_age_s: None }
            service worker: instances 1 port 9000 route None command None env {}
              health /healthz every 1s timeout 1s up 2 down 3
              deploy Rolling surge 1 unavailable 0 deadline 30s stop_grace 10s
              volumes [] limits Limits { memory_bytes: None, pids: None, cpu_millis: None, tmp_bytes: None, log_bytes: None, log_age_s: None }
        "#]],
    );
}

#[test]
fn an_overlay_replaces_field_by_field() {
    // instances and route replaced, env merged key by key, health merged field by field.
    check_env(
        OVERLAID,
        "production",
        expect![[r#"
            app hello env production build None containerfile /app/Containerfile context /app
            service web: instances 4 port 8080 route Some(0.0.0.0:8080) command None env {"GREETING": "hello", "LEVEL": "info"}
              health /healthz every 200ms timeout 2s up 3 down 3
              deploy Rolling surge 1 unavailable 0 deadline 30s stop_grace 10s
              volumes [] limits Limits { memory_bytes: None, pids: None, cpu_millis: None, tmp_bytes: None, log_bytes: None, log_age_s: None }
            service worker: instances 1 port 9000 route None command None env {}
              health /healthz every 1s timeout 1s up 2 down 3
              deploy Rolling surge 1 unavailable 0 deadline 30s stop_grace 10s
              volumes [] limits Limits { memory_bytes: None, pids: None, cpu_millis: None, tmp_bytes: None, log_bytes: None, log_age_s: None }
        "#]],
    );
}

#[test]
fn an_empty_environment_table_is_the_base() {
    let staging = parse(OVERLAID, Path::new("g"), Path::new("/app"), "staging").unwrap();
    let local = parse(OVERLAID, Path::new("g"), Path::new("/app"), "local").unwrap();
    assert_eq!(staging.services, local.services);
    assert_eq!(staging.environment, "staging");
}

#[test]
fn an_unknown_environment_lists_the_known_ones() {
    check_env(
        OVERLAID,
        "prod",
        expect![[
            r#"graven.toml:14:2: environments: environment "prod" is not defined (known: "local", "production", "staging")"#
        ]],
    );
    check_env(
        OVERLAID,
        "stagin",
        expect![[
            r#"graven.toml:14:2: environments: environment "stagin" is not defined (known: "local", "production", "staging"); did you mean "staging"?"#
        ]],
    );
    check_env(
        "app = \"a\"\n[services.web]\nport = 1\n",
        "production",
        expect![[
            r#"graven.toml:1:1: environments: environment "production" is not defined (known: "local")"#
        ]],
    );
}

#[test]
fn the_local_environment_may_have_a_table() {
    check(
        r#"
app = "a"
[services.web]
port = 1
[environments.local.services.web]
instances = 0
"#,
        expect![[r#"
            app a env local build None containerfile /app/Containerfile context /app
            service web: instances 0 port 1 route None command None env {}
              health /healthz every 1s timeout 1s up 2 down 3
              deploy Rolling surge 1 unavailable 0 deadline 30s stop_grace 10s
              volumes [] limits Limits { memory_bytes: None, pids: None, cpu_millis: None, tmp_bytes: None, log_bytes: None, log_age_s: None }
        "#]],
    );
}

#[test]
fn unknown_fields_at_every_level_are_all_reported_with_suggestions() {
    check(
        r#"
app = "a"
ap = "b"
[biuld]
command = "x"
[build]
comand = "make"
[image]
containerfil = "C"
[services.web]
port = 1
instance = 2
helth = { path = "/" }
health = { intervl = "1s" }
deploy = { max_surg = 1 }
limits = { memroy = "1G" }
whatever = 1
[environments.production]
service = {}
[environments.staging.services.web]
prot = 2
"#,
        expect![[r#"
            graven.toml:3:1: ap: unknown field "ap"; did you mean "app"?
            graven.toml:4:2: biuld: unknown field "biuld"; did you mean "build"?
            graven.toml:7:1: build.comand: unknown field "comand"; did you mean "command"?
            graven.toml:9:1: image.containerfil: unknown field "containerfil"; did you mean "containerfile"?
            graven.toml:12:1: services.web.instance: unknown field "instance"; did you mean "instances"?
            graven.toml:13:1: services.web.helth: unknown field "helth"; did you mean "health"?
            graven.toml:14:12: services.web.health.intervl: unknown field "intervl"; did you mean "interval"?
            graven.toml:15:12: services.web.deploy.max_surg: unknown field "max_surg"; did you mean "max_surge"?
            graven.toml:16:12: services.web.limits.memroy: unknown field "memroy"; did you mean "memory"?
            graven.toml:17:1: services.web.whatever: unknown field "whatever" (known: "instances", "port", "route", "route_threads", "srv_name", "command", "env", "health", "deploy", "stateful", "stop_grace", "volumes", "limits", "network", "outbound", "entrypoint", "user", "tmpfs", "drift", "phoenix")
            graven.toml:19:1: environments.production.service: unknown field "service"; did you mean "services"?
            graven.toml:21:1: environments.staging.services.web.prot: unknown field "prot"; did you mean "port"?"#]],
    );
}

#[test]
fn tables_of_the_wrong_type_are_reported_and_the_rest_still_checked() {
    check(
        r#"
app = "a"
build = "make"
[services.web]
port = 0
health = 5
[services.api]
env = ["A=1"]
port = 2
"#,
        expect![[r#"
            graven.toml:3:9: build: expected a table, found string "make"
            graven.toml:5:8: services.web.port: 0 is out of range: it must be between 1 and 65535
            graven.toml:6:10: services.web.health: expected a table, found integer 5
            graven.toml:8:7: services.api.env: expected a table, found an array"#]],
    );
}

#[test]
fn values_of_the_wrong_type_name_what_was_expected() {
    check(
        r#"
app = 1
[build]
command = ["make"]
[services.web]
instances = "two"
port = 8080.0
route = 8000
command = "/app --flag"
env = { A = 1 }
stop_grace = 10
volumes = { data = true }
health = { healthy_after = "2" }
deploy = { strategy = 1 }
limits = { memory = true, pids = "10", cpu = [] }
"#,
        expect![[r#"
            graven.toml:2:7: app: expected a string, found integer 1
            graven.toml:4:11: build.command: expected a string, found an array
            graven.toml:6:13: services.web.instances: expected an integer, found string "two"
            graven.toml:7:8: services.web.port: expected an integer, found float 8080
            graven.toml:8:9: services.web.route: expected a string, found integer 8000
            graven.toml:9:11: services.web.command: expected an array of strings, found string "/app --flag"
            graven.toml:10:13: services.web.env.A: expected a string, or { secret = "name" } for a secret, found integer 1
            graven.toml:11:14: services.web.stop_grace: expected a string, found integer 10
            graven.toml:12:20: services.web.volumes.data: expected a string, found boolean true
            graven.toml:13:28: services.web.health.healthy_after: expected an integer, found string "2"
            graven.toml:14:23: services.web.deploy.strategy: expected a string, found integer 1
            graven.toml:15:21: services.web.limits.memory: expected a size such as "64MiB", found boolean true
            graven.toml:15:34: services.web.limits.pids: expected an integer, found string "10"
            graven.toml:15:46: services.web.limits.cpu: expected cores (0.5, 2) or millicores ("500m"), found an array"#]],
    );
}

#[test]
fn every_range_rule() {
    check(
        r#"
app = "My App"
[build]
command = "  "
[image]
context = ""
[services.Web_1]
port = 1
[services.web]
instances = -1
port = 65536
route = "localhost:80"
command = []
env = { "1BAD" = "x", PORT = "80", "A-B" = "y" }
health = { path = "healthz", interval = "0s", timeout = "1x", healthy_after = 0, unhealthy_after = 0 }
deploy = { strategy = "canary", max_surge = -1, max_unavailable = 0, health_deadline = "0ms" }
stop_grace = "forever"
volumes = { Data = "/data", logs = "relative", tmp = "/" }
limits = { memory = "0", pids = -1, cpu = 0, tmp = "12 parsecs", log = 0, log_age = "0s" }
[services.api]
port = 2
command = [""]
deploy = { max_surge = 0, max_unavailable = 0 }
volumes = { a = "/data", b = "/data" }
"#,
        expect![[r#"
            graven.toml:2:7: app: app name "My App" must be a DNS label: 1 to 63 lowercase letters, digits or '-', not starting or ending with '-'
            graven.toml:4:11: build.command: the build command is empty
            graven.toml:6:11: image.context: the path is empty
            graven.toml:7:11: services.Web_1: service name "Web_1" must be a DNS label: 1 to 63 lowercase letters, digits or '-', not starting or ending with '-'
            graven.toml:10:13: services.web.instances: -1 is out of range: it must be at least 0
            graven.toml:11:8: services.web.port: 65536 is out of range: it must be between 1 and 65535
            graven.toml:12:9: services.web.route: "localhost:80" is not a route: write IP:PORT, e.g. "127.0.0.1:8000", ":8000" or "tcp://:5432"
            graven.toml:13:11: services.web.command: the command needs a program: ["/app", "--flag"]
            graven.toml:14:9: services.web.env.1BAD: "1BAD" is not a valid environment variable name (letters, digits and '_', not starting with a digit)
            graven.toml:14:23: services.web.env.PORT: PORT is set by graven from the service's `port`; set `port` instead
            graven.toml:14:36: services.web.env.A-B: "A-B" is not a valid environment variable name (letters, digits and '_', not starting with a digit)
            graven.toml:15:19: services.web.health.path: "healthz" must be a path starting with '/', e.g. "/healthz"
            graven.toml:15:41: services.web.health.interval: "0s" must be longer than zero
            graven.toml:15:57: services.web.health.timeout: "1x" is not a duration (try "1s", "500ms")
            graven.toml:15:79: services.web.health.healthy_after: 0 is out of range: it must be at least 1
            graven.toml:15:100: services.web.health.unhealthy_after: 0 is out of range: it must be at least 1
            graven.toml:16:23: services.web.deploy.strategy: unknown strategy "canary" (known: "rolling", "recreate")
            graven.toml:16:45: services.web.deploy.max_surge: -1 is out of range: it must be at least 0
            graven.toml:16:88: services.web.deploy.health_deadline: "0ms" must be longer than zero
            graven.toml:17:14: services.web.stop_grace: "forever" is not a duration (try "1s", "500ms")
            graven.toml:18:13: services.web.volumes.Data: volume name "Data" must be a DNS label: 1 to 63 lowercase letters, digits or '-', not starting or ending with '-'
            graven.toml:18:36: services.web.volumes.logs: "relative" is not an absolute path
            graven.toml:18:54: services.web.volumes.tmp: "/" cannot be a mount point
            graven.toml:19:21: services.web.limits.memory: a size limit must be larger than zero
            graven.toml:19:33: services.web.limits.pids: -1 is out of range: it must be between 0 and 9223372036854775807
            graven.toml:19:43: services.web.limits.cpu: 0 is not a cpu share: it must be at least 0.001 cores
            graven.toml:19:52: services.web.limits.tmp: "12 parsecs" is not a size (try "64MiB", "512M", "1G")
            graven.toml:19:72: services.web.limits.log: a size limit must be larger than zero
            graven.toml:19:85: services.web.limits.log_age: "0s" must be longer than zero
            graven.toml:22:11: services.api.command: the command needs a program: ["/app", "--flag"]
            graven.toml:23:24: services.api.deploy.max_surge: max_surge + max_unavailable must be at least 1, or a deploy could never replace an instance
            graven.toml:24:30: services.api.volumes.b: "/data" is already where volume "a" is mounted"#]],
    );
}

#[test]
fn missing_required_fields() {
    check(
        "[services.web]\nroute = \"127.0.0.1:9000\"\n[build]\n",
        expect![[r#"
            graven.toml:1:1: app: missing field "app": name the application, e.g. app = "hello"
            graven.toml:3:1: build: missing field "command": the command that builds the app"#]],
    );
    // A health check that connects needs a port, and says so.
    check(
        "app = \"a\"\n[services.db.health]\nkind = \"tcp\"\n",
        expect![[r#"
            app a env local build None containerfile /app/Containerfile context /app
            service db: instances 1 port none (EXPOSE, or a worker) route None command None env {}
              health /healthz every 1s timeout 1s up 2 down 3
              deploy Rolling surge 1 unavailable 0 deadline 30s stop_grace 10s
              volumes [] limits Limits { memory_bytes: None, pids: None, cpu_millis: None, tmp_bytes: None, log_bytes: None, log_age_s: None }
              health kind Tcp start_period 0ns table true
        "#]],
    );
    check(
        "app = \"a\"\n",
        expect![[
            r#"graven.toml:1:1: services: no services: describe at least one in a [services.NAME] table"#
        ]],
    );
    check(
        "app = \"a\"\nservices = {}\n",
        expect![[
            r#"graven.toml:2:12: services: no services: describe at least one in a [services.NAME] table"#
        ]],
    );
}

#[test]
fn two_services_may_not_share_a_route() {
    check(
        r#"
app = "a"
[services.a]
port = 1
route = ":8000"
[services.b]
port = 1
route = "0.0.0.0:8000"
[services.c]
port = 1
route = "127.0.0.2:8001"
[services.d]
port = 1
route = "127.0.0.1:0"
[services.e]
port = 1
route = "127.0.0.1:0"
[environments.production.services.c]
route = "127.0.0.1:8000"
"#,
        expect![[r#"
            graven.toml:8:9: services.b.route: 0.0.0.0:8000 overlaps the route of service "a": two services cannot share a listening address
            graven.toml:19:9: environments.production.services.c.route: 127.0.0.1:8000 overlaps the route of service "a" in environment "production": two services cannot share a listening address"#]],
    );
}

#[test]
fn overlays_are_checked_even_when_another_environment_is_wanted() {
    check(
        r#"
app = "a"
[services.web]
port = 1
[environments.production.services.web]
instances = -4
deploy = { max_surge = 0 }
[environments.production.services.wbe]
port = 2
[environments.Bad.services.web]
"#,
        expect![[r#"
            graven.toml:6:13: environments.production.services.web.instances: -4 is out of range: it must be at least 0
            graven.toml:7:24: environments.production.services.web.deploy.max_surge: max_surge + max_unavailable must be at least 1, or a deploy could never replace an instance (in environment "production")
            graven.toml:8:35: environments.production.services.wbe: no service "wbe" in [services] to override (known: "web"); did you mean "web"?
            graven.toml:10:15: environments.Bad: environment name "Bad" must be a DNS label: 1 to 63 lowercase letters, digits or '-', not starting or ending with '-'"#]],
    );
}

#[test]
fn an_overlay_can_make_a_rule_fail_only_in_its_environment() {
    check_env(
        r#"
app = "a"
[services.web]
port = 1
deploy = { max_unavailable = 0 }
[environments.production.services.web]
deploy = { max_surge = 0 }
"#,
        "local",
        expect![[
            r#"graven.toml:7:24: environments.production.services.web.deploy.max_surge: max_surge + max_unavailable must be at least 1, or a deploy could never replace an instance (in environment "production")"#
        ]],
    );
}

#[test]
fn syntax_errors_are_reported_with_their_place() {
    check(
        "app = \"a\"\n[services.web]\nport = 1\nroute = \"unterminated\nenv = {\n",
        expect![[r#"
            graven.toml:4:22: invalid basic string, expected `"`
            graven.toml:5:8: unclosed inline table, expected `}`"#]],
    );
}

#[test]
fn env_values_may_name_secrets_which_stay_apart_from_plain_values() {
    let source = r#"
app = "hello"
[services.web]
port = 8080
env = { GREETING = "hi", DB_PASSWORD = { secret = "db-password" } }
[services.worker]
port = 9000
[services.worker.env]
TOKEN = { secret = "api.token_2" }
[environments.production.services.web]
env = { GREETING = { secret = "greeting" }, DB_PASSWORD = "plain-in-prod" }
"#;
    let local = parse(source, Path::new("g"), Path::new("/app"), "local").unwrap();
    let web = &local.services["web"];
    assert_eq!(web.env, BTreeMap::from([("GREETING".into(), "hi".into())]));
    assert_eq!(
        web.secrets,
        BTreeMap::from([("DB_PASSWORD".into(), "db-password".into())])
    );
    assert_eq!(
        local.services["worker"].secrets,
        BTreeMap::from([("TOKEN".into(), "api.token_2".into())])
    );
    // An overlay replaces a variable whichever form either side has.
    let production = parse(source, Path::new("g"), Path::new("/app"), "production").unwrap();
    let web = &production.services["web"];
    assert_eq!(
        web.env,
        BTreeMap::from([("DB_PASSWORD".into(), "plain-in-prod".into())])
    );
    assert_eq!(
        web.secrets,
        BTreeMap::from([("GREETING".into(), "greeting".into())])
    );
}

#[test]
fn bad_secret_references_are_reported_with_their_place() {
    check(
        r#"app = "a"
[services.web]
port = 1
env = { A = { secret = "../etc" }, B = { secrte = "x" }, C = { secret = 3 }, D = 4, E = {}, F = { secret = "ok", other = "x" } }
"#,
        expect![[r#"
            graven.toml:4:13: services.web.env.A: secret name "../etc" is not valid: 1 to 63 lowercase letters, digits, '-', '_' or '.', starting with a letter or a digit
            graven.toml:4:40: services.web.env.B: unknown field "secrte" in a secret reference; did you mean "secret"?
            graven.toml:4:62: services.web.env.C: a secret reference names the secret with a string, found integer 3
            graven.toml:4:82: services.web.env.D: expected a string, or { secret = "name" } for a secret, found integer 4
            graven.toml:4:89: services.web.env.E: expected a string, or { secret = "name" } for a secret, found an empty table
            graven.toml:4:97: services.web.env.F: unknown field "other" in a secret reference: it has one field, { secret = "name" }"#]],
    );
}

#[test]
fn the_example_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello");
    for environment in ["local", "production"] {
        let project = load(&dir, environment).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(project.app, "hello");
        assert!(project.services.contains_key("web"));
    }
}

#[test]
fn a_missing_file_is_one_problem_without_a_place() {
    let errors = load(Path::new("/nonexistent/graven"), "local").unwrap_err();
    assert_eq!(
        errors.to_string(),
        "/nonexistent/graven/graven.toml: cannot read the project file: No such file or directory (os error 2)"
    );
}

/// Until a cargo-fuzz target runs in CI: every truncation and a few thousand seeded
/// mutations of real files must give a project or placed problems, never a panic.
#[test]
fn mangled_files_never_panic() {
    let sources = [
        include_str!("../../examples/hello/graven.toml"),
        include_str!("../../tests/data/spec/typos.toml"),
        include_str!("../../tests/data/spec/worker-and-db.toml"),
    ];
    let check = |source: &str| {
        if let Err(errors) = parse(source, Path::new("g"), Path::new("/app"), "production") {
            assert!(!errors.problems.is_empty());
            for problem in &errors.problems {
                assert!(problem.line >= 1 && problem.column >= 1, "{problem}");
            }
        }
    };
    let alphabet: Vec<char> = "[]{}=\".,# \n'0a_-:\u{e9}".chars().collect();
    let mut rng = fastrand::Rng::with_seed(4);
    for source in sources {
        for (end, _) in source.char_indices() {
            check(&source[..end]);
        }
        let chars: Vec<char> = source.chars().collect();
        for _ in 0..2000 {
            let mut mangled = chars.clone();
            for _ in 0..rng.usize(1..4) {
                let at = rng.usize(..mangled.len());
                match rng.u8(..3) {
                    0 => mangled[at] = alphabet[rng.usize(..alphabet.len())],
                    1 => mangled.insert(at, alphabet[rng.usize(..alphabet.len())]),
                    _ => {
                        mangled.remove(at);
                    }
                }
            }
            check(&mangled.into_iter().collect::<String>());
        }
    }
}

#[test]
fn keep_releases_is_read_per_environment() {
    let base = r#"
app = "a"
[services.web]
port = 8080
[environments.few.services.web]
deploy = { keep_releases = 3 }
[environments.ten.services.web]
deploy = { keep_releases = 10 }
"#;
    let service = |environment: &str| {
        parse(base, Path::new("g"), Path::new("/app"), environment)
            .unwrap()
            .services["web"]
            .clone()
    };
    assert_eq!(service("local").deploy.keep_releases, DEFAULT_KEEP_RELEASES);
    assert_eq!(service("few").deploy.keep_releases, 3);
    assert_eq!(service("ten").deploy.keep_releases, 10);
    check(
        "app = \"a\"\n[services.web]\nport = 1\ndeploy = { keep_releases = 0 }\n",
        expect![[r#"
            graven.toml:4:28: services.web.deploy.keep_releases: 0 is out of range: it must be at least 1"#]],
    );
}

#[test]
fn health_kinds_and_workers() {
    // A worker: no route, no port, no health table: checked as alive, no port needed.
    check(
        r#"
app = "a"
[services.worker]
command = ["/worker"]
"#,
        expect![[r#"
            app a env local build None containerfile /app/Containerfile context /app
            service worker: instances 1 port none (EXPOSE, or a worker) route None command Some(["/worker"]) env {}
              health /healthz every 1s timeout 1s up 2 down 3
              deploy Rolling surge 1 unavailable 0 deadline 30s stop_grace 10s
              volumes [] limits Limits { memory_bytes: None, pids: None, cpu_millis: None, tmp_bytes: None, log_bytes: None, log_age_s: None }
              health kind None start_period 0ns table false
        "#]],
    );
    // A port alone keeps today's http check.
    check(
        r#"
app = "a"
[services.web]
port = 8080
"#,
        expect![[r#"
            app a env local build None containerfile /app/Containerfile context /app
            service web: instances 1 port 8080 route None command None env {}
              health /healthz every 1s timeout 1s up 2 down 3
              deploy Rolling surge 1 unavailable 0 deadline 30s stop_grace 10s
              volumes [] limits Limits { memory_bytes: None, pids: None, cpu_millis: None, tmp_bytes: None, log_bytes: None, log_age_s: None }
        "#]],
    );
    check(
        r#"
app = "a"
[services.db]
port = 5432
health = { kind = "tcp", start_period = "5s" }
[services.pg]
health = { command = ["pg_isready", "-q"] }
[services.sh]
health = { kind = "exec", command = "test -f /tmp/ready" }
[services.job]
health = { kind = "none" }
"#,
        expect![[r#"
            app a env local build None containerfile /app/Containerfile context /app
            service db: instances 1 port 5432 route None command None env {}
              health /healthz every 1s timeout 1s up 2 down 3
              deploy Rolling surge 1 unavailable 0 deadline 30s stop_grace 10s
              volumes [] limits Limits { memory_bytes: None, pids: None, cpu_millis: None, tmp_bytes: None, log_bytes: None, log_age_s: None }
              health kind Tcp start_period 5s table true
            service job: instances 1 port none (EXPOSE, or a worker) route None command None env {}
              health /healthz every 1s timeout 1s up 2 down 3
              deploy Rolling surge 1 unavailable 0 deadline 30s stop_grace 10s
              volumes [] limits Limits { memory_bytes: None, pids: None, cpu_millis: None, tmp_bytes: None, log_bytes: None, log_age_s: None }
              health kind None start_period 0ns table true
            service pg: instances 1 port none (EXPOSE, or a worker) route None command None env {}
              health /healthz every 1s timeout 1s up 2 down 3
              deploy Rolling surge 1 unavailable 0 deadline 30s stop_grace 10s
              volumes [] limits Limits { memory_bytes: None, pids: None, cpu_millis: None, tmp_bytes: None, log_bytes: None, log_age_s: None }
              health kind Exec { command: ["pg_isready", "-q"] } start_period 0ns table true
            service sh: instances 1 port none (EXPOSE, or a worker) route None command None env {}
              health /healthz every 1s timeout 1s up 2 down 3
              deploy Rolling surge 1 unavailable 0 deadline 30s stop_grace 10s
              volumes [] limits Limits { memory_bytes: None, pids: None, cpu_millis: None, tmp_bytes: None, log_bytes: None, log_age_s: None }
              health kind Exec { command: ["/bin/sh", "-c", "test -f /tmp/ready"] } start_period 0ns table true
        "#]],
    );
}

#[test]
fn events_caught_up_is_read_and_alone_keeps_the_images_healthcheck() {
    check(
        r#"
app = "a"
[services.alone]
health = { events_caught_up = true }
[services.http]
health = { path = "/ready", events_caught_up = true }
[services.off]
health = { events_caught_up = false }
"#,
        expect![[r#"
            app a env local build None containerfile /app/Containerfile context /app
            service alone: instances 1 port none (EXPOSE, or a worker) route None command None env {}
              health /healthz every 1s timeout 1s up 2 down 3
              deploy Rolling surge 1 unavailable 0 deadline 30s stop_grace 10s
              volumes [] limits Limits { memory_bytes: None, pids: None, cpu_millis: None, tmp_bytes: None, log_bytes: None, log_age_s: None }
              health kind None start_period 0ns table false
              health events_caught_up table false
            service http: instances 1 port none (EXPOSE, or a worker) route None command None env {}
              health /ready every 1s timeout 1s up 2 down 3
              deploy Rolling surge 1 unavailable 0 deadline 30s stop_grace 10s
              volumes [] limits Limits { memory_bytes: None, pids: None, cpu_millis: None, tmp_bytes: None, log_bytes: None, log_age_s: None }
              health kind None start_period 0ns table true
              health events_caught_up table true
            service off: instances 1 port none (EXPOSE, or a worker) route None command None env {}
              health /healthz every 1s timeout 1s up 2 down 3
              deploy Rolling surge 1 unavailable 0 deadline 30s stop_grace 10s
              volumes [] limits Limits { memory_bytes: None, pids: None, cpu_millis: None, tmp_bytes: None, log_bytes: None, log_age_s: None }
              health kind None start_period 0ns table false
        "#]],
    );
    check(
        r#"
app = "a"
[services.typo]
health = { events_caught_up = "yes" }
"#,
        expect![[
            r#"graven.toml:4:31: services.typo.health.events_caught_up: expected true or false, found string "yes""#
        ]],
    );
}

#[test]
fn health_kinds_that_cannot_work_are_reported() {
    check(
        r#"
app = "a"
[services.a]
health = { kind = "exec" }
[services.b]
health = { kind = "tcp" }
[services.c]
port = 1
health = { kind = "http", command = ["true"] }
[services.d]
health = { kind = "ping" }
[services.e]
health = { command = [] }
[services.f]
health = { command = 7 }
[services.g]
route = "127.0.0.1:9000"
health = { kind = "none" }
"#,
        expect![[r#"
            graven.toml:4:19: services.a.health.kind: an exec health check needs a command, e.g. command = ["pg_isready", "-q"] or a string run by /bin/sh -c
            graven.toml:9:37: services.c.health.command: a command is only run by kind = "exec", not "http"
            graven.toml:11:19: services.d.health.kind: unknown health kind "ping" (known: "http", "tcp", "exec", "none")
            graven.toml:13:22: services.e.health.command: the command needs a program: ["pg_isready", "-q"]
            graven.toml:15:22: services.f.health.command: a command is a list (run as it is) or a string (run by /bin/sh -c)"#]],
    );
}

#[test]
fn network_and_outbound_per_service_and_per_environment() {
    let source = r#"
app = "a"
[services.web]
port = 80
[services.db]
port = 5432
network = "host"
[services.worker]
port = 1
outbound = false
[environments.production.services.web]
network = "host"
"#;
    let parsed = |environment: &str| {
        parse(
            source,
            Path::new("graven.toml"),
            Path::new("/app"),
            environment,
        )
        .unwrap()
    };
    let facts = |project: &Project| -> Vec<(String, bool, bool)> {
        project
            .services
            .values()
            .map(|s| (s.name.clone(), s.host_network, s.outbound))
            .collect()
    };
    let owned = |v: &[(&str, bool, bool)]| -> Vec<(String, bool, bool)> {
        v.iter().map(|(n, h, o)| (n.to_string(), *h, *o)).collect()
    };
    assert_eq!(
        facts(&parsed("local")),
        owned(&[
            ("db", true, true),
            ("web", false, true),
            ("worker", false, false)
        ])
    );
    assert_eq!(
        facts(&parsed("production")),
        owned(&[
            ("db", true, true),
            ("web", true, true),
            ("worker", false, false)
        ])
    );
    check(
        "app = \"a\"\n[services.web]\nport = 80\nnetwork = \"bridge\"\noutbound = \"no\"\n",
        expect![[r#"
            graven.toml:4:11: services.web.network: "bridge" is not a network: write "private" or "host"
            graven.toml:5:12: services.web.outbound: expected true or false, found string "no""#]],
    );
}

#[test]
fn the_image_settings_keys_are_read_and_checked() {
    let project = parse(
        r#"
app = "a"
[services.web]
entrypoint = []
command = ["nginx", "-g", "daemon off;"]
user = "www-data:www-data"
tmpfs = { "/run" = "16MiB", "/var/lib/nginx" = "64MiB" }
"#,
        Path::new("graven.toml"),
        Path::new("/app"),
        "local",
    )
    .unwrap();
    let web = &project.services["web"];
    assert_eq!(
        web.port, None,
        "no port: the deploy takes the image's EXPOSE"
    );
    assert_eq!(web.entrypoint, Some(vec![]));
    assert_eq!(web.user.as_deref(), Some("www-data:www-data"));
    let tmpfs: Vec<(&str, u64)> = web.tmpfs.iter().map(|t| (&*t.path, t.bytes)).collect();
    assert_eq!(tmpfs, [("/run", 16 << 20), ("/var/lib/nginx", 64 << 20)]);
    check(
        r#"
app = "a"
[services.web]
entrypoint = ["", "x"]
user = "a:b:c"
tmpfs = { "run" = "1M", "/cache" = 0, "/x" = "lots" }
[services.api]
user = " "
volumes = { data = "/var/lib/data" }
tmpfs = { "/var/lib" = "1M" }
[services.db]
tmpfs = { "/run" = "1M", "/run/db" = "1M" }
"#,
        expect![[r#"
            graven.toml:4:14: services.web.entrypoint: the entrypoint needs a program: ["/entry", "--flag"], or [] for none
            graven.toml:5:8: services.web.user: "a:b:c" is not a user: write name[:group] or uid[:gid], e.g. "www-data"
            graven.toml:6:11: services.web.tmpfs.run: "run" is not an absolute path
            graven.toml:6:36: services.web.tmpfs./cache: a size limit must be larger than zero
            graven.toml:6:46: services.web.tmpfs./x: "lots" is not a size (try "64MiB", "512M", "1G")
            graven.toml:8:8: services.api.user: " " is not a user: write name[:group] or uid[:gid], e.g. "www-data"
            graven.toml:10:9: services.api.tmpfs: tmpfs "/var/lib": it overlaps volume "data" mounted at /var/lib/data
            graven.toml:12:9: services.db.tmpfs: tmpfs "/run/db": it overlaps the tmpfs at /run"#]],
    );
}

#[test]
fn drift_keys_per_service_and_per_environment() {
    let source = r#"
app = "a"
[services.web]
port = 80
drift = { interval = "500ms", exec_tmp = true, allow_exec = ["/data/bin"] }
[services.api]
port = 81
[environments.production.services.web.drift]
interval = "30s"
"#;
    let parsed = |environment: &str| {
        parse(
            source,
            Path::new("graven.toml"),
            Path::new("/app"),
            environment,
        )
        .unwrap()
    };
    let local = parsed("local");
    assert_eq!(
        local.services["web"].drift,
        super::Drift {
            interval: Some(Duration::from_millis(500)),
            exec_tmp: true,
            allow_exec: vec!["/data/bin".to_owned()],
        }
    );
    assert_eq!(local.services["api"].drift, super::Drift::default());
    // An overlay replaces the keys it sets, one by one.
    let production = parsed("production");
    assert_eq!(
        production.services["web"].drift.interval,
        Some(Duration::from_secs(30))
    );
    assert!(production.services["web"].drift.exec_tmp);
    check(
        "app = \"a\"\n[services.web]\nport = 80\ndrift = { interval = \"0s\", allow_exec = [\"bin\"], allow = 1 }\n",
        expect![[r#"
            graven.toml:4:22: services.web.drift.interval: the interval must be more than zero
            graven.toml:4:41: services.web.drift.allow_exec: "bin" is not an absolute path
            graven.toml:4:50: services.web.drift.allow: unknown field "allow" (known: "interval", "exec_tmp", "allow_exec")"#]],
    );
}

#[test]
fn a_stateful_service_is_replaced_stop_first() {
    check(
        r#"
app = "db"
[services.pg]
port = 5432
stateful = true
volumes = { pgdata = "/var/lib/postgresql/data" }
[services.cache]
port = 6379
deploy = { strategy = "recreate" }
"#,
        expect![[r#"
            app db env local build None containerfile /app/Containerfile context /app
            service cache: instances 1 port 6379 route None command None env {}
              health /healthz every 1s timeout 1s up 2 down 3
              deploy Recreate surge 1 unavailable 0 deadline 30s stop_grace 10s
              volumes [] limits Limits { memory_bytes: None, pids: None, cpu_millis: None, tmp_bytes: None, log_bytes: None, log_age_s: None }
            service pg: instances 1 port 5432 route None command None env {}
              health /healthz every 1s timeout 1s up 2 down 3
              deploy Recreate surge 1 unavailable 0 deadline 30s stop_grace 10s
              volumes ["pgdata=/var/lib/postgresql/data"] limits Limits { memory_bytes: None, pids: None, cpu_millis: None, tmp_bytes: None, log_bytes: None, log_age_s: None }
        "#]],
    );
}

#[test]
fn what_a_volume_or_a_stateful_service_cannot_guarantee_is_refused() {
    check(
        r#"
app = "db"
[services.pg]
port = 5432
instances = 2
stateful = true
deploy = { strategy = "rolling", max_surge = 1 }
[services.shared]
port = 80
instances = 3
volumes = { data = "/data" }
[services.cache]
port = 6379
deploy = { strategy = "recreate", max_unavailable = 1 }
"#,
        expect![[r#"
            graven.toml:5:13: services.pg.instances: service "pg" has instances = 2: a stateful service runs a single instance
            graven.toml:7:23: services.pg.deploy.strategy: a stateful service is replaced stop-first: write strategy = "recreate" or leave it out (stateful = true at services.pg.stateful)
            graven.toml:7:46: services.pg.deploy.max_surge: a stop-first service never runs two instances of a release at once: leave max_surge and max_unavailable out
            graven.toml:10:13: services.shared.instances: service "shared" has instances = 3: volume "data" is owned by one live instance at a time, so they cannot share it
            graven.toml:14:53: services.cache.deploy.max_unavailable: a stop-first service never runs two instances of a release at once: leave max_surge and max_unavailable out"#]],
    );
}

#[test]
fn the_dns_table_is_checked_whole_and_defaults_apply() {
    check(
        r#"
app = "hello"
[services.web]
port = 8080
[dns]
zone = "bad..zone"
listen = ["localhost:53", "127.0.0.1:1053"]
ttl = 86400
rate_limit = -1
"#,
        expect![[r#"
            graven.toml:6:8: dns.zone: dns zone "bad..zone": not a DNS name: each label between dots is 1 to 63 letters, digits, '-' or '_'
            graven.toml:7:10: dns.listen: "localhost:53" is not IP:PORT (e.g. "127.0.0.1:1053")
            graven.toml:8:7: dns.ttl: 86400 is not a TTL of 0 to 3600 seconds
            graven.toml:9:14: dns.rate_limit: -1 is not a rate of 0 (no limit) to 1000000 queries a second"#]],
    );
    let parsed = |text: &str| {
        parse(text, Path::new("graven.toml"), Path::new("/app"), "local")
            .unwrap()
            .dns
    };
    // No table: nothing set, so the control plane's settings apply.
    let defaults = parsed("app = \"hello\"\n[services.web]\nport = 8080\n");
    assert!(defaults.is_empty(), "{defaults:?}");
    let default = crate::dns::DnsConfig::default();
    assert_eq!(default.with(&defaults).unwrap(), default);
    let set = parsed(
        "app = \"hello\"\n[services.web]\nport = 8080\n\
         [dns]\nzone = \"Internal.Example\"\nlisten = [\"127.0.0.1:0\", \"[::1]:53\"]\nttl = 0\n\
         rate_limit = 0\n",
    );
    let set = crate::dns::DnsConfig::default().with(&set).unwrap();
    assert_eq!(set.zone.to_ascii(), "internal.example.");
    assert_eq!(
        set.listen,
        ["127.0.0.1:0".parse().unwrap(), "[::1]:53".parse().unwrap()]
    );
    assert_eq!(set.ttl, 0);
    assert_eq!(set.rate_limit, 0);
}

#[test]
fn route_threads_need_a_route_and_a_sane_count() {
    let project = parse(
        r#"
app = "a"
[services.web]
port = 8080
route = ":8000"
route_threads = 2
[environments.production.services.web]
route_threads = 4
"#,
        Path::new("graven.toml"),
        Path::new("/app"),
        "production",
    )
    .unwrap();
    assert_eq!(project.services["web"].route_threads, Some(4));
    check(
        r#"
app = "a"
[services.web]
port = 8080
route = ":8000"
route_threads = 0
[services.api]
port = 8080
route = ":8001"
route_threads = 257
[services.worker]
route_threads = 1
"#,
        expect![[r#"
            graven.toml:6:17: services.web.route_threads: 0 is out of range: it must be between 1 and 256
            graven.toml:10:17: services.api.route_threads: 257 is out of range: it must be between 1 and 256
            graven.toml:12:17: services.worker.route_threads: route_threads needs a route"#]],
    );
}

#[test]
fn phoenix_keys_per_service_and_per_environment() {
    let source = r#"
app = "a"
[services.web]
port = 80
phoenix = { max_age = "6s", jitter = "3s", window = "22:00-02:00 Europe/Paris" }
[services.api]
port = 81
[environments.production.services.web.phoenix]
max_age = "24h"
max_at_once = 2
"#;
    let parsed = |environment: &str| {
        parse(
            source,
            Path::new("graven.toml"),
            Path::new("/app"),
            environment,
        )
        .unwrap()
    };
    let local = parsed("local");
    assert_eq!(
        local.services["web"].phoenix,
        Some(super::Phoenix {
            max_age: Duration::from_secs(6),
            jitter: Duration::from_secs(3),
            window: Some(super::Window::parse("22:00-02:00 Europe/Paris").unwrap()),
            max_at_once: 1,
            stop_first: false,
        })
    );
    assert_eq!(local.services["api"].phoenix, None);
    // An overlay replaces the keys it sets, one by one.
    let production = parsed("production").services["web"]
        .phoenix
        .clone()
        .unwrap();
    assert_eq!(production.max_age, Duration::from_secs(24 * 3600));
    assert_eq!(production.jitter, Duration::from_secs(3));
    assert_eq!(production.max_at_once, 2);
    check(
        r#"app = "a"
[services.web]
port = 80
phoenix = { max_age = "0s", jitter = "soon", window = "02:00-05:00 Europe/Pariss", max_at_once = 0, every = 1 }
[services.api]
port = 81
phoenix = { jitter = "1h" }
"#,
        expect![[r#"
            graven.toml:4:23: services.web.phoenix.max_age: "0s" must be longer than zero
            graven.toml:4:38: services.web.phoenix.jitter: "soon" is not a duration (try "1s", "500ms")
            graven.toml:4:55: services.web.phoenix.window: "Europe/Pariss" is neither a UTC offset like "+01:00" nor a time zone this machine knows
            graven.toml:4:98: services.web.phoenix.max_at_once: 0 is out of range: it must be between 1 and 1000
            graven.toml:4:101: services.web.phoenix.every: unknown field "every" (known: "max_age", "jitter", "window", "max_at_once", "stop_first")
            graven.toml:7:11: services.api.phoenix: a phoenix table needs max_age, how old an instance may get (e.g. max_age = "24h")"#]],
    );
}

#[test]
fn srv_name_is_a_service_name_and_needs_a_route() {
    let project = parse(
        r#"
app = "a"
[services.db]
port = 5432
route = "tcp://127.0.0.1:5432"
srv_name = "postgresql"
"#,
        Path::new("graven.toml"),
        Path::new("/app"),
        "local",
    )
    .unwrap();
    assert_eq!(
        project.services["db"].srv_name.as_deref(),
        Some("postgresql")
    );
    check(
        r#"
app = "a"
[services.db]
port = 5432
route = "tcp://127.0.0.1:5432"
srv_name = "_PostgreSQL"
[services.worker]
srv_name = "jobs"
"#,
        expect![[r#"
            graven.toml:6:12: services.db.srv_name: "_PostgreSQL" is not an SRV service name: 1 to 15 lowercase letters, digits or '-', with a letter, no '-' at either end or twice in a row (RFC 6335; e.g. "postgresql")
            graven.toml:8:12: services.worker.srv_name: srv_name names a route's SRV record: it needs a route"#]],
    );
}
