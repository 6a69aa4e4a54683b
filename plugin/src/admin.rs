//! What lives only in Postgres (dead jobs, open handoffs) and the actions on it, through the
//! admin API of one of the pool's core workers (`/admin/v1`), reached with the API server's
//! pod proxy as `kubectl cnpg` reaches its instance managers. The token comes from the
//! pool's admin Secret, read with the user's RBAC, and rides in `X-Admin-Token` (the API
//! server drops `Authorization` from proxied requests).

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{Format, PluginError, classify};

/// Where the admin token is and what the core pods look like; kept in step with the operator's
/// `labels` module (a test renders both).
pub fn admin_secret_name(pool: &str) -> String {
    format!("ap-{pool}-admin")
}
const ADMIN_TOKEN_KEY: &str = "token";
fn core_selector(pool: &str) -> String {
    format!("app.kubernetes.io/name=whatsapp-core,whatsapp.kube-agents.io/pool={pool}")
}
/// The core container's HTTP port when the pod does not name one.
const DEFAULT_PORT: i32 = 8080;

/// A dead job, as the admin API lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeadJob {
    pub id: i64,
    pub kind: String,
    pub concurrency_key: Option<String>,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub finished_at: Option<String>,
}

/// An open handoff, as the admin API lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Handoff {
    pub conversation_id: i64,
    pub account_id: String,
    pub contact_name: Option<String>,
    pub contact_phone: String,
    pub assignee: Option<String>,
    pub reason: Option<String>,
    pub handed_off_at: String,
    pub last_customer_message: Option<String>,
    pub awaiting_reply: bool,
    pub in_window: bool,
}

/// An error body: ours has `error` (a code) and `message`; the API server's Status has
/// `message` and `reason`.
#[derive(Deserialize)]
struct ErrorBody {
    error: Option<String>,
    message: String,
}

/// A core worker of one pool, ready to take admin requests.
pub struct PoolAdmin {
    client: Client,
    namespace: String,
    pub pool: String,
    /// The pod that answers.
    pub pod: String,
    port: i32,
    token: String,
    actor: String,
}

fn ready(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    let is_ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    is_ready
        && status.and_then(|s| s.pod_ip.as_ref()).is_some()
        && pod.metadata.deletion_timestamp.is_none()
}

fn http_port(pod: &Pod) -> i32 {
    pod.spec
        .as_ref()
        .into_iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some("http"))
        .map_or(DEFAULT_PORT, |p| p.container_port)
}

