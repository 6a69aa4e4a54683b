//! WhatsApp's media servers (`mmg.whatsapp.net`) for the stand-in: the media connection IQ
//! (`xmlns="w:m"`, an auth token and the hosts to use) and an HTTPS host that takes encrypted
//! uploads (`POST /mms/<type>/<token>?auth=..&token=..`, answering `{url, direct_path}`) and
//! serves them back (`GET <direct_path>?auth=..&token=..`). The bytes are the clients' own
//! ciphertext (AES-CBC with an HMAC), so the host, like the real one, never sees a file.
//!
//! The clients build `https://` URLs from the host name, so the host serves TLS with a
//! certificate made at start ([`MediaHost::ca_pem`]): a test's client trusts it (the gateway
//! through `SSL_CERT_FILE`, the contact through its own HTTP client).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use whatsapp_rust::wacore::iq::mediaconn::{MediaConnHostExtended, MediaConnResponseExtended};
use whatsapp_rust::wacore::protocol::ProtocolNode;
use whatsapp_rust::wacore_binary::Node;

use crate::cloud_api::lock;

/// One file as uploaded (encrypted by the sender).
#[derive(Debug, Clone)]
pub struct StoredMedia {
    /// `image`, `document`, ... (the upload path's type).
    pub kind: String,
    pub direct_path: String,
    /// The ciphertext's size.
    pub size: usize,
}

struct Blob {
    media: StoredMedia,
    /// The upload's token: the ciphertext's SHA-256, which a download must name.
    token: String,
    bytes: Bytes,
}

#[derive(Default)]
struct Host {
    auth: String,
    blobs: Mutex<HashMap<String, Blob>>,
    downloads: AtomicUsize,
    /// Downloads to answer with a 500 before serving again.
    failing_downloads: AtomicUsize,
    next: AtomicUsize,
}

/// The running media host.
#[derive(Clone)]
pub struct MediaHost {
    /// `127.0.0.1:<port>`, as the media connection names it.
    hostname: String,
    ca_pem: String,
    host: Arc<Host>,
}

#[derive(Deserialize)]
struct Access {
    auth: Option<String>,
    token: Option<String>,
    resume: Option<String>,
}

impl MediaHost {
    /// Listen on a free local port with a fresh certificate for 127.0.0.1.
    pub(super) async fn start() -> anyhow::Result<Self> {
        crate::install_crypto_provider();
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])
            .context("media host certificate")?;
        let ca_pem = cert.cert.pem();
        let tls = axum_server::tls_rustls::RustlsConfig::from_pem(
            ca_pem.clone().into_bytes(),
            cert.signing_key.serialize_pem().into_bytes(),
        )
        .await
        .context("media host TLS")?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let hostname = listener.local_addr()?.to_string();
        let host = Arc::new(Host {
            auth: format!("stand-in-media-auth-{}", uuid::Uuid::new_v4().simple()),
            ..Default::default()
        });
        let app = Router::new()
            .route("/mms/{kind}/{token}", post(upload))
            .route("/v/t62.7118-24/{file}", get(download))
            .with_state(host.clone());
        let server = axum_server::from_tcp_rustls(listener, tls)?;
        tokio::spawn(async move {
            if let Err(error) = server.serve(app.into_make_service()).await {
                tracing::warn!(%error, "whatsapp web stand-in: media host stopped");
            }
        });
        Ok(Self {
            hostname,
            ca_pem,
            host,
        })
    }

    /// The answer to `<media_conn/>`: this host, and the auth its requests must carry.
    pub(super) fn media_conn(&self) -> Node {
        MediaConnResponseExtended::mock(
            self.host.auth.clone(),
            3600,
            vec![MediaConnHostExtended::primary(
                self.hostname.clone(),
                self.hostname.clone(),
                "127.0.0.1".to_string(),
                "::1".to_string(),
                ["image", "video", "audio", "document", "sticker"]
                    .map(String::from)
                    .to_vec(),
                vec!["0".to_string()],
            )],
        )
        .into_node()
    }

    /// The certificate (PEM) the host serves, for a client to trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Every upload so far, in no particular order.
    pub fn uploads(&self) -> Vec<StoredMedia> {
        lock(&self.host.blobs)
            .values()
            .map(|b| b.media.clone())
            .collect()
    }

    /// Downloads served (not the refused or failed ones).
    pub fn downloads(&self) -> usize {
        self.host.downloads.load(Ordering::SeqCst)
    }

    /// Answer the next `n` downloads with HTTP 500 (a CDN hiccup).
    pub fn fail_downloads(&self, n: usize) {
        self.host.failing_downloads.store(n, Ordering::SeqCst);
    }
}

fn refused(status: StatusCode, why: &str) -> Response {
    (status, why.to_string()).into_response()
}

async fn upload(
    State(host): State<Arc<Host>>,
    Path((kind, token)): Path<(String, String)>,
    Query(access): Query<Access>,
    body: Bytes,
) -> Response {
    if access.auth.as_deref() != Some(host.auth.as_str()) {
        return refused(StatusCode::UNAUTHORIZED, "bad media auth");
    }
    if access.token.as_deref() != Some(token.as_str()) {
        return refused(StatusCode::BAD_REQUEST, "token mismatch");
    }
    // A resumable upload's check: nothing of it is here yet.
    if access.resume.is_some() {
        return refused(StatusCode::NOT_FOUND, "no upload to resume");
    }
    let n = host.next.fetch_add(1, Ordering::SeqCst);
    let direct_path = format!("/v/t62.7118-24/{n}-{}.enc", &token[..token.len().min(8)]);
    let media = StoredMedia {
        kind,
        direct_path: direct_path.clone(),
        size: body.len(),
    };
    lock(&host.blobs).insert(
        direct_path.clone(),
        Blob {
            media,
            token,
            bytes: body,
        },
    );
    axum::Json(serde_json::json!({
        "url": format!("https://mmg.whatsapp.net{direct_path}"),
        "direct_path": direct_path,
    }))
    .into_response()
}

async fn download(
    State(host): State<Arc<Host>>,
    Path(file): Path<String>,
    Query(access): Query<Access>,
) -> Response {
    if access.auth.as_deref() != Some(host.auth.as_str()) {
        return refused(StatusCode::UNAUTHORIZED, "bad media auth");
    }
    if host
        .failing_downloads
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return refused(StatusCode::INTERNAL_SERVER_ERROR, "media host hiccup");
    }
    let path = format!("/v/t62.7118-24/{file}");
    let blobs = lock(&host.blobs);
    match blobs.get(&path) {
        Some(b) if access.token.as_deref() == Some(b.token.as_str()) => {
            host.downloads.fetch_add(1, Ordering::SeqCst);
            b.bytes.clone().into_response()
        }
        _ => refused(StatusCode::NOT_FOUND, "no such media"),
    }
}
