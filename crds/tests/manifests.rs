//! The generated CRDs: checked-in copies match the types, examples pass schema and CEL, invalid
//! objects are rejected, and every CEL rule is documented.

use std::path::{Path, PathBuf};

use crds::{AgentPool, WhatsAppAccount};
use kube::CustomResourceExt;
use serde_json::{Value, json};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn checked_in_manifests_match_the_types() {
    for dir in ["crds/manifests", "charts/whatsapp-operator/crds"] {
        for (name, yaml) in crds::manifests::all().expect("render") {
            let path = root().join(dir).join(name);
            let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                on_disk == yaml,
                "{} is out of date: run `cargo run -p operator -- crds --write .`",
                path.display()
            );
        }
    }
    let combined = crds::manifests::combined().expect("combined");
    assert!(combined.contains("name: whatsappaccounts.whatsapp.kube-agents.io"));
    assert!(combined.contains("name: agentpools.whatsapp.kube-agents.io"));
}

fn schema_of(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Value {
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("schema"),
    )
    .expect("json")
}

/// An unknown field is an error, as `kubectl apply` makes it (server-side strict field
/// validation) where the structural schema alone would prune it silently: every object schema
/// with declared properties and no free-form marker gets `additionalProperties: false`.
fn strict(schema: &mut Value) {
    if let Some(map) = schema.as_object_mut() {
        let free_form = map.contains_key("additionalProperties")
            || map.contains_key("x-kubernetes-preserve-unknown-fields");
        if map.get("properties").is_some_and(Value::is_object) && !free_form {
            map.insert("additionalProperties".into(), Value::Bool(false));
        }
        for (_, v) in map.iter_mut() {
            strict(v);
        }
    } else if let Some(items) = schema.as_array_mut() {
        items.iter_mut().for_each(strict);
    }
}

/// Validate like the API server: structural schema (types, patterns, ranges, and no unknown
/// fields) then CEL rules.
fn check(kind: &str, obj: &Value) -> Result<(), String> {
    let mut schema = match kind {
        "WhatsAppAccount" => schema_of(&WhatsAppAccount::crd()),
        "AgentPool" => schema_of(&AgentPool::crd()),
        other => return Err(format!("unexpected kind {other}")),
    };
    let cel_schema = schema.clone();
    // The root's apiVersion, kind and metadata are the API server's, not in the schema.
    strict(&mut schema["properties"]["spec"]);
    let validator = jsonschema::draft4::new(&schema).map_err(|e| e.to_string())?;
    let errors: Vec<String> = validator
        .iter_errors(obj)
        .map(|e| format!("{}: {e}", e.instance_path))
        .collect();
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    kube::core::cel::Validator::new()
        .validate(&cel_schema, obj, None)
        .map_err(|e| format!("{e:?}"))
}

fn account() -> Value {
    json!({
        "apiVersion": "whatsapp.kube-agents.io/v1alpha1", "kind": "WhatsAppAccount",
        "metadata": { "name": "a", "namespace": "default" },
        "spec": {
            "phoneNumber": "+15550783881",
            "provider": { "cloudApi": { "phoneNumberId": "1065", "credentialsSecretRef": { "name": "creds" } } },
            "agentPoolRef": { "name": "support" }
        }
    })
}

fn pool() -> Value {
    json!({ "apiVersion": "whatsapp.kube-agents.io/v1alpha1", "kind": "AgentPool", "metadata": { "name": "p", "namespace": "default" }, "spec": {} })
}

#[test]
fn an_unknown_field_is_rejected_as_kubectl_apply_would() {
    let mut typo = account();
    typo["spec"]["delivery"] = json!({ "maxAttempt": 3 });
    let e = check("WhatsAppAccount", &typo).expect_err("unknown field");
    assert!(e.contains("maxAttempt"), "{e}");
    let mut typo = pool();
    typo["spec"]["gateway"] = json!({ "replicas": 2 });
    assert!(check("AgentPool", &typo).is_err());
    // Free-form fields stay free.
    let mut tools = pool();
    tools["spec"]["tools"] = json!([{ "id": "business_hours", "config": { "anything": 1 } }]);
    check("AgentPool", &tools).expect("config is free-form");
}

