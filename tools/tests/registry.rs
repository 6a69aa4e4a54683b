//! The tool registry on its own: which manifests it admits, how an AgentPool's tool list is
//! checked against each plugin's config schema, channel policy, and tool calls with bad input.
//! Every rejection is a diagnostic naming the plugin and the field, never a panic.

use std::sync::Arc;

use crds::agent_pool::ToolSpec;
use serde_json::{Value, json};
use tools::{Action, Diagnostic, Manifest, Plugin, Registry, Risk, ToolContext, ToolOutput};

/// A plugin with a manifest the test chooses.
struct Fake(Manifest);

impl Plugin for Fake {
    fn manifest(&self) -> Manifest {
        self.0.clone()
    }
    fn call(&self, config: &Value, args: &Value, _: &ToolContext) -> Result<ToolOutput, String> {
        Ok(ToolOutput {
            content: format!("config={config} args={args}"),
            action: None,
        })
    }
}

fn manifest(id: &str) -> Manifest {
    Manifest {
        id: id.into(),
        description: "A test tool.".into(),
        config_schema: json!({ "type": "object", "properties": { "n": { "type": "integer", "minimum": 1 } }, "additionalProperties": false }),
        parameters: json!({ "type": "object", "properties": { "q": { "type": "string" } }, "required": ["q"] }),
        risk: Risk::Low,
        channels: vec!["whatsapp".into()],
    }
}

fn spec(value: Value) -> ToolSpec {
    serde_json::from_value(value).expect("tool spec")
}

fn ctx() -> ToolContext {
    ToolContext {
        lanes: vec!["info".into(), "support".into()],
        now: chrono::DateTime::parse_from_rfc3339("2026-12-07T10:30:00Z")
            .expect("time")
            .with_timezone(&chrono::Utc),
    }
}

fn fields(diags: &[Diagnostic]) -> Vec<(&str, &str)> {
    diags
        .iter()
        .map(|d| (d.plugin_id.as_str(), d.field.as_str()))
        .collect()
}

#[test]
fn invalid_manifests_are_left_out_with_the_field_at_fault() {
    let with = |f: fn(&mut Manifest)| {
        let mut m = manifest("ok_tool");
        f(&mut m);
        Arc::new(Fake(m)) as Arc<dyn Plugin>
    };
    let (registry, diags) = Registry::new(vec![
        with(|_| {}),
        with(|m| m.id = "has space".into()),
        with(|m| m.id = "x".repeat(65)),
        with(|m| m.description = "  ".into()),
        with(|m| m.config_schema = json!({ "type": "string" })),
        with(|m| m.parameters = json!({ "type": "object", "properties": { "q": { "type": 5 } } })),
        with(|m| m.channels.clear()),
        with(|_| {}),
    ]);
    assert_eq!(
        fields(&diags)
            .iter()
            .map(|(_, field)| *field)
            .collect::<Vec<_>>(),
        vec![
            "manifest.id",
            "manifest.id",
            "manifest.description",
            "manifest.configSchema",
            "manifest.parameters",
            "manifest.channels",
            "manifest.id",
        ]
    );
    assert_eq!(
        diags.last().map(|d| d.message.as_str()),
        Some("duplicate plugin id")
    );
    let ids: Vec<&str> = registry.manifests().iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, vec!["ok_tool"], "only the valid one, once");
}

#[test]
fn the_builtins_have_valid_manifests() {
    let (registry, diags) = Registry::builtin();
    assert!(diags.is_empty(), "{diags:?}");
    let ids: Vec<&str> = registry.manifests().iter().map(|m| m.id.as_str()).collect();
    assert_eq!(
        ids,
        vec![
            "business_hours",
            "handoff",
            "reply_buttons",
            "send_template",
            "set_lane"
        ]
    );
}

