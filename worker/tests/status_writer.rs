//! The status webhooks' group commit: many concurrent handlers, one writer; every handler hears
//! whether its own update moved its row, rows end at their furthest state, and a database
//! failure reaches every waiting handler (so each webhook answers 500 and Meta redelivers). The
//! test database's deadline fails the test if a handler hangs.

use queue::outbound::{DeliveryStatus, StatusUpdate};
use queue::testing::TestDb;
use worker::gateway::status_writer::StatusWriter;

fn update(id: i64, status: DeliveryStatus) -> StatusUpdate {
    StatusUpdate {
        our_id: Some(id),
        provider_message_id: format!("wamid.{id}"),
        status,
        error_code: None,
        error: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_status_webhooks_are_group_committed_and_each_gets_its_answer() {
    let db = TestDb::new().await.expect("test db");
    let ids = queue::testing::sent_outbound_rows(&db.pool, 200)
        .await
        .expect("sent rows");
    let writer = StatusWriter::start(db.pool.clone());
    // Every row gets delivered and read from concurrent handlers, plus a stale `sent`.
    let mut handlers = Vec::new();
    for id in &ids {
        for status in [
            DeliveryStatus::Delivered,
            DeliveryStatus::Read,
            DeliveryStatus::Sent,
        ] {
            let w = writer.clone();
            let u = update(*id, status);
            handlers.push(tokio::spawn(async move { (status, w.apply(u).await) }));
        }
    }
    let mut moved_read = 0;
    for h in handlers {
        let (status, result) = h.await.expect("handler");
        let moved = result.expect("applied");
        match status {
            // `sent` is where every row already stood: it never moves one.
            DeliveryStatus::Sent => assert!(!moved),
            DeliveryStatus::Read => moved_read += usize::from(moved),
            _ => {}
        }
    }
    assert_eq!(moved_read, ids.len(), "every read moved its row");
    // Group committed: 600 concurrent updates in far fewer statements.
    let updates = 3 * ids.len() as u64;
    let batches = writer.batches();
    assert!(
        batches * 4 <= updates,
        "{updates} updates took {batches} statements"
    );
    eprintln!("{updates} status updates applied in {batches} statements");
    let read: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbound_messages WHERE state = 'read'")
            .fetch_one(&db.pool)
            .await
            .expect("count");
    assert_eq!(read, ids.len() as i64);

    // The database goes away: every waiting handler gets the error, none hangs.
    db.pool.close().await;
    let mut failing = Vec::new();
    for id in ids.iter().take(20) {
        let w = writer.clone();
        let u = update(*id, DeliveryStatus::Failed);
        failing.push(tokio::spawn(async move { w.apply(u).await }));
    }
    for f in failing {
        assert!(f.await.expect("handler").is_err());
    }
}
