//! The only way the WhatsApp Web client gets a socket: a transport factory that opens a
//! WebSocket only while this process holds the account's Lease at a given epoch, and can close
//! every socket it opened at once (losing the Lease, shutting down).
//!
//! The client reconnects on its own after a network error; routing every attempt through this
//! gate is what makes "one socket per phone" hold even when the client library would retry.

use std::sync::{Arc, Mutex};

use lease::Leadership;
use whatsapp_rust::async_channel;
use whatsapp_rust::async_trait;
use whatsapp_rust::transport::{
    TokioWebSocketTransportFactory, Transport, TransportEvent, TransportFactory,
};

/// Opens sockets for one term (Lease epoch) and closes them on demand.
pub struct GatedSockets {
    inner: TokioWebSocketTransportFactory,
    leadership: Arc<Leadership>,
    epoch: i64,
    open: Mutex<Vec<Arc<dyn Transport>>>,
    /// The last socket that could not be opened, for the account's status.
    failure: Mutex<Option<String>>,
    failed: tokio::sync::Notify,
}

impl GatedSockets {
    pub fn new(url: Option<&str>, leadership: Arc<Leadership>, epoch: i64) -> Self {
        let mut inner = TokioWebSocketTransportFactory::new();
        if let Some(url) = url {
            inner = inner.with_url(url);
        }
        Self {
            inner,
            leadership,
            epoch,
            open: Mutex::new(Vec::new()),
            failure: Mutex::new(None),
            failed: tokio::sync::Notify::new(),
        }
    }

    /// Wait for a socket that could not be opened; returns why (each failure once).
    pub async fn next_failure(&self) -> String {
        loop {
            let notified = self.failed.notified();
            if let Some(error) = self
                .failure
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
            {
                return error;
            }
            notified.await;
        }
    }

    /// Whether this term may still hold a socket.
    pub fn permitted(&self) -> bool {
        self.leadership.may_act() == Some(self.epoch)
    }

    /// Close every socket this term opened.
    pub async fn close_all(&self) {
        let open: Vec<Arc<dyn Transport>> =
            std::mem::take(&mut *self.open.lock().unwrap_or_else(|e| e.into_inner()));
        for t in open {
            t.disconnect().await;
        }
    }
}

/// A shared handle, as the client builder takes the factory by value.
#[derive(Clone)]
pub struct GatedFactory(pub Arc<GatedSockets>);

#[async_trait]
impl TransportFactory for GatedFactory {
    async fn create_transport(
        &self,
    ) -> Result<(Arc<dyn Transport>, async_channel::Receiver<TransportEvent>), anyhow::Error> {
        let gate = &self.0;
        if !gate.permitted() {
            anyhow::bail!(
                "not holding the Lease at epoch {}; refusing to open a WhatsApp Web socket",
                gate.epoch
            );
        }
        // Close what an earlier attempt left, so a reconnect never overlaps its predecessor.
        gate.close_all().await;
        let (transport, events) = match gate.inner.create_transport().await {
            Ok(opened) => opened,
            Err(error) => {
                *gate.failure.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(format!("{error:#}"));
                gate.failed.notify_one();
                return Err(error);
            }
        };
        // The Lease may have been lost while connecting: close before anything is sent.
        if !gate.permitted() {
            transport.disconnect().await;
            anyhow::bail!("lost the Lease while connecting; closed the socket");
        }
        gate.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(transport.clone());
        Ok((transport, events))
    }
}