impl PoolAdmin {
    /// Find the pool, its admin token and a ready core pod.
    pub async fn connect(
        client: &Client,
        namespace: &str,
        pool: &str,
        actor: &str,
    ) -> Result<Self, PluginError> {
        Api::<crds::AgentPool>::namespaced(client.clone(), namespace)
            .get(pool)
            .await
            .map_err(|e| classify(e, "AgentPool", pool, namespace))?;
        let secret_name = admin_secret_name(pool);
        let secret = Api::<Secret>::namespaced(client.clone(), namespace)
            .get_opt(&secret_name)
            .await
            .map_err(|e| match classify(e, "Secret", &secret_name, namespace) {
                PluginError::Forbidden(m) => PluginError::Forbidden(format!(
                    "{m}\n(the admin commands also need get on the Secret {secret_name} and create on pods/proxy)"
                )),
                other => other,
            })?
            .ok_or_else(|| PluginError::NoAdminToken {
                pool: pool.to_string(),
                secret: secret_name.clone(),
            })?;
        let token = secret
            .data
            .as_ref()
            .and_then(|d| d.get(ADMIN_TOKEN_KEY))
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| PluginError::NoAdminToken {
                pool: pool.to_string(),
                secret: secret_name.clone(),
            })?;
        let pods = Api::<Pod>::namespaced(client.clone(), namespace)
            .list(&ListParams::default().labels(&core_selector(pool)))
            .await
            .map_err(|e| classify(e, "Pod", "", namespace))?;
        let total = pods.items.len();
        let mut candidates: Vec<Pod> = pods.items.into_iter().filter(ready).collect();
        // Any ready pod will do; the newest is the least likely to be on its way out.
        candidates.sort_by_key(|p| p.metadata.creation_timestamp.clone().map(|t| t.0));
        let Some(pod) = candidates.pop() else {
            return Err(PluginError::NoWorker {
                pool: pool.to_string(),
                detail: format!("{total} core pods, none ready"),
            });
        };
        Ok(Self {
            client: client.clone(),
            namespace: namespace.to_string(),
            pool: pool.to_string(),
            port: http_port(&pod),
            pod: pod.name_any(),
            token,
            actor: actor.to_string(),
        })
    }

    async fn call<T: DeserializeOwned>(&self, method: &str, path: &str) -> Result<T, PluginError> {
        let uri = format!(
            "/api/v1/namespaces/{}/pods/{}:{}/proxy{path}",
            self.namespace, self.pod, self.port
        );
        let request = http::Request::builder()
            .method(method)
            .uri(&uri)
            .header("x-admin-token", &self.token)
            .header("x-admin-actor", &self.actor)
            .header("accept", "application/json")
            .body(kube::client::Body::from(Vec::new()))
            .map_err(|e| PluginError::Api(format!("building the request: {e}")))?;
        let response = self
            .client
            .send(request)
            .await
            .map_err(|e| PluginError::Unreachable(e.to_string()))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect_bytes()
            .await
            .map_err(|e| PluginError::Unreachable(e.to_string()))?;
        if status.is_success() {
            return serde_json::from_slice(&body).map_err(|e| {
                PluginError::Api(format!("unexpected answer from {}: {e}", self.pod))
            });
        }
        let parsed = serde_json::from_slice::<ErrorBody>(&body).ok();
        let message = parsed.as_ref().map_or_else(
            || String::from_utf8_lossy(&body).into_owned(),
            |b| b.message.clone(),
        );
        if let Some(code) = parsed.and_then(|b| b.error) {
            // The worker itself answered.
            return Err(match code.as_str() {
                "unauthorized" => PluginError::Api(format!(
                    "the core worker {} refused the admin token of {} (was the Secret changed without restarting the pods?)",
                    self.pod,
                    admin_secret_name(&self.pool)
                )),
                _ => PluginError::Api(message),
            });
        }
        // The API server answered: RBAC, or a pod that does not answer.
        Err(match status.as_u16() {
            403 => PluginError::Forbidden(format!(
                "{message}\n(the admin commands need create on pods/proxy in {})",
                self.namespace
            )),
            404 => PluginError::NoWorker {
                pool: self.pool.clone(),
                detail: format!("{} is gone: {message}", self.pod),
            },
            502..=504 => PluginError::NoWorker {
                pool: self.pool.clone(),
                detail: format!("{} did not answer: {message}", self.pod),
            },
            code => PluginError::Api(format!("{code} from {}: {message}", self.pod)),
        })
    }

    pub async fn dead_jobs(&self, limit: i64) -> Result<Vec<DeadJob>, PluginError> {
        self.call("GET", &format!("/admin/v1/jobs/dead?limit={limit}"))
            .await
    }

    /// Replay one dead job; returns the new job's id.
    pub async fn replay(&self, id: i64) -> Result<i64, PluginError> {
        #[derive(Deserialize)]
        struct Replayed {
            replayed_as: i64,
        }
        let r: Replayed = self
            .call("POST", &format!("/admin/v1/jobs/{id}/replay"))
            .await?;
        Ok(r.replayed_as)
    }

    /// Replay every dead job of the pool; returns how many.
    pub async fn replay_all(&self) -> Result<u64, PluginError> {
        #[derive(Deserialize)]
        struct Replayed {
            replayed: u64,
        }
        let r: Replayed = self.call("POST", "/admin/v1/jobs/replay-all").await?;
        Ok(r.replayed)
    }

    pub async fn handoffs(&self) -> Result<Vec<Handoff>, PluginError> {
        self.call("GET", "/admin/v1/handoffs").await
    }

    /// Hand a conversation back to the agent; true when the agent answers pending messages now.
    pub async fn resume(&self, conversation: i64) -> Result<bool, PluginError> {
        #[derive(Deserialize)]
        struct Resumed {
            agent_answers_pending: bool,
        }
        let r: Resumed = self
            .call(
                "POST",
                &format!("/admin/v1/conversations/{conversation}/resume"),
            )
            .await?;
        Ok(r.agent_answers_pending)
    }
}

