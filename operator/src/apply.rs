//! Server-side apply of rendered objects.

use std::fmt::Debug;

use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, core::NamespaceResourceScope};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{Error, MANAGER, Result};

/// Apply `obj` (its `metadata.name` names it) with the operator's field manager, forcing
/// ownership of the fields it sets.
pub async fn apply<K>(
    client: &kube::Client,
    namespace: &str,
    kind: &'static str,
    obj: &Value,
) -> Result<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + Debug,
{
    apply_as(client, namespace, kind, obj, MANAGER).await
}

/// [`apply`] under another field manager: for an object several resources share (each keeps
/// its own entries of merged lists such as `ownerReferences`).
pub async fn apply_as<K>(
    client: &kube::Client,
    namespace: &str,
    kind: &'static str,
    obj: &Value,
    manager: &str,
) -> Result<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + Debug,
{
    let name = obj["metadata"]["name"]
        .as_str()
        .ok_or(Error::MissingField("metadata.name"))?
        .to_string();
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    api.patch(
        &name,
        &PatchParams::apply(manager).force(),
        &Patch::Apply(obj),
    )
    .await
    .map_err(|source| Error::Apply { kind, name, source })
}

/// Delete an object the operator created earlier and no longer wants (gone already is fine).
pub async fn delete_if_exists<K>(
    client: &kube::Client,
    namespace: &str,
    kind: &'static str,
    name: &str,
) -> Result<()>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    match api.delete(name, &Default::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(source) => Err(Error::Delete {
            kind,
            name: name.to_string(),
            source,
        }),
    }
}

/// Merge-patch the status subresource from `previous` to `next`. Fields present before and gone
/// now are sent as `null`, since a merge patch leaves absent fields untouched.
pub async fn patch_status<K, S>(
    api: &Api<K>,
    name: &str,
    previous: Option<&S>,
    next: &S,
) -> Result<()>
where
    K: Resource + Clone + DeserializeOwned + Debug,
    S: Serialize,
{
    let mut status = serde_json::to_value(next).map_err(|e| Error::Serialize("status", e))?;
    if let (Some(prev), Some(obj)) = (
        previous
            .map(serde_json::to_value)
            .transpose()
            .map_err(|e| Error::Serialize("status", e))?,
        status.as_object_mut(),
    ) && let Some(prev) = prev.as_object()
    {
        for key in prev.keys() {
            if !obj.contains_key(key) {
                obj.insert(key.clone(), Value::Null);
            }
        }
    }
    let patch = serde_json::json!({ "status": status });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|source| Error::Status {
            name: name.to_string(),
            source,
        })?;
    Ok(())
}
