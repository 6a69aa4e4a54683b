//! The worker's own hot statements keep to their indexes when planned once, on a fresh
//! install's empty tables, as the pooled sessions plan them (see the queue's test of the same
//! name for why a plan made then is kept).

use queue::testing::{TestDb, statements_with_full_scans};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_statements_probe_indexes_when_planned_on_a_fresh_install() {
    let db = TestDb::new().await.expect("test db");
    let mut conn = db.pool.acquire().await.expect("connection");
    let statements = [
        include_str!("../src/gateway/ingest_message.sql"),
        include_str!("../src/core/turn_load.sql"),
        include_str!("../src/core/turn_commit.sql"),
    ];
    let failures = statements_with_full_scans(&mut conn, &statements)
        .await
        .expect("generic plans");
    assert!(failures.is_empty(), "{failures:#?}");
}
