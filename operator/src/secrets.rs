//! Reading the user's Secrets (credentials, inbox tokens) to report what is missing.

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;

use crate::{Error, Result};

/// The Secret, or `None` when it does not exist.
pub async fn get(client: &kube::Client, namespace: &str, name: &str) -> Result<Option<Secret>> {
    Api::<Secret>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(|source| Error::Get {
            kind: "Secret",
            name: name.to_string(),
            source,
        })
}

/// The value of `key`, from `data` or (objects not yet normalized by an API server) `stringData`.
pub fn value<'a>(secret: &'a Secret, key: &str) -> Option<&'a [u8]> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|v| v.0.as_slice())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|v| v.as_bytes())
        })
}
