//! The CLI's side of the API: one HTTP/1.1 request per connection over the unix socket.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use super::{
    Accepted, DeployRequest, ErrorBody, HistoryRequest, RollbackRequest, Target, socket_path,
};
use crate::controller::Snapshot;
use crate::events::{Envelope, Event};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no graven daemon answers on {} (start one with `graven up` or `graven daemon`): {error}", socket.display())]
    NoDaemon {
        socket: PathBuf,
        error: std::io::Error,
    },
    #[error("talking to the daemon on {}: {reason}", socket.display())]
    Transport { socket: PathBuf, reason: String },
    /// The daemon answered with an error; `message` is its own words.
    #[error("{message}")]
    Api { status: StatusCode, message: String },
}

#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(home: &Path) -> Client {
        Client {
            socket: socket_path(home),
        }
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let transport = |reason: String| ClientError::Transport {
            socket: self.socket.clone(),
            reason,
        };
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|error| ClientError::NoDaemon {
                    socket: self.socket.clone(),
                    error,
                })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| transport(e.to_string()))?;
        tokio::spawn(connection);
        let request = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(http::header::HOST, "graven")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(
                serde_json::to_vec(body).map_err(|e| transport(e.to_string()))?,
            )))
            .map_err(|e| transport(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| transport(e.to_string()))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| transport(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Api { status, message });
        }
        serde_json::from_slice(&bytes).map_err(|e| transport(format!("bad answer: {e}")))
    }

    pub async fn deploy(&self, request: &DeployRequest) -> Result<Accepted, ClientError> {
        self.call("/v1/deploy", request).await
    }

    pub async fn rollback(&self, request: &RollbackRequest) -> Result<Accepted, ClientError> {
        self.call("/v1/rollback", request).await
    }

    pub async fn down(&self, target: &Target) -> Result<Accepted, ClientError> {
        self.call("/v1/down", target).await
    }

    pub async fn status(&self, target: &Target) -> Result<Vec<Snapshot>, ClientError> {
        self.call("/v1/status", target).await
    }

    pub async fn history(
        &self,
        request: &HistoryRequest,
    ) -> Result<Vec<Envelope<Event>>, ClientError> {
        self.call("/v1/history", request).await
    }
}