/// The pools of a namespace, for commands that default to the only one.
pub async fn only_pool(client: &Client, namespace: &str) -> Result<String, PluginError> {
    let pools = Api::<crds::AgentPool>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .map_err(|e| classify(e, "AgentPool", "", namespace))?;
    match pools.items.as_slice() {
        [one] => Ok(one.name_any()),
        [] => Err(PluginError::Api(format!(
            "no AgentPools in namespace \"{namespace}\""
        ))),
        many => Err(PluginError::Api(format!(
            "namespace \"{namespace}\" has {} AgentPools ({}): name one with --pool",
            many.len(),
            many.iter()
                .map(|p| p.name_any())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Serialize for `-o json|yaml`.
fn structured<T: Serialize>(v: &T, format: Format) -> Result<String, PluginError> {
    match format {
        Format::Json => serde_json::to_string_pretty(v)
            .map(|s| s + "\n")
            .map_err(|e| PluginError::Render(e.to_string())),
        _ => serde_saphyr::to_string(v).map_err(|e| PluginError::Render(e.to_string())),
    }
}

/// Seconds since an RFC 3339 time, for the AGE columns.
fn age_of(at: Option<&str>) -> String {
    crate::age(
        at.and_then(|t| t.parse::<jiff::Timestamp>().ok()).map(|t| {
            crate::seconds_since(&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t))
        }),
    )
}

/// A cell without line breaks, cut to `max` characters.
fn cell(text: Option<&str>, max: usize) -> String {
    let one_line: String = text
        .unwrap_or("-")
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() > max {
        let cut: String = one_line.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    } else {
        one_line
    }
}

pub fn render_dead(pool: &str, jobs: &[DeadJob], format: Format) -> Result<String, PluginError> {
    if format != Format::Table {
        return structured(&jobs, format);
    }
    if jobs.is_empty() {
        return Ok(format!("No dead jobs in pool {pool}.\n"));
    }
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.to_string(),
                j.kind.clone(),
                cell(j.concurrency_key.as_deref(), 40),
                j.attempts.to_string(),
                age_of(j.finished_at.as_deref()),
                cell(j.last_error.as_deref(), 100),
            ]
        })
        .collect();
    Ok(crate::table(
        &[
            "JOB",
            "KIND",
            "CONVERSATION",
            "ATTEMPTS",
            "DIED",
            "LAST ERROR",
        ],
        &rows,
    ))
}

pub fn render_handoffs(
    pool: &str,
    handoffs: &[Handoff],
    format: Format,
) -> Result<String, PluginError> {
    if format != Format::Table {
        return structured(&handoffs, format);
    }
    if handoffs.is_empty() {
        return Ok(format!("No open handoffs in pool {pool}.\n"));
    }
    let rows: Vec<Vec<String>> = handoffs
        .iter()
        .map(|h| {
            vec![
                h.conversation_id.to_string(),
                h.account_id.clone(),
                match &h.contact_name {
                    Some(n) => format!("{} ({})", cell(Some(n), 30), h.contact_phone),
                    None => h.contact_phone.clone(),
                },
                crate::opt(h.assignee.as_deref()),
                age_of(Some(&h.handed_off_at)),
                if h.awaiting_reply { "yes" } else { "no" }.to_string(),
                if h.in_window { "open" } else { "closed" }.to_string(),
                cell(h.last_customer_message.as_deref(), 60),
            ]
        })
        .collect();
    Ok(crate::table(
        &[
            "CONVERSATION",
            "ACCOUNT",
            "CONTACT",
            "ASSIGNEE",
            "WAITING",
            "NEEDS REPLY",
            "24H WINDOW",
            "LAST MESSAGE",
        ],
        &rows,
    ))
}
