//! Group commit: many tasks' small writes applied together.
//!
//! Each write that would be its own transaction (its own round trips and WAL flush) is handed to
//! one writer task, which applies whatever has queued while the previous batch ran in a single
//! statement and answers each caller after the commit. Nothing waits for a batch to fill: a lone
//! write is applied at once, and batches only form when writes arrive faster than one statement
//! takes. A caller still hears back only after its write is durable.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};

type Reply<O> = oneshot::Sender<Result<O, String>>;

/// Handle to a writer task; cheap to clone. The task stops when every handle is dropped.
pub struct GroupCommit<I, O> {
    tx: mpsc::Sender<(I, Reply<O>)>,
    /// Batches applied so far (how well writes are being grouped).
    batches: Arc<AtomicU64>,
}

impl<I, O> Clone for GroupCommit<I, O> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            batches: self.batches.clone(),
        }
    }
}

impl<I: Send + 'static, O: Send + 'static> GroupCommit<I, O> {
    /// Start a writer that applies up to `max_batch` items at a time with `apply`, which returns
    /// one output per item, in order, or the error every caller of the batch gets.
    pub fn start<F, Fut>(max_batch: usize, mut apply: F) -> Self
    where
        F: FnMut(Vec<I>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<O>, String>> + Send,
    {
        let (tx, mut rx) = mpsc::channel::<(I, Reply<O>)>(4 * max_batch);
        let batches = Arc::new(AtomicU64::new(0));
        let counted = batches.clone();
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(max_batch);
            while rx.recv_many(&mut batch, max_batch).await > 0 {
                // Callers that gave up (their deadline passed) still get their write applied.
                let (items, replies): (Vec<I>, Vec<Reply<O>>) = batch.drain(..).unzip();
                counted.fetch_add(1, Ordering::Relaxed);
                match apply(items).await {
                    Ok(outputs) => {
                        for (reply, output) in replies.into_iter().zip(outputs) {
                            let _ = reply.send(Ok(output));
                        }
                    }
                    Err(message) => {
                        for reply in replies {
                            let _ = reply.send(Err(message.clone()));
                        }
                    }
                }
            }
        });
        Self { tx, batches }
    }

    /// Batches applied so far.
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// Apply one item durably, with whatever else is queued.
    pub async fn submit(&self, item: I) -> Result<O, String> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((item, reply))
            .await
            .map_err(|_| "the writer stopped".to_string())?;
        answer
            .await
            .map_err(|_| "the writer dropped the write".to_string())?
    }
}
