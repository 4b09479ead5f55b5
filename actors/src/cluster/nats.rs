//! The NATS client's side of a node: the credentials and TLS it connects with
//! ([`NatsAuth`]), and subscriptions that may outlive the runtime ([`Subscription`]).

use std::path::PathBuf;

use async_nats::{Client, Message};
use futures::StreamExt;

use super::JoinError;

/// Credentials and TLS for NATS, as the server asks for them.
#[derive(Debug, Clone, Default)]
pub struct NatsAuth {
    pub token: Option<String>,
    pub user: Option<(String, String)>,
    pub nkey_seed: Option<String>,
    pub credentials_file: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_client: Option<(PathBuf, PathBuf)>,
    pub require_tls: bool,
}

impl NatsAuth {
    /// Connect options with these credentials and TLS settings.
    pub(super) async fn options(&self) -> Result<async_nats::ConnectOptions, JoinError> {
        let mut options = match &self.credentials_file {
            Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
                .await
                .map_err(JoinError::Credentials)?,
            None => async_nats::ConnectOptions::new(),
        };
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        if let Some((user, password)) = &self.user {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(seed) = &self.nkey_seed {
            options = options.nkey(seed.clone());
        }
        if let Some(ca) = &self.tls_ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &self.tls_client {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        Ok(options.require_tls(self.require_tls))
    }
}

/// A NATS subscription that may outlive the runtime: a subscriber unsubscribes on
/// drop by spawning a task, which would panic while the process exits (the actix
/// system drops what is left after its runtime has stopped). Then there is nothing
/// to tell NATS that closing the connection does not, and it is left alone.
pub struct Subscription(Option<async_nats::Subscriber>);

impl Subscription {
    pub async fn new(nats: &Client, subject: String) -> Result<Self, async_nats::SubscribeError> {
        Ok(Subscription(Some(nats.subscribe(subject).await?)))
    }
}

impl futures::Stream for Subscription {
    type Item = Message;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Message>> {
        match &mut self.0 {
            Some(subscriber) => subscriber.poll_next_unpin(cx),
            None => std::task::Poll::Ready(None),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if tokio::runtime::Handle::try_current().is_err() {
            std::mem::forget(self.0.take());
        }
    }
}

/// An unbounded receiver as a stream.
pub(super) fn tokio_stream_of<T: 'static>(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
