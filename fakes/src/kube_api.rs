//! A small in-process Kubernetes API server for tests and the sandbox.
//!
//! It stores objects by path and implements what controllers and leader election use: get,
//! list, create (409 AlreadyExists), replace with optimistic concurrency (409 Conflict when
//! `metadata.resourceVersion` is stale), patch (apply, merge and strategic patches are all
//! applied as JSON merge patches; apply creates missing objects), the `status` subresource, and
//! delete. It can be made unavailable (503) to simulate a holder losing the API server. Lists
//! honour `labelSelector` (equality terms), and `pods/{name}:{port}/proxy/...` forwards to the
//! pod's `status.podIP` as the API server's pod proxy does (dropping `Authorization`, 503 when
//! the pod does not answer).
//! Watches stream every change of a collection after the `resourceVersion` asked for (or its
//! current objects first when none is given), as the API server's watch does, so informers
//! (`kube::runtime::watcher`) run against it; `timeoutSeconds` ends a watch.
//! A test can watch every change as it is stored ([`FakeKubeApi::on_change`]) to check an
//! invariant at the moment it could break (no socket open when a Lease changes hands).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::Server;

/// A request the fake received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Option<Value>,
}

/// One change of one object, as a watch reports it.
#[derive(Clone)]
struct Event {
    rv: u64,
    collection: String,
    kind: &'static str,
    object: Value,
}

/// `(collection path, "ADDED" | "MODIFIED" | "DELETED", object)`.
type ChangeHook = Arc<dyn Fn(&str, &str, &Value) + Send + Sync>;

#[derive(Default)]
struct Inner {
    objects: Mutex<HashMap<String, BTreeMap<String, Value>>>,
    requests: Mutex<Vec<Recorded>>,
    unavailable: AtomicBool,
    /// Path fragments answered with 403, as RBAC would.
    forbidden: Mutex<Vec<String>>,
    rv: AtomicU64,
    /// Every change, in order, for watches.
    events: Mutex<Vec<Event>>,
    changed: tokio::sync::Notify,
    /// Called with every change as it is stored.
    on_change: Mutex<Option<ChangeHook>>,
    /// For the pod proxy.
    http: reqwest::Client,
}

/// The running fake API server.
#[derive(Clone)]
pub struct FakeKubeApi {
    inner: Arc<Inner>,
    server: Arc<Server>,
}

impl FakeKubeApi {
    pub async fn start() -> std::io::Result<Self> {
        crate::install_crypto_provider();
        let inner = Arc::new(Inner {
            rv: AtomicU64::new(100),
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()
                .map_err(std::io::Error::other)?,
            ..Default::default()
        });
        let router = Router::new().fallback(handle).with_state(inner.clone());
        let server = Server::start(router).await?;
        Ok(Self {
            inner,
            server: Arc::new(server),
        })
    }

