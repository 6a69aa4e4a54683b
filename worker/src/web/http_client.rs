//! The WhatsApp Web client's HTTP requests (media, version checks) over the reqwest client the
//! rest of the worker uses, instead of a second HTTP stack.

use whatsapp_rust::async_trait;
use whatsapp_rust::http::{HttpClient, HttpRequest, HttpResponse};

pub struct ReqwestHttpClient {
    client: reqwest::Client,
    /// Longer answers are refused as they stream in: a customer's file over the number's media
    /// limit must not be held in memory whole to find that out.
    max_body: u64,
}

impl ReqwestHttpClient {
    /// `max_body`: the largest answer read, in bytes.
    pub fn new(max_body: u64) -> Self {
        Self {
            client: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(300))
                .build()
                .unwrap_or_default(),
            max_body,
        }
    }
}

#[async_trait]
impl HttpClient for ReqwestHttpClient {
    /// Any completed exchange is Ok, 4xx/5xx included: the client reads the status itself.
    async fn execute(&self, request: HttpRequest) -> anyhow::Result<HttpResponse> {
        let method = reqwest::Method::from_bytes(request.method.as_bytes())?;
        let mut req = self.client.request(method, &request.url);
        for (k, v) in &request.headers {
            req = req.header(k, v);
        }
        if let Some(body) = request.body {
            req = req.body(body.to_vec());
        }
        let mut response = req.send().await.map_err(|e| e.without_url())?;
        let status_code = response.status().as_u16();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| e.without_url())? {
            if (body.len() + chunk.len()) as u64 > self.max_body {
                return Err(BodyTooLarge(self.max_body).into());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(HttpResponse { status_code, body })
    }
}

/// An answer over the limit (the media fetcher finds it in the download's error chain).
#[derive(Debug, thiserror::Error)]
#[error("the answer is over {0} bytes")]
pub struct BodyTooLarge(pub u64);