#[test]
fn examples_pass_the_schema_and_the_cel_rules() {
    let mut checked = 0;
    for entry in std::fs::read_dir(root().join("examples")).expect("examples dir") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read example");
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for doc in docs {
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            if kind != "WhatsAppAccount" && kind != "AgentPool" {
                continue;
            }
            check(&kind, &doc)
                .unwrap_or_else(|e| panic!("{} ({kind}) is invalid: {e}", path.display()));
            if kind == "WhatsAppAccount" {
                serde_json::from_value::<WhatsAppAccount>(doc).expect("typed account");
            } else {
                serde_json::from_value::<AgentPool>(doc).expect("typed pool");
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 3,
        "expected at least three example resources, checked {checked}"
    );
}

#[test]
fn invalid_objects_are_rejected_with_a_clear_message() {
    assert_eq!(check("WhatsAppAccount", &account()), Ok(()));
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "WhatsAppAccount",
            json!({ "spec": { "phoneNumber": "15550783881" } }),
            "E.164",
        ),
        (
            "WhatsAppAccount",
            json!({ "spec": { "phoneNumber": "+1555" } }),
            "E.164",
        ),
        (
            "WhatsAppAccount",
            json!({ "spec": { "lease": { "durationSeconds": 10, "renewDeadlineSeconds": 10, "retryPeriodSeconds": 2 } } }),
            "durationSeconds must be greater",
        ),
        (
            "WhatsAppAccount",
            json!({ "spec": { "lease": { "durationSeconds": 15, "renewDeadlineSeconds": 2, "retryPeriodSeconds": 2 } } }),
            "1.2 x",
        ),
        (
            "WhatsAppAccount",
            json!({ "spec": { "replicas": 50 } }),
            "replicas",
        ),
        (
            "WhatsAppAccount",
            json!({ "spec": { "provider": { "whatsappWeb": {} } } }),
            "set exactly one of provider.cloudApi and provider.whatsappWeb",
        ),
        (
            "WhatsAppAccount",
            json!({ "spec": { "provider": { "whatsappWeb": { "serverUrl": "http://x" } } } }),
            "serverUrl must be a ws:// or wss:// URL",
        ),
        (
            "WhatsAppAccount",
            json!({ "spec": { "provider": { "whatsappWeb": { "pairing": "Telepathy" } } } }),
            "pairing",
        ),
        (
            "AgentPool",
            json!({ "spec": { "minReplicas": 5, "maxReplicas": 2 } }),
            "minReplicas must be less than or equal to maxReplicas",
        ),
        (
            "AgentPool",
            json!({ "spec": { "model": { "provider": "openai" } } }),
            "model.model is required",
        ),
        (
            "AgentPool",
            json!({ "spec": { "model": { "provider": "claude" } } }),
            "provider",
        ),
        (
            "AgentPool",
            json!({ "spec": { "lanes": [{ "name": "info", "buttons": [{ "title": "Prices", "lane": "sales" }] }] } }),
            "a lane button's lane must be the name of a lane of this pool",
        ),
        (
            "AgentPool",
            json!({ "spec": { "lanes": [{ "name": "info", "buttons": [{ "title": "A title far over twenty characters" }] }] } }),
            "title",
        ),
        (
            "WhatsAppAccount",
            json!({ "spec": { "provider": { "cloudApi": { "phoneNumberId": "1", "wabaId": "acme", "credentialsSecretRef": { "name": "s" } } } } }),
            "wabaId is the numeric WhatsApp Business Account id",
        ),
        (
            "WhatsAppAccount",
            json!({ "spec": { "media": { "maxBytes": 10 } } }),
            "maxBytes",
        ),
        (
            "AgentPool",
            json!({ "spec": { "inbox": { "enabled": true } } }),
            "inbox.enabled needs inbox.tokensSecretRef",
        ),
        (
            "AgentPool",
            json!({ "spec": { "team": [{ "id": "alice@example.com", "tokenKey": "alice@example.com" }] } }),
            "tokenKey",
        ),
    ];
    for (kind, patch, expected) in cases {
        let mut obj = if kind == "WhatsAppAccount" {
            account()
        } else {
            pool()
        };
        merge(&mut obj, &patch);
        let err = check(kind, &obj).expect_err(&format!("{kind} {patch} must be rejected"));
        assert!(
            err.contains(expected),
            "{kind} {patch}: error {err:?} should mention {expected:?}"
        );
    }
}

