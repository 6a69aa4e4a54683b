//! Reply buttons: a rules lane that declares buttons answers with a WhatsApp interactive message
//! (validated by the fake Cloud API as Meta would), and a tap routes to the lane the button leads
//! to, or back to the lane that offered it; a typed option number does the same.

mod common;

use std::time::Duration;

use common::{Env, core, eventually_async};
use serde_json::{Value, json};

fn spec() -> Value {
    json!({ "lanes": [
        { "name": "info", "keywords": ["hi"], "replies": ["Hi! What do you need?"],
          "buttons": [{ "title": "Prices", "lane": "commerce" }, { "title": "Talk to us", "lane": "human" },
                      { "title": "More info" }] },
        { "name": "commerce", "keywords": ["price"], "replies": ["Our prices start at 10 EUR."] },
        { "name": "human", "keywords": ["human"], "handoff": true }
    ]})
}

/// The sends to `to` so far, oldest first.
fn sent_to(env: &Env, to: &str) -> Vec<Value> {
    env.cloud
        .sends()
        .into_iter()
        .filter(|s| s.to == to)
        .map(|s| s.body)
        .collect()
}

async fn wait_sends(env: &Env, to: &str, n: usize) -> Vec<Value> {
    eventually_async("the agent's reply", Duration::from_secs(20), || async {
        sent_to(env, to).len() >= n
    })
    .await;
    sent_to(env, to)
}

async fn lane_of(env: &Env, contact: &str) -> Option<String> {
    sqlx::query_scalar(
        "SELECT c.lane FROM conversations c JOIN contacts ct ON ct.id = c.contact_id
         WHERE ct.contact_key = $1",
    )
    .bind(contact)
    .fetch_one(&env.db.pool)
    .await
    .expect("lane")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_offers_buttons_and_a_tap_or_a_typed_number_routes_where_the_button_leads() {
    let env = Env::new().await;
    let gw = env.gateway("gw-a", false).await;
    env.cloud
        .set_webhook_url(format!("http://{}/webhook", gw.addr));
    let c = core(&env, spec()).await;

    // "hi": the info lane answers with its three buttons, as an interactive message Meta accepts.
    let (_, hook) = env.cloud.inbound_text("16505550001", "Ana", "hi");
    env.cloud.deliver(&hook).await.expect("deliver");
    let sends = wait_sends(&env, "16505550001", 1).await;
    let offer = &sends[0];
    assert_eq!(offer["type"], "interactive", "{offer}");
    assert_eq!(offer["interactive"]["type"], "button");
    assert_eq!(
        offer["interactive"]["body"]["text"],
        "Hi! What do you need?"
    );
    let titles: Vec<&str> = offer["interactive"]["action"]["buttons"]
        .as_array()
        .expect("buttons")
        .iter()
        .map(|b| b["reply"]["title"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(titles, ["Prices", "Talk to us", "More info"]);

    // A tap on "Prices" leads to the commerce lane (its reply has no buttons: plain text).
    let (_, tap) = env
        .cloud
        .inbound_button_reply("16505550001", "Ana", "Prices", "Prices");
    env.cloud.deliver(&tap).await.expect("deliver");
    let sends = wait_sends(&env, "16505550001", 2).await;
    assert_eq!(sends[1]["text"]["body"], "Our prices start at 10 EUR.");
    assert_eq!(
        lane_of(&env, "16505550001").await.as_deref(),
        Some("commerce")
    );

    // "More info" names no lane: back to the lane that offered it, which offers its buttons again.
    let (_, tap) = env
        .cloud
        .inbound_button_reply("16505550001", "Ana", "More info", "More info");
    env.cloud.deliver(&tap).await.expect("deliver");
    let sends = wait_sends(&env, "16505550001", 3).await;
    assert_eq!(sends[2]["type"], "interactive");
    assert_eq!(lane_of(&env, "16505550001").await.as_deref(), Some("info"));

    // Typing the option's number (how WhatsApp Web shows buttons) does what the tap does: "2"
    // is "Talk to us", which leads to the handoff lane.
    let (_, typed) = env.cloud.inbound_text("16505550001", "Ana", "2");
    env.cloud.deliver(&typed).await.expect("deliver");
    eventually_async("the handoff", Duration::from_secs(20), || async {
        lane_of(&env, "16505550001").await.as_deref() == Some("human")
    })
    .await;
    let sends = wait_sends(&env, "16505550001", 4).await;
    assert_eq!(
        sends[3]["text"]["body"],
        common::routing().handoff_message.as_str(),
        "the handoff message, without buttons"
    );
    c.shutdown().await;
    gw.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_or_more_options_go_as_a_list_and_a_chosen_row_routes_like_a_tap() {
    let env = Env::new().await;
    let gw = env.gateway("gw-a", false).await;
    env.cloud
        .set_webhook_url(format!("http://{}/webhook", gw.addr));
    let spec = json!({ "lanes": [
        { "name": "menu", "keywords": ["menu"], "replies": ["What would you like?"],
          "buttons": [{ "title": "Prices", "lane": "commerce" }, { "title": "Opening hours" },
                      { "title": "Delivery" }, { "title": "Talk to us", "lane": "human" }] },
        { "name": "commerce", "keywords": ["price"], "replies": ["Our prices start at 10 EUR."] },
        { "name": "human", "keywords": ["human"], "handoff": true }
    ]});
    let c = core(&env, spec).await;
    let (_, hook) = env.cloud.inbound_text("16505550002", "Bo", "menu");
    env.cloud.deliver(&hook).await.expect("deliver");
    let sends = wait_sends(&env, "16505550002", 1).await;
    let list = &sends[0]["interactive"];
    assert_eq!(list["type"], "list", "{}", sends[0]);
    assert_eq!(list["action"]["button"], "Choose");
    let rows: Vec<&str> = list["action"]["sections"][0]["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["title"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(rows, ["Prices", "Opening hours", "Delivery", "Talk to us"]);

    // The customer picks "Prices" in the list: a list_reply, routed to commerce.
    let pick = json!({
        "from": "16505550002", "id": env.cloud.next_wamid(), "timestamp": chrono_now(),
        "type": "interactive",
        "interactive": { "type": "list_reply", "list_reply": { "id": "Prices", "title": "Prices" } }
    });
    env.cloud
        .deliver(&env.cloud.inbound_message("16505550002", "Bo", pick))
        .await
        .expect("deliver");
    let sends = wait_sends(&env, "16505550002", 2).await;
    assert_eq!(sends[1]["text"]["body"], "Our prices start at 10 EUR.");
    assert_eq!(
        lane_of(&env, "16505550002").await.as_deref(),
        Some("commerce")
    );
    c.shutdown().await;
    gw.kill();
}

/// Unix seconds now, as Meta's webhooks state time.
fn chrono_now() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
        .to_string()
}
