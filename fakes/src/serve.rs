use std::net::SocketAddr;

use tokio::task::JoinHandle;

/// A server running on 127.0.0.1 on a free port; stops when dropped.
pub struct Server {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Server {
    pub async fn start(router: axum::Router) -> std::io::Result<Self> {
        Self::start_on("127.0.0.1:0", router).await
    }

    pub async fn start_on(addr: &str, router: axum::Router) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, router).await {
                tracing::warn!(%error, "fake server stopped");
            }
        });
        Ok(Self { addr, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}
