//! Tool plugins: a registry of built-ins, each described by a manifest, enabled per AgentPool
//! with a config checked against the plugin's `configSchema`.
//!
//! Nothing here can stop a worker: an invalid manifest is left out of the registry with a
//! diagnostic, an unknown plugin id or an invalid config disables that one tool with a
//! diagnostic naming the plugin and the field, and the agent runs with the rest. Diagnostics are
//! written to `plugin_diagnostics` and surface in the AgentPool's `ToolsValid` condition.

mod builtin;
pub mod template;

use std::collections::BTreeMap;
use std::sync::Arc;

use crds::agent_pool::{ToolPolicy, ToolSpec};
use serde::Serialize;
use serde_json::Value;

pub use builtin::builtins;

/// The channel every tool runs on here.
pub const CHANNEL: &str = "whatsapp";

/// How much harm a tool can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Risk {
    /// Reads only.
    Low,
    /// Changes conversation state.
    Medium,
    /// Acts outside the conversation (payments, bookings).
    High,
}

/// What a plugin declares about itself.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub id: String,
    pub description: String,
    /// JSON Schema of the plugin's config in the AgentPool.
    pub config_schema: Value,
    /// JSON Schema of the arguments the model passes.
    pub parameters: Value,
    pub risk: Risk,
    /// Channels the plugin may run on.
    pub channels: Vec<String>,
}

/// What a tool call changes besides its result text.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    SetLane(String),
    Handoff {
        reason: String,
    },
    /// Queue a template message (a [`template::message`]) after the turn's texts.
    SendTemplate(Value),
    /// Offer these reply buttons (titles) with the turn's last text.
    OfferButtons(Vec<String>),
}

/// The result of a tool call: text for the model, and an optional action for the turn.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolOutput {
    pub content: String,
    pub action: Option<Action>,
}

/// What a tool can see of the turn.
#[derive(Debug, Clone)]
pub struct ToolContext {
    pub lanes: Vec<String>,
    pub now: chrono::DateTime<chrono::Utc>,
}

/// A tool implementation.
pub trait Plugin: Send + Sync {
    fn manifest(&self) -> Manifest;
    fn call(&self, config: &Value, args: &Value, ctx: &ToolContext) -> Result<ToolOutput, String>;
}

/// A problem with a plugin or its configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub plugin_id: String,
    /// The field at fault (`id`, `config.timezone`, `manifest.configSchema`, ...).
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "tool {}: {}: {}",
            self.plugin_id, self.field, self.message
        )
    }
}

/// Plugins by id, with valid manifests only.
#[derive(Clone, Default)]
pub struct Registry {
    plugins: BTreeMap<String, (Manifest, Arc<dyn Plugin>)>,
}

impl Registry {
    /// Build a registry, leaving out (with a diagnostic) any plugin whose manifest is invalid.
    pub fn new(plugins: Vec<Arc<dyn Plugin>>) -> (Self, Vec<Diagnostic>) {
        let mut reg = Self::default();
        let mut diags = Vec::new();
        for p in plugins {
            let m = p.manifest();
            match validate_manifest(&m) {
                Ok(()) if reg.plugins.contains_key(&m.id) => diags.push(Diagnostic {
                    plugin_id: m.id.clone(),
                    field: "manifest.id".into(),
                    message: "duplicate plugin id".into(),
                }),
                Ok(()) => {
                    reg.plugins.insert(m.id.clone(), (m, p));
                }
                Err(d) => diags.push(d),
            }
        }
        (reg, diags)
    }

    /// The registry of built-in plugins.
    pub fn builtin() -> (Self, Vec<Diagnostic>) {
        Self::new(builtins())
    }

    pub fn manifests(&self) -> Vec<&Manifest> {
        self.plugins.values().map(|(m, _)| m).collect()
    }

