//! The message template list: listed from the fake Graph API over HTTP into Postgres (every page,
//! removals included), once per refresh for a WABA whatever the number of its numbers, kept
//! whole when a listing fails, and moved by Meta's signed template status webhook.

mod common;

use std::time::Duration;

use common::{Env, eventually_async};
use fakes::cloud_api::Fault;
use serde_json::json;
use worker::gateway::templates::TemplateSync;

fn sync(env: &Env) -> TemplateSync {
    TemplateSync::new(
        env.db.pool.clone(),
        reqwest::Client::new(),
        &env.cloud.api_base_url(),
        env.cloud.waba_id(),
        &env.cloud.access_token().into(),
    )
}

async fn stored(env: &Env) -> Vec<(String, String, String, i32)> {
    sqlx::query_as(
        "SELECT name, language, status, body_parameters FROM message_templates
         WHERE waba_id = $1 ORDER BY name, language",
    )
    .bind(env.cloud.waba_id())
    .fetch_all(&env.db.pool)
    .await
    .expect("templates")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_is_listed_once_per_refresh_and_a_failed_listing_keeps_the_last() {
    let env = Env::new().await;
    // 130 templates: two pages of 100.
    for i in 0..130 {
        env.cloud
            .add_template(&format!("notice_{i:03}"), "en_US", i % 4, "APPROVED");
    }
    env.cloud.add_template("notice_000", "pt_BR", 1, "PAUSED");
    let s = sync(&env);
    assert_eq!(s.sync_if_due().await.expect("listed"), Some(131));
    assert_eq!(env.cloud.template_list_requests(), 2, "two pages");
    let rows = stored(&env).await;
    assert_eq!(rows.len(), 131);
    assert_eq!(
        rows[0],
        ("notice_000".into(), "en_US".into(), "APPROVED".into(), 0)
    );
    assert_eq!(
        rows[1],
        ("notice_000".into(), "pt_BR".into(), "PAUSED".into(), 1)
    );
    assert_eq!(
        rows[130],
        ("notice_129".into(), "en_US".into(), "APPROVED".into(), 1)
    );

    // A second holder of the same WABA (another number) within the refresh: nothing to do.
    assert_eq!(sync(&env).sync_if_due().await.expect("asked"), None);
    assert_eq!(env.cloud.template_list_requests(), 2);

    // Due again (the refresh passed): a failing Graph API leaves the stored list as it was.
    let due = "UPDATE template_syncs SET started_at = now() - interval '1 hour'";
    sqlx::query(due).execute(&env.db.pool).await.expect("due");
    env.cloud.inject([Fault::code(131000)]);
    let error = s.sync_if_due().await.expect_err("the listing fails");
    assert!(error.to_string().contains("HTTP 500"), "{error}");
    assert_eq!(stored(&env).await.len(), 131, "kept whole");

    // Templates deleted in WhatsApp Manager go from the list at the next listing.
    sqlx::query(due).execute(&env.db.pool).await.expect("due");
    env.cloud.remove_template("notice_000", "pt_BR");
    assert_eq!(s.sync_if_due().await.expect("listed"), Some(130));
    let rows = stored(&env).await;
    assert_eq!(rows.len(), 130);
    assert!(!rows.iter().any(|r| r.1 == "pt_BR"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_holder_lists_and_a_signed_status_webhook_moves_a_template_and_asks_for_a_listing() {
    let env = Env::new().await;
    env.cloud
        .add_template("order_update", "en_US", 2, "APPROVED");
    let gw = env.gateway("gw-a", false).await;
    env.cloud
        .set_webhook_url(format!("http://{}/webhook", gw.addr));
    let pool = env.db.pool.clone();
    let status_of = |name: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (String, Option<String>)>(
                "SELECT status, status_reason FROM message_templates WHERE name = $1",
            )
            .bind(name)
            .fetch_optional(&pool)
            .await
            .expect("status")
        }
    };
    eventually_async(
        "the holder lists the templates",
        Duration::from_secs(20),
        || async { status_of("order_update").await.is_some() },
    )
    .await;
    let listed = env.cloud.template_list_requests();

    // Meta pauses it: the webhook moves it at once, with the reason (the list carries none).
    let answered = env
        .cloud
        .set_template_status("order_update", "en_US", "PAUSED", Some("LOW_QUALITY"))
        .await;
    assert_eq!(answered, Some(reqwest::StatusCode::OK));
    assert_eq!(
        status_of("order_update").await,
        Some(("PAUSED".into(), Some("LOW_QUALITY".into())))
    );
    // A template created since: its approval webhook asks for a listing, which brings it in.
    env.cloud
        .add_template("appointment_reminder", "es", 1, "APPROVED");
    let answered = env
        .cloud
        .set_template_status("appointment_reminder", "es", "APPROVED", None)
        .await;
    assert_eq!(answered, Some(reqwest::StatusCode::OK));
    eventually_async(
        "the new template is listed",
        Duration::from_secs(20),
        || async { status_of("appointment_reminder").await.is_some() },
    )
    .await;
    assert!(env.cloud.template_list_requests() > listed);
    // The listing kept the webhook's reason of the unchanged status.
    assert_eq!(
        status_of("order_update").await,
        Some(("PAUSED".into(), Some("LOW_QUALITY".into())))
    );

    // Not ours: a WABA no number names (200, nothing moves), and a bad signature (401).
    let other = json!({ "object": "whatsapp_business_account", "entry": [{ "id": "999", "changes": [{
        "field": "message_template_status_update",
        "value": { "event": "DISABLED", "message_template_id": 1, "message_template_name": "order_update",
                   "message_template_language": "en_US", "reason": "NONE" } }] }] });
    assert_eq!(
        env.cloud.deliver(&other).await.expect("delivered"),
        reqwest::StatusCode::OK
    );
    let forged = env
        .cloud
        .template_status_webhook("1", "order_update", "en_US", "DISABLED", None);
    let status = env
        .cloud
        .deliver_raw(
            fakes::cloud_api::meta_json_bytes(&forged),
            Some("sha256=00".into()),
        )
        .await
        .expect("delivered");
    assert_eq!(status, reqwest::StatusCode::UNAUTHORIZED);
    assert_eq!(
        status_of("order_update").await.map(|s| s.0),
        Some("PAUSED".into())
    );
    gw.kill();
}