#[test]
fn configs_are_checked_against_the_schema_and_each_bad_tool_is_disabled_alone() {
    let (registry, diags) = Registry::new(vec![Arc::new(Fake(manifest("lookup")))]);
    assert!(diags.is_empty());
    let (toolbox, diags) = registry.enable(&[
        spec(json!({ "id": "lookup", "config": { "n": 0 } })),
        spec(json!({ "id": "lookup", "config": { "m": 1 } })),
        spec(json!({ "id": "nope" })),
    ]);
    assert!(toolbox.is_empty(), "every entry was invalid");
    assert_eq!(
        fields(&diags),
        vec![("lookup", "config.n"), ("lookup", "config"), ("nope", "id")]
    );
    assert!(diags[2].to_string().contains("no plugin with id \"nope\""));

    // Valid and invalid side by side: the valid one runs.
    let (toolbox, diags) = registry.enable(&[
        spec(json!({ "id": "lookup", "config": { "n": 2 } })),
        spec(json!({ "id": "nope" })),
    ]);
    assert_eq!(diags.len(), 1);
    assert!(toolbox.has("lookup"));
    let defs = toolbox.definitions();
    assert_eq!(defs.len(), 1);
    assert_eq!(defs[0]["function"]["name"], "lookup");
    assert_eq!(defs[0]["function"]["parameters"]["required"], json!(["q"]));
}

#[test]
fn channel_policy_overrides_the_manifest() {
    let mut other = manifest("elsewhere");
    other.channels = vec!["sms".into()];
    let (registry, _) = Registry::new(vec![
        Arc::new(Fake(manifest("here"))),
        Arc::new(Fake(other)),
    ]);
    let (toolbox, diags) = registry.enable(&[
        spec(json!({ "id": "here", "channels": { "whatsapp": "deny" } })),
        spec(json!({ "id": "elsewhere" })),
    ]);
    assert!(diags.is_empty());
    assert!(toolbox.is_empty(), "denied here, not declared for whatsapp");
    let (toolbox, _) = registry.enable(&[spec(
        json!({ "id": "elsewhere", "channels": { "whatsapp": "allow" } }),
    )]);
    assert!(toolbox.has("elsewhere"));
}

#[test]
fn bad_tool_calls_come_back_as_error_text_for_the_model() {
    let (registry, _) = Registry::new(vec![Arc::new(Fake(manifest("lookup")))]);
    let (toolbox, _) = registry.enable(&[spec(json!({ "id": "lookup", "config": { "n": 3 } }))]);
    let call = |name: &str, args: &str| toolbox.call(name, args, &ctx()).content;
    assert!(call("missing", "{}").starts_with("error: unknown tool \"missing\""));
    assert!(call("lookup", "{not json").starts_with("error: arguments are not valid JSON"));
    assert!(call("lookup", "{}").starts_with("error: invalid arguments"));
    assert!(call("lookup", r#"{"q": 5}"#).starts_with("error: invalid arguments at /q"));
    assert_eq!(
        call("lookup", r#"{"q": "x"}"#),
        r#"config={"n":3} args={"q":"x"}"#,
        "the pool's config reaches the plugin"
    );
}

#[test]
fn the_builtins_act_as_documented() {
    let (registry, _) = Registry::builtin();
    let (toolbox, diags) = registry.enable(&[
        spec(json!({ "id": "handoff" })),
        spec(json!({ "id": "set_lane" })),
        spec(json!({ "id": "business_hours", "config": { "utcOffsetHours": -3, "openHour": 8, "closeHour": 12 } })),
    ]);
    assert!(diags.is_empty(), "{diags:?}");
    let out = toolbox.call("handoff", r#"{"reason":"angry"}"#, &ctx());
    assert_eq!(
        out.action,
        Some(Action::Handoff {
            reason: "angry".into()
        })
    );
    let out = toolbox.call("set_lane", r#"{"lane":"support"}"#, &ctx());
    assert_eq!(out.action, Some(Action::SetLane("support".into())));
    let out = toolbox.call("set_lane", r#"{"lane":"billing"}"#, &ctx());
    assert_eq!(out.action, None);
    assert!(
        out.content
            .contains("unknown lane \"billing\"; lanes: info, support")
    );
    // Monday 10:30 UTC is 07:30 at UTC-3: before an 08:00 opening.
    let out = toolbox.call("business_hours", "", &ctx());
    assert!(out.content.starts_with("Closed now."), "{}", out.content);
    assert!(
        out.content.contains("08:00-12:00 (UTC-3)"),
        "{}",
        out.content
    );
    let (toolbox, _) = registry.enable(&[spec(
        json!({ "id": "business_hours", "config": { "closeHour": 25 } }),
    )]);
    assert!(toolbox.is_empty(), "closeHour above 24 is refused");
}
