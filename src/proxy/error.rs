//! What can go wrong in a route, who is to blame, and what the client is told.

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use serde::{Deserialize, Serialize};

use super::UpstreamError;

/// Who failed: the client, the instance behind the route, or graven itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorClass {
    /// The request was malformed or the client went away.
    Client,
    /// The instance refused, reset, timed out or answered something that is not HTTP.
    Upstream,
    /// graven had no ready instance to send the request to.
    Graven,
}

impl ErrorClass {
    /// The value of the `x-graven-error` response header.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Client => "client",
            ErrorClass::Upstream => "upstream",
            ErrorClass::Graven => "graven",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{name}={value:?} is not valid: {reason}")]
    Setting {
        name: &'static str,
        value: String,
        reason: String,
    },
    /// Answered (with `Connection: close`) to a client connection beyond the route's cap.
    #[error("route {route} is at its connection limit ({limit} connections)")]
    ConnectionLimit { route: SocketAddr, limit: usize },
    /// graven's share of descriptors for connections to instances is spent.
    #[error(
        "route {route} cannot open another connection to an instance: graven's limit of {limit} is reached"
    )]
    InstanceConnectionLimit { route: SocketAddr, limit: usize },
    #[error("route {route} has no ready instance and its hold queue is full ({limit} requests)")]
    HoldQueueFull { route: SocketAddr, limit: usize },
    #[error("route {route} had no ready instance for {waited:?}")]
    HoldTimeout { route: SocketAddr, waited: Duration },
    #[error("cannot connect to instance {instance} at {address}: {source}")]
    Connect {
        instance: String,
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to instance {instance} at {address} timed out after {after:?}")]
    ConnectTimeout {
        instance: String,
        address: SocketAddr,
        after: Duration,
    },
    /// The connection closed before the instance answered. `repeatable` says whether the
    /// request may be sent again: it was never written, or it is idempotent, had no body and
    /// graven kept a copy.
    #[error("instance {instance} at {address} closed the connection before answering: {source}")]
    Closed {
        instance: String,
        address: SocketAddr,
        repeatable: bool,
        #[source]
        source: UpstreamError,
    },
    #[error("instance {instance} at {address} failed: {source}")]
    Upstream {
        instance: String,
        address: SocketAddr,
        #[source]
        source: UpstreamError,
    },
    #[error("instance {instance} at {address} did not answer within {after:?}")]
    UpstreamTimeout {
        instance: String,
        address: SocketAddr,
        after: Duration,
    },
    #[error("the client's request failed: {source}")]
    Client {
        #[source]
        source: hyper::Error,
    },
}

impl ProxyError {
    pub fn class(&self) -> ErrorClass {
        match self {
            ProxyError::Client { .. } => ErrorClass::Client,
            ProxyError::Connect { .. }
            | ProxyError::ConnectTimeout { .. }
            | ProxyError::Closed { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::UpstreamTimeout { .. } => ErrorClass::Upstream,
            ProxyError::Bind { .. }
            | ProxyError::Setting { .. }
            | ProxyError::ConnectionLimit { .. }
            | ProxyError::InstanceConnectionLimit { .. }
            | ProxyError::HoldQueueFull { .. }
            | ProxyError::HoldTimeout { .. } => ErrorClass::Graven,
        }
    }

    /// True when no instance can have acted on the request, so sending it again cannot do
    /// anything twice. The route still only repeats idempotent methods.
    pub fn retry_safe(&self) -> bool {
        match self {
            ProxyError::HoldQueueFull { .. }
            | ProxyError::HoldTimeout { .. }
            | ProxyError::ConnectionLimit { .. }
            | ProxyError::InstanceConnectionLimit { .. }
            | ProxyError::Connect { .. }
            | ProxyError::ConnectTimeout { .. } => true,
            ProxyError::Closed { repeatable, .. } => *repeatable,
            ProxyError::Bind { .. }
            | ProxyError::Setting { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::UpstreamTimeout { .. }
            | ProxyError::Client { .. } => false,
        }
    }

    /// The status the client is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Client { .. } => StatusCode::BAD_REQUEST,
            ProxyError::Connect { .. }
            | ProxyError::Closed { .. }
            | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::ConnectTimeout { .. } | ProxyError::UpstreamTimeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::HoldQueueFull { .. }
            | ProxyError::HoldTimeout { .. }
            | ProxyError::ConnectionLimit { .. }
            | ProxyError::InstanceConnectionLimit { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Bind { .. } | ProxyError::Setting { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(error: ProxyError, expected: (ErrorClass, u16, bool)) {
        assert_eq!(
            (error.class(), error.status().as_u16(), error.retry_safe()),
            expected,
            "{error}"
        );
    }

    fn refused() -> std::io::Error {
        std::io::Error::from(std::io::ErrorKind::ConnectionRefused)
    }

    #[test]
    fn classification_and_status() {
        let route: SocketAddr = "127.0.0.1:8000".parse().unwrap();
        let address: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let instance = || "web-1".to_owned();
        let after = Duration::from_secs(1);
        check(
            ProxyError::HoldQueueFull { route, limit: 4 },
            (ErrorClass::Graven, 503, true),
        );
        check(
            ProxyError::HoldTimeout {
                route,
                waited: after,
            },
            (ErrorClass::Graven, 503, true),
        );
        check(
            ProxyError::Connect {
                instance: instance(),
                address,
                source: refused(),
            },
            (ErrorClass::Upstream, 502, true),
        );
        check(
            ProxyError::ConnectTimeout {
                instance: instance(),
                address,
                after,
            },
            (ErrorClass::Upstream, 504, true),
        );
        check(
            ProxyError::UpstreamTimeout {
                instance: instance(),
                address,
                after,
            },
            (ErrorClass::Upstream, 504, false),
        );
        check(
            ProxyError::ConnectionLimit { route, limit: 4 },
            (ErrorClass::Graven, 503, true),
        );
        check(
            ProxyError::InstanceConnectionLimit { route, limit: 4 },
            (ErrorClass::Graven, 503, true),
        );
        check(
            ProxyError::Bind {
                address,
                source: refused(),
            },
            (ErrorClass::Graven, 500, false),
        );
    }

    #[test]
    fn messages_name_the_failing_instance() {
        let address: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let error = ProxyError::Connect {
            instance: "web-1".into(),
            address,
            source: refused(),
        };
        expect_test::expect![
            "cannot connect to instance web-1 at 127.0.0.1:9000: connection refused"
        ]
        .assert_eq(&error.to_string());
    }
}