    /// Write a kubeconfig for this server (namespace `namespace`) into `dir`, for processes
    /// that find the API server the way pods' tools do (`KUBECONFIG`).
    pub fn write_kubeconfig(
        &self,
        dir: &std::path::Path,
        namespace: &str,
    ) -> std::io::Result<std::path::PathBuf> {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
                 users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {namespace}\n\
                 current-context: fake\n",
                self.url()
            ),
        )?;
        Ok(path)
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Answer every request with 503 while false.
    pub fn set_available(&self, available: bool) {
        self.inner.unavailable.store(!available, Ordering::SeqCst);
    }

    /// Answer 403 Forbidden to every request whose path contains `fragment` (a resource the
    /// caller's RBAC does not allow).
    pub fn forbid(&self, fragment: &str) {
        lock(&self.inner.forbidden).push(fragment.to_string());
    }

    /// Call `hook` with every change as it is stored, before the writer gets its answer. It
    /// runs under the store's lock: it must not call back into this fake.
    pub fn on_change(&self, hook: impl Fn(&str, &str, &Value) + Send + Sync + 'static) {
        *lock(&self.inner.on_change) = Some(Arc::new(hook));
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.inner.requests).clone()
    }

    /// Forget recorded requests.
    pub fn clear_requests(&self) {
        lock(&self.inner.requests).clear();
    }

    /// An object by its API path (`/apis/coordination.k8s.io/v1/namespaces/ns/leases/name`).
    pub fn get(&self, path: &str) -> Option<Value> {
        let (collection, name, _) = split(path)?;
        lock(&self.inner.objects)
            .get(&collection)?
            .get(name?.as_str())
            .cloned()
    }

    /// Store an object at its API path, as if created by someone else.
    pub fn put(&self, path: &str, mut object: Value) {
        if let Some((collection, Some(name), _)) = split(path) {
            let rv = self.inner.next_rv();
            object["metadata"]["resourceVersion"] = json!(rv);
            object["metadata"]["name"] = json!(name);
            let mut objects = lock(&self.inner.objects);
            let items = objects.entry(collection.clone()).or_default();
            let kind = match items.insert(name, object.clone()) {
                Some(_) => "MODIFIED",
                None => "ADDED",
            };
            self.inner.record(&collection, kind, &object);
        }
    }

    /// Delete an object by its API path, as if deleted by someone else.
    pub fn remove(&self, path: &str) -> Option<Value> {
        let (collection, name, _) = split(path)?;
        let mut objects = lock(&self.inner.objects);
        let removed = objects.get_mut(&collection)?.remove(name?.as_str())?;
        self.inner.record(&collection, "DELETED", &removed);
        Some(removed)
    }
}

impl Inner {
    fn next_rv(&self) -> String {
        self.rv.fetch_add(1, Ordering::SeqCst).to_string()
    }

    /// Log a change for watches and wake them. Called with the objects lock held, so the log
    /// is in resourceVersion order.
    fn record(&self, collection: &str, kind: &'static str, object: &Value) {
        let mut object = object.clone();
        if kind == "DELETED" {
            object["metadata"]["resourceVersion"] = json!(self.next_rv());
        }
        let rv = object["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| self.rv.load(Ordering::SeqCst));
        let hook = lock(&self.on_change).clone();
        if let Some(hook) = hook {
            hook(collection, kind, &object);
        }
        lock(&self.events).push(Event {
            rv,
            collection: collection.to_string(),
            kind,
            object,
        });
        self.changed.notify_waiters();
    }
}

fn query_param(query: &str, key: &str) -> Option<String> {
    let url = reqwest::Url::parse(&format!("http://x/?{query}")).ok()?;
    url.query_pairs()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

fn selected(selector: &[(String, String)], o: &Value) -> bool {
    selector
        .iter()
        .all(|(k, v)| o["metadata"]["labels"][k].as_str() == Some(v.as_str()))
}

/// A watch: newline-delimited `{"type", "object"}` events of `collection` after `since` (its
/// current objects first when `since` is none), until `timeoutSeconds` or the client leaves.
fn watch(inner: Arc<Inner>, collection: String, query: &str) -> Response {
    let selector = label_selector(query);
    let since: Option<u64> = query_param(query, "resourceVersion")
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0);
    let timeout = query_param(query, "timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(290u64);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(timeout);
    // Start from the log position right after `since`, or replay the current objects.
    // Lock order: objects, then events (as mutations record their event).
    let (initial, start): (Vec<Value>, usize) = {
        let objects = lock(&inner.objects);
        let events = lock(&inner.events);
        match since {
            Some(rv) => (Vec::new(), events.partition_point(|e| e.rv <= rv)),
            None => (listed(&objects, &collection, &selector), events.len()),
        }
    };
    let first: Vec<Result<Bytes, std::io::Error>> =
        initial.into_iter().map(|o| Ok(line("ADDED", &o))).collect();
    let rest = futures::stream::unfold(start, move |mut next| {
        let inner = inner.clone();
        let collection = collection.clone();
        let selector = selector.clone();
        async move {
            loop {
                let waiting = inner.changed.notified();
                let batch: Vec<Event> = {
                    let events = lock(&inner.events);
                    let batch = events[next.min(events.len())..].to_vec();
                    next = events.len();
                    batch
                };
                let lines: Vec<u8> = batch
                    .iter()
                    .filter(|e| {
                        in_collection(&collection, &e.collection) && selected(&selector, &e.object)
                    })
                    .flat_map(|e| line(e.kind, &e.object).to_vec())
                    .collect();
                if !lines.is_empty() {
                    return Some((Ok::<_, std::io::Error>(Bytes::from(lines)), next));
                }
                if tokio::time::timeout_at(deadline, waiting).await.is_err() {
                    return None;
                }
            }
        }
    });
    let stream = futures::StreamExt::chain(futures::stream::iter(first), rest);
    let mut response = axum::body::Body::from_stream(stream).into_response();
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    response
}

fn line(kind: &str, object: &Value) -> Bytes {
    let mut out =
        serde_json::to_vec(&json!({ "type": kind, "object": object })).unwrap_or_default();
    out.push(b'\n');
    Bytes::from(out)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Split an API path into (collection path, object name, subresource).
fn split(path: &str) -> Option<(String, Option<String>, Option<String>)> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let prefix_len = match *segs.first()? {
        "api" => 2,
        "apis" => 3,
        _ => return None,
    };
    let rest = segs.get(prefix_len..)?;
    let (coll_len, name_idx) = if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        (prefix_len + 3, prefix_len + 3)
    } else {
        (prefix_len + 1, prefix_len + 1)
    };
    if segs.len() < coll_len {
        return None;
    }
    let collection = format!("/{}", segs[..coll_len].join("/"));
    let name = segs.get(name_idx).map(|s| s.to_string());
    let sub = segs.get(name_idx + 1).map(|s| s.to_string());
    Some((collection, name, sub))
}

/// The objects a list or a watch's first page of `collection` shows, label selector applied.
fn listed(
    objects: &HashMap<String, BTreeMap<String, Value>>,
    collection: &str,
    selector: &[(String, String)],
) -> Vec<Value> {
    objects
        .iter()
        .filter(|(stored, _)| in_collection(collection, stored))
        .flat_map(|(_, items)| items.values())
        .filter(|o| selected(selector, o))
        .cloned()
        .collect()
}

/// Whether objects stored under collection path `stored` are listed by a request for
/// `requested`: the same collection, or every namespace's (`/apis/g/v/leases` lists
/// `/apis/g/v/namespaces/*/leases`, as `Api::all` asks).
fn in_collection(requested: &str, stored: &str) -> bool {
    if requested == stored {
        return true;
    }
    let Some((prefix, resource)) = requested.rsplit_once('/') else {
        return false;
    };
    stored
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix("/namespaces/"))
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(ns, res)| !ns.is_empty() && !ns.contains('/') && res == resource)
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code
    });
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(body),
    )
        .into_response()
}