fn web_account() -> Value {
    let mut a = account();
    a["spec"]["provider"] = json!({ "whatsappWeb": { "pairing": "PairCode" } });
    a
}

#[test]
fn a_web_account_is_valid_and_needs_exactly_one_provider() {
    assert_eq!(check("WhatsAppAccount", &web_account()), Ok(()));
    let mut neither = account();
    neither["spec"]["provider"] = json!({});
    let err = check("WhatsAppAccount", &neither).expect_err("no provider must be rejected");
    assert!(err.contains("set exactly one"), "{err}");
    // The provider cannot be swapped in place (the session and fence belong to one kind).
    let schema = schema_of(&WhatsAppAccount::crd());
    let err = kube::core::cel::Validator::new()
        .validate(&schema, &web_account(), Some(&account()))
        .expect_err("switching providers must be rejected");
    assert!(
        format!("{err:?}").contains("the provider cannot be changed"),
        "{err:?}"
    );
    kube::core::cel::Validator::new()
        .validate(&schema, &web_account(), Some(&web_account()))
        .expect("an unchanged provider passes");
}

#[test]
fn every_cel_rule_is_in_the_generated_schema_and_documented() {
    // Markdown tables escape pipes inside code spans.
    let docs = std::fs::read_to_string(root().join("docs/custom-resources.md"))
        .expect("docs/custom-resources.md")
        .replace("\\|", "|");
    let mut rules = Vec::new();
    for crd in [WhatsAppAccount::crd(), AgentPool::crd()] {
        collect_rules(&schema_of(&crd), &mut rules);
    }
    assert_eq!(rules.len(), 12, "rules: {rules:?}");
    for (rule, message) in rules {
        assert!(
            docs.contains(&rule),
            "docs/custom-resources.md does not list the rule `{rule}`"
        );
        assert!(
            docs.contains(&message),
            "docs/custom-resources.md does not give the message {message:?}"
        );
    }
}

fn collect_rules(v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::Array(rules)) = m.get("x-kubernetes-validations") {
                for r in rules {
                    out.push((
                        r["rule"].as_str().unwrap_or_default().to_string(),
                        r["message"].as_str().unwrap_or_default().to_string(),
                    ));
                }
            }
            m.values().for_each(|x| collect_rules(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| collect_rules(x, out)),
        _ => {}
    }
}

fn merge(target: &mut Value, patch: &Value) {
    if let (Value::Object(t), Value::Object(p)) = (&mut *target, patch) {
        for (k, v) in p {
            merge(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    } else {
        *target = patch.clone();
    }
}

#[test]
fn the_docs_show_the_columns_kubectl_prints() {
    let doc = std::fs::read_to_string(root().join("docs/custom-resources.md")).expect("doc");
    for (plural, crd) in [
        ("whatsappaccounts", WhatsAppAccount::crd()),
        ("agentpools", AgentPool::crd()),
    ] {
        let columns: Vec<String> = crd.spec.versions[0]
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.to_uppercase())
            .collect();
        let line = format!("`kubectl get {plural}` shows `{}`", columns.join("  "));
        assert!(
            doc.contains(&line),
            "docs/custom-resources.md should say: {line}"
        );
    }
}
