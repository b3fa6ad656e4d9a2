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
    Accepted, DeployCheck, DeployRequest, ErrorBody, FollowRequest, HistoryRequest,
    RollbackRequest, Target, socket_path,
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
        let response = self.send(path, body).await?;
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| self.transport(e.to_string()))?
            .to_bytes();
        serde_json::from_slice(&bytes).map_err(|e| self.transport(format!("bad answer: {e}")))
    }

    fn transport(&self, reason: String) -> ClientError {
        ClientError::Transport {
            socket: self.socket.clone(),
            reason,
        }
    }

    /// Sends one request; a successful response, its body unread, or the daemon's error.
    async fn send<B: Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
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
        if status.is_success() {
            return Ok(response);
        }
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| transport(e.to_string()))?
            .to_bytes();
        let message = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|b| b.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        Err(ClientError::Api { status, message })
    }

    /// The rollout's events as the daemon streams them, each handed to `each` as it
    /// arrives, until every deploy the rollout started has ended.
    pub async fn follow(
        &self,
        request: &FollowRequest,
        mut each: impl FnMut(Envelope<Event>),
    ) -> Result<(), ClientError> {
        let mut body = self.send("/v1/follow", request).await?.into_body();
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| self.transport(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let envelope = serde_json::from_slice(&line)
                    .map_err(|e| self.transport(format!("bad event: {e}")))?;
                each(envelope);
            }
        }
        Ok(())
    }

    pub async fn deploy(&self, request: &DeployRequest) -> Result<Accepted, ClientError> {
        self.call("/v1/deploy", request).await
    }

    /// Asks whether the daemon would refuse `check`'s deploy for what it can tell before the
    /// images are baked. A daemon too old to know the question (404) is taken to agree: its
    /// deploy refuses the same things, only later.
    pub async fn check_deploy(&self, check: &DeployCheck) -> Result<(), ClientError> {
        match self
            .call::<_, serde_json::Value>("/v1/deploy/check", check)
            .await
        {
            Err(ClientError::Api {
                status: StatusCode::NOT_FOUND,
                ..
            }) => Ok(()),
            other => other.map(drop),
        }
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

    pub async fn chaos_run(
        &self,
        request: &super::ChaosRunRequest,
    ) -> Result<super::ChaosRunAccepted, ClientError> {
        self.call("/v1/chaos/run", request).await
    }

    pub async fn history(
        &self,
        request: &HistoryRequest,
    ) -> Result<Vec<Envelope<Event>>, ClientError> {
        self.call("/v1/history", request).await
    }
}