fn ok(code: StatusCode, v: Value) -> Response {
    (code, axum::Json(v)).into_response()
}

/// RFC 7386 JSON merge patch.
pub fn merge(target: &mut Value, patch: &Value) {
    if let Value::Object(p) = patch {
        if !target.is_object() {
            *target = json!({});
        }
        if let Value::Object(t) = target {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
    } else {
        *target = patch.clone();
    }
}

/// `key=value` terms of a list's `labelSelector`.
fn label_selector(query: &str) -> Vec<(String, String)> {
    let Ok(url) = reqwest::Url::parse(&format!("http://x/?{query}")) else {
        return Vec::new();
    };
    url.query_pairs()
        .filter(|(k, _)| k == "labelSelector")
        .flat_map(|(_, v)| {
            v.split(',')
                .filter_map(|term| term.split_once('='))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `/api/v1/namespaces/{ns}/pods/{name}:{port}/proxy/{rest}` as ((pods collection, name),
/// port, rest).
fn pod_proxy(path: &str) -> Option<((String, String), u16, String)> {
    let segs: Vec<&str> = path.trim_start_matches('/').splitn(8, '/').collect();
    match segs.as_slice() {
        [
            "api",
            "v1",
            "namespaces",
            ns,
            "pods",
            target,
            "proxy",
            rest @ ..,
        ] => {
            let (name, port) = target.split_once(':').unwrap_or((target, "80"));
            let port = port.parse().ok()?;
            Some((
                (format!("/api/v1/namespaces/{ns}/pods"), name.to_string()),
                port,
                rest.first().copied().unwrap_or("").to_string(),
            ))
        }
        _ => None,
    }
}

async fn proxy(
    http: &reqwest::Client,
    method: Method,
    url: &str,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let mut req = http.request(method, url).body(body);
    for (name, value) in &headers {
        // As the API server: the caller's credentials are not passed on.
        if name != axum::http::header::AUTHORIZATION && name != axum::http::header::HOST {
            req = req.header(name, value);
        }
    }
    match req.send().await {
        Ok(resp) => {
            let code = resp.status();
            let content_type = resp
                .headers()
                .get(axum::http::header::CONTENT_TYPE)
                .cloned();
            let bytes = resp.bytes().await.unwrap_or_default();
            let mut out = (code, bytes).into_response();
            if let Some(ct) = content_type {
                out.headers_mut()
                    .insert(axum::http::header::CONTENT_TYPE, ct);
            }
            out
        }
        Err(e) => status(
            503,
            "ServiceUnavailable",
            &format!("error trying to reach service: {e}"),
        ),
    }
}

async fn handle(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let headers = req.headers().clone();
    let bytes: Bytes = match axum::body::to_bytes(req.into_body(), 16 * 1024 * 1024).await {
        Ok(b) => b,
        Err(_) => return status(400, "BadRequest", "unreadable body"),
    };
    let body: Option<Value> = if bytes.is_empty() {
        None
    } else {
        serde_json::from_slice(&bytes).ok()
    };
    lock(&inner.requests).push(Recorded {
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
        body: body.clone(),
    });
    if inner.unavailable.load(Ordering::SeqCst) {
        return status(
            503,
            "ServiceUnavailable",
            "the fake API server is unavailable",
        );
    }
    if let Some(fragment) = lock(&inner.forbidden)
        .iter()
        .find(|f| path.contains(f.as_str()))
    {
        return status(
            403,
            "Forbidden",
            &format!(
                "{fragment} is forbidden: User \"test\" cannot {} resource \"{fragment}\"",
                method.as_str().to_lowercase()
            ),
        );
    }
    if let Some((pod_path, port, rest)) = pod_proxy(&path) {
        let target = lock(&inner.objects)
            .get(&pod_path.0)
            .and_then(|pods| pods.get(&pod_path.1))
            .map(|pod| pod["status"]["podIP"].as_str().map(str::to_string));
        return match target {
            None => status(
                404,
                "NotFound",
                &format!("pods \"{}\" not found", pod_path.1),
            ),
            Some(None) => status(
                503,
                "ServiceUnavailable",
                &format!("pod \"{}\" has no IP yet", pod_path.1),
            ),
            Some(Some(ip)) => {
                let url = format!(
                    "http://{ip}:{port}/{rest}{}{query}",
                    if query.is_empty() { "" } else { "?" }
                );
                proxy(&inner.http, method, &url, headers, bytes).await
            }
        };
    }
    let Some((collection, name, sub)) = split(&path) else {
        return status(404, "NotFound", "unknown path");
    };
    let mut objects = lock(&inner.objects);
    let items = objects.entry(collection.clone()).or_default();
    match (method, name) {
        (Method::GET, None) => {
            if query.contains("watch=true") || query.contains("watch=1") {
                drop(objects);
                return watch(inner.clone(), collection, &query);
            }
            let selector = label_selector(&query);
            let list = listed(&objects, &collection, &selector);
            ok(
                StatusCode::OK,
                json!({ "apiVersion": "v1", "kind": "List", "metadata": { "resourceVersion": inner.rv.load(Ordering::SeqCst).to_string() }, "items": list }),
            )
        }
        (Method::GET, Some(name)) => match items.get(&name) {
            Some(o) => ok(StatusCode::OK, o.clone()),
            None => status(404, "NotFound", &format!("{name} not found")),
        },
        (Method::POST, None) => {
            let Some(mut obj) = body else {
                return status(400, "BadRequest", "missing body");
            };
            let Some(name) = obj["metadata"]["name"].as_str().map(str::to_string) else {
                return status(422, "Invalid", "metadata.name is required");
            };
            if items.contains_key(&name) {
                return status(409, "AlreadyExists", &format!("{name} already exists"));
            }
            obj["metadata"]["resourceVersion"] = json!(inner.next_rv());
            obj["metadata"]["uid"] = json!(uuid::Uuid::new_v4().to_string());
            obj["metadata"]["generation"] = json!(1);
            items.insert(name, obj.clone());
            inner.record(&collection, "ADDED", &obj);
            ok(StatusCode::CREATED, obj)
        }
        (Method::PUT, Some(name)) => {
            let Some(mut obj) = body else {
                return status(400, "BadRequest", "missing body");
            };
            let Some(current) = items.get(&name) else {
                return status(404, "NotFound", &format!("{name} not found"));
            };
            let sent_rv = obj["metadata"]["resourceVersion"].as_str().unwrap_or("");
            if !sent_rv.is_empty()
                && sent_rv
                    != current["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or("")
            {
                return status(
                    409,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version and try again",
                );
            }
            let mut next = current.clone();
            if sub.as_deref() == Some("status") {
                next["status"] = obj["status"].take();
            } else {
                let status_keep = current.get("status").cloned();
                next = obj;
                if let Some(s) = status_keep {
                    next["status"] = s;
                }
                next["metadata"]["uid"] = current["metadata"]["uid"].clone();
            }
            next["metadata"]["resourceVersion"] = json!(inner.next_rv());
            items.insert(name, next.clone());
            inner.record(&collection, "MODIFIED", &next);
            ok(StatusCode::OK, next)
        }
        (Method::PATCH, Some(name)) => {
            let Some(patch) = body else {
                return status(400, "BadRequest", "missing body");
            };
            let existed = items.contains_key(&name);
            let mut next = match items.get(&name) {
                Some(o) => o.clone(),
                None if query.contains("fieldManager") => {
                    json!({ "metadata": { "name": name, "uid": uuid::Uuid::new_v4().to_string(), "generation": 1 } })
                }
                None => return status(404, "NotFound", &format!("{name} not found")),
            };
            if sub.as_deref() == Some("status") {
                if let Some(s) = patch.get("status") {
                    merge(&mut next["status"], s);
                }
            } else {
                let mut p = patch.clone();
                if let Some(m) = p.get_mut("metadata").and_then(Value::as_object_mut) {
                    m.remove("resourceVersion");
                }
                merge(&mut next, &p);
            }
            next["metadata"]["resourceVersion"] = json!(inner.next_rv());
            items.insert(name, next.clone());
            inner.record(
                &collection,
                if existed { "MODIFIED" } else { "ADDED" },
                &next,
            );
            ok(StatusCode::OK, next)
        }
        (Method::DELETE, Some(name)) => match items.remove(&name) {
            Some(o) => {
                inner.record(&collection, "DELETED", &o);
                ok(StatusCode::OK, o)
            }
            None => status(404, "NotFound", &format!("{name} not found")),
        },
        _ => status(405, "MethodNotAllowed", "not supported by the fake"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_namespaced_and_core_paths() {
        let (c, n, s) =
            split("/apis/coordination.k8s.io/v1/namespaces/ns/leases/whatsapp-a").expect("path");
        assert_eq!(c, "/apis/coordination.k8s.io/v1/namespaces/ns/leases");
        assert_eq!(n.as_deref(), Some("whatsapp-a"));
        assert_eq!(s, None);
        let (c, n, s) = split("/api/v1/namespaces/ns/secrets/creds").expect("path");
        assert_eq!(
            (c.as_str(), n.as_deref(), s),
            ("/api/v1/namespaces/ns/secrets", Some("creds"), None)
        );
        let (_, _, s) =
            split("/apis/whatsapp.kube-agents.io/v1alpha1/namespaces/ns/agentpools/p/status")
                .expect("path");
        assert_eq!(s.as_deref(), Some("status"));
    }

    #[test]
    fn merge_patch_removes_nulls_and_merges_objects() {
        let mut t = json!({"a": 1, "b": {"c": 2, "d": 3}});
        merge(&mut t, &json!({"a": null, "b": {"c": 5}}));
        assert_eq!(t, json!({"b": {"c": 5, "d": 3}}));
    }
}