    /// Resolve the AgentPool's tool list: the enabled tools, and a diagnostic per rejected one.
    pub fn enable(&self, specs: &[ToolSpec]) -> (Toolbox, Vec<Diagnostic>) {
        let mut tools = Vec::new();
        let mut diags = Vec::new();
        for spec in specs {
            let Some((manifest, plugin)) = self.plugins.get(&spec.id) else {
                diags.push(Diagnostic {
                    plugin_id: spec.id.clone(),
                    field: "id".into(),
                    message: format!("no plugin with id {:?} in the registry", spec.id),
                });
                continue;
            };
            let config = spec
                .config
                .clone()
                .unwrap_or_else(|| Value::Object(Default::default()));
            match jsonschema::validator_for(&manifest.config_schema) {
                Ok(v) => {
                    let errors: Vec<Diagnostic> = v
                        .iter_errors(&config)
                        .map(|e| Diagnostic {
                            plugin_id: spec.id.clone(),
                            field: format!(
                                "config{}",
                                e.instance_path.to_string().replace('/', ".")
                            ),
                            message: e.to_string(),
                        })
                        .collect();
                    if !errors.is_empty() {
                        diags.extend(errors);
                        continue;
                    }
                }
                Err(e) => {
                    diags.push(Diagnostic {
                        plugin_id: spec.id.clone(),
                        field: "manifest.configSchema".into(),
                        message: e.to_string(),
                    });
                    continue;
                }
            }
            let allowed = match spec.channels.get(CHANNEL) {
                Some(ToolPolicy::Deny) => false,
                Some(ToolPolicy::Allow) => true,
                None => manifest.channels.iter().any(|c| c == CHANNEL),
            };
            if !allowed {
                continue;
            }
            tools.push(EnabledTool {
                manifest: manifest.clone(),
                plugin: plugin.clone(),
                config,
            });
        }
        (Toolbox { tools }, diags)
    }
}

fn validate_manifest(m: &Manifest) -> Result<(), Diagnostic> {
    let bad = |field: &str, message: String| Diagnostic {
        plugin_id: m.id.clone(),
        field: field.into(),
        message,
    };
    let id_ok = !m.id.is_empty()
        && m.id.len() <= 64
        && m.id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !id_ok {
        return Err(bad(
            "manifest.id",
            "must be 1-64 characters of [a-zA-Z0-9_-] (a Chat Completions function name)".into(),
        ));
    }
    if m.description.trim().is_empty() {
        return Err(bad("manifest.description", "must not be empty".into()));
    }
    for (field, schema) in [
        ("manifest.configSchema", &m.config_schema),
        ("manifest.parameters", &m.parameters),
    ] {
        if schema.get("type") != Some(&Value::String("object".into())) {
            return Err(bad(
                field,
                "must be a JSON Schema with \"type\": \"object\"".into(),
            ));
        }
        jsonschema::validator_for(schema).map_err(|e| bad(field, e.to_string()))?;
    }
    if m.channels.is_empty() {
        return Err(bad(
            "manifest.channels",
            "must list at least one channel".into(),
        ));
    }
    Ok(())
}

/// A tool enabled for a pool, with its config.
#[derive(Clone)]
pub struct EnabledTool {
    pub manifest: Manifest,
    plugin: Arc<dyn Plugin>,
    config: Value,
}

/// The tools the agent may call in a turn.
#[derive(Clone, Default)]
pub struct Toolbox {
    tools: Vec<EnabledTool>,
}

impl Toolbox {
    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }

    pub fn has(&self, id: &str) -> bool {
        self.tools.iter().any(|t| t.manifest.id == id)
    }

    /// Chat Completions `tools` definitions.
    pub fn definitions(&self) -> Vec<Value> {
        self.tools
            .iter()
            .map(|t| {
                serde_json::json!({
                    "type": "function",
                    "function": { "name": t.manifest.id, "description": t.manifest.description, "parameters": t.manifest.parameters }
                })
            })
            .collect()
    }

    /// Run a tool call. Unknown tools and arguments that are not valid JSON or do not match the
    /// tool's parameters come back as an error text for the model, never as a crash.
    pub fn call(&self, name: &str, raw_args: &str, ctx: &ToolContext) -> ToolOutput {
        let err = |m: String| ToolOutput {
            content: format!("error: {m}"),
            action: None,
        };
        let Some(tool) = self.tools.iter().find(|t| t.manifest.id == name) else {
            return err(format!("unknown tool {name:?}"));
        };
        let args: Value = if raw_args.trim().is_empty() {
            Value::Object(Default::default())
        } else {
            match serde_json::from_str(raw_args) {
                Ok(v) => v,
                Err(e) => {
                    return err(format!(
                        "arguments are not valid JSON ({e}); send a JSON object matching the tool's parameters"
                    ));
                }
            }
        };
        if let Ok(v) = jsonschema::validator_for(&tool.manifest.parameters)
            && let Some(e) = v.iter_errors(&args).next()
        {
            return err(format!("invalid arguments at {}: {e}", e.instance_path));
        }
        tool.plugin
            .call(&tool.config, &args, ctx)
            .unwrap_or_else(err)
    }
}
