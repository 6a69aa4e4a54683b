//! The WhatsApp Web session store in Postgres: every storage trait `whatsapp-rust` needs
//! (device identity, Signal identities / sessions / pre-keys / sender keys, app-state keys and
//! versions, LID mappings, device lists, retry payloads, the pending-inbound buffer, message
//! secrets), for one account.
//!
//! Two rules make it safe to share a database between gateway replicas:
//!
//! - **Durable before Ok.** Every write commits (fsync, `synchronous_commit` at its default)
//!   before the method returns, so a sender-chain reservation the client persists before a
//!   ciphertext leaves is on disk when it leaves (`agent_docs/signal_durability.md`).
//! - **Fenced.** Every write runs in a transaction that first takes a share lock on the
//!   account's row and checks `fence_epoch` is still this store's epoch. A holder that was
//!   deposed (paused past its Lease, partitioned) gets [`Fenced`] and writes nothing, and a
//!   fence bump waits for a write in flight, so the new holder reads everything the old one
//!   committed.

use std::collections::HashMap;
use std::sync::Arc;

use sqlx::{PgPool, Postgres, Transaction};
use whatsapp_rust::async_trait;
use whatsapp_rust::bytes::Bytes;
use whatsapp_rust::wacore::appstate::hash::HashState;
use whatsapp_rust::wacore::appstate::processor::AppStateMutationMAC;
use whatsapp_rust::wacore::store::Device;
use whatsapp_rust::wacore::store::device::DEVICE_PROPS;
use whatsapp_rust::wacore::store::error::{Result, StoreError};
use whatsapp_rust::wacore::store::traits::{
    AppStateSyncKey, AppSyncStore, DeviceListRecord, DeviceStore, LidPnMappingEntry,
    MsgSecretEntry, MsgSecretStore, PendingInboundKey, PendingInboundRow, ProtocolStore,
    SignalStore, TcTokenEntry, merge_msg_secret_expiry, merge_msg_secret_message_ts,
};

/// Record kinds in `wa_web_records`.
mod kind {
    pub const IDENTITY: &str = "identity";
    pub const SESSION: &str = "session";
    pub const SIGNED_PREKEY: &str = "signed_prekey";
    pub const SENDER_KEY: &str = "sender_key";
    pub const SYNC_KEY: &str = "sync_key";
    /// The id of the sync key stored last, under the key "".
    pub const LATEST_SYNC_KEY: &str = "latest_sync_key";
    pub const APP_STATE_VERSION: &str = "app_state_version";
    pub const BASE_KEY: &str = "base_key";
    pub const DEVICE_LIST: &str = "device_list";
    pub const GROUP_METADATA: &str = "group_metadata";
}

/// A write refused because another gateway took the account over.
#[derive(Debug, thiserror::Error)]
#[error(
    "account {account}: fencing epoch {epoch} was superseded; another gateway owns the session"
)]
pub struct Fenced {
    pub account: String,
    pub epoch: i64,
}

/// One account's session store, writing under one fencing epoch.
#[derive(Clone)]
pub struct PgStore {
    db: PgPool,
    account: Arc<str>,
    epoch: i64,
}

fn db_err(e: sqlx::Error) -> StoreError {
    StoreError::Database(Box::new(e))
}

fn ser<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| StoreError::Serialization(Box::new(e)))
}

fn de<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| StoreError::Serialization(Box::new(e)))
}

fn hex_key(b: &[u8]) -> String {
    hex::encode(b)
}

/// `user@server` or `user:device@server` belongs to `user`.
fn address_of_user(address: &str, user: &str) -> bool {
    address
        .strip_prefix(user)
        .is_some_and(|rest| rest.starts_with('@') || rest.starts_with(':'))
}

impl PgStore {
    /// A store for `account` that writes only while `epoch` is the account's fence.
    pub fn new(db: PgPool, account: &str, epoch: i64) -> Self {
        Self {
            db,
            account: Arc::from(account),
            epoch,
        }
    }

    pub fn account(&self) -> &str {
        &self.account
    }

    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    /// A transaction that holds the fence: the account's row is share-locked at our epoch.
    async fn begin(&self) -> Result<Transaction<'static, Postgres>> {
        let mut tx = self.db.begin().await.map_err(db_err)?;
        let held: Option<(i32,)> =
            sqlx::query_as("SELECT 1 FROM accounts WHERE id = $1 AND fence_epoch = $2 FOR SHARE")
                .bind(&*self.account)
                .bind(self.epoch)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
        if held.is_none() {
            return Err(StoreError::Database(Box::new(Fenced {
                account: self.account.to_string(),
                epoch: self.epoch,
            })));
        }
        Ok(tx)
    }

    /// Forget the device's whole identity (the phone removed it); returns the rows removed.
    /// Fenced: a holder that lost its term forgets nothing.
    pub async fn forget_identity(&self) -> Result<i64> {
        let mut tx = self.begin().await?;
        let (forgotten,): (i64,) = sqlx::query_as(include_str!("forget_identity.sql"))
            .bind(&*self.account)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err)?;
        Self::commit(tx).await?;
        Ok(forgotten)
    }

    async fn commit(tx: Transaction<'static, Postgres>) -> Result<()> {
        tx.commit().await.map_err(db_err)
    }

    async fn get_record(&self, kind: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let row: Option<(Vec<u8>,)> = sqlx::query_as(
            "SELECT value FROM wa_web_records WHERE account_id = $1 AND kind = $2 AND key = $3",
        )
        .bind(&*self.account)
        .bind(kind)
        .bind(key)
        .fetch_optional(&self.db)
        .await
        .map_err(db_err)?;
        Ok(row.map(|r| r.0))
    }

    async fn put_records(&self, kind: &str, rows: &[(&str, &[u8])]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let keys: Vec<&str> = rows.iter().map(|r| r.0).collect();
        let values: Vec<&[u8]> = rows.iter().map(|r| r.1).collect();
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO wa_web_records (account_id, kind, key, value)
             SELECT $1, $2, k, v FROM unnest($3::text[], $4::bytea[]) AS t(k, v)
             ON CONFLICT (account_id, kind, key) DO UPDATE SET value = EXCLUDED.value",
        )
        .bind(&*self.account)
        .bind(kind)
        .bind(&keys)
        .bind(&values)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        Self::commit(tx).await
    }

    async fn put_record(&self, kind: &str, key: &str, value: &[u8]) -> Result<()> {
        self.put_records(kind, &[(key, value)]).await
    }

    async fn delete_record(&self, kind: &str, key: &str) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM wa_web_records WHERE account_id = $1 AND kind = $2 AND key = $3")
            .bind(&*self.account)
            .bind(kind)
            .bind(key)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        Self::commit(tx).await
    }

    async fn record_keys(&self, kind: &str) -> Result<Vec<(String, Vec<u8>)>> {
        sqlx::query_as(
            "SELECT key, value FROM wa_web_records WHERE account_id = $1 AND kind = $2 ORDER BY key",
        )
        .bind(&*self.account)
        .bind(kind)
        .fetch_all(&self.db)
        .await
        .map_err(db_err)
    }

    /// Run one statement in a fenced transaction.
    async fn write<'q>(
        &self,
        query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<()> {
        self.exec_fenced(query).await.map(drop)
    }

    /// Run one statement in a fenced transaction; the number of rows it touched.
    async fn exec_fenced<'q>(
        &self,
        query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<u64> {
        let mut tx = self.begin().await?;
        let n = query
            .execute(&mut *tx)
            .await
            .map_err(db_err)?
            .rows_affected();
        Self::commit(tx).await?;
        Ok(n)
    }
}

#[async_trait]
impl SignalStore for PgStore {
    async fn put_identity(&self, address: &str, key: [u8; 32]) -> Result<()> {
        self.put_record(kind::IDENTITY, address, &key).await
    }

    async fn put_identities_batch(&self, identities: &[(Arc<str>, [u8; 32])]) -> Result<()> {
        let rows: Vec<(&str, &[u8])> = identities
            .iter()
            .map(|(a, k)| (&**a, k.as_slice()))
            .collect();
        self.put_records(kind::IDENTITY, &rows).await
    }

    async fn load_identity(&self, address: &str) -> Result<Option<[u8; 32]>> {
        match self.get_record(kind::IDENTITY, address).await? {
            None => Ok(None),
            Some(v) => v.try_into().map(Some).map_err(|v: Vec<u8>| {
                StoreError::Validation(format!("identity key of {} bytes, not 32", v.len()))
            }),
        }
    }

    async fn delete_identity(&self, address: &str) -> Result<()> {
        self.delete_record(kind::IDENTITY, address).await
    }

    async fn get_session(&self, address: &str) -> Result<Option<Bytes>> {
        Ok(self
            .get_record(kind::SESSION, address)
            .await?
            .map(Bytes::from))
    }

    async fn put_session(&self, address: &str, session: &[u8]) -> Result<()> {
        self.put_record(kind::SESSION, address, session).await
    }

    async fn put_sessions_batch(&self, sessions: &[(Arc<str>, Bytes)]) -> Result<()> {
        let rows: Vec<(&str, &[u8])> = sessions.iter().map(|(a, s)| (&**a, &s[..])).collect();
        self.put_records(kind::SESSION, &rows).await
    }

    async fn delete_session(&self, address: &str) -> Result<()> {
        self.delete_record(kind::SESSION, address).await
    }

    async fn has_signal_state_for_user(&self, user: &str) -> Result<bool> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT key FROM wa_web_records
             WHERE account_id = $1 AND kind IN ('session', 'identity') AND starts_with(key, $2)",
        )
        .bind(&*self.account)
        .bind(user)
        .fetch_all(&self.db)
        .await
        .map_err(db_err)?;
        Ok(rows.iter().any(|(k,)| address_of_user(k, user)))
    }

    async fn store_prekey(&self, id: u32, record: &[u8], uploaded: bool) -> Result<()> {
        self.store_prekeys_batch(&[(id, Bytes::copy_from_slice(record))], uploaded)
            .await
    }

    async fn store_prekeys_batch(&self, keys: &[(u32, Bytes)], uploaded: bool) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = keys.iter().map(|(id, _)| i64::from(*id)).collect();
        let records: Vec<&[u8]> = keys.iter().map(|(_, r)| &r[..]).collect();
        self.write(
            sqlx::query(
                "INSERT INTO wa_web_prekeys (account_id, id, record, uploaded)
                 SELECT $1, i, r, $4 FROM unnest($2::bigint[], $3::bytea[]) AS t(i, r)
                 ON CONFLICT (account_id, id) DO UPDATE
                 SET record = EXCLUDED.record, uploaded = EXCLUDED.uploaded",
            )
            .bind(&*self.account)
            .bind(ids)
            .bind(records)
            .bind(uploaded),
        )
        .await
    }

    async fn load_prekey(&self, id: u32) -> Result<Option<Bytes>> {
        let row: Option<(Vec<u8>,)> =
            sqlx::query_as("SELECT record FROM wa_web_prekeys WHERE account_id = $1 AND id = $2")
                .bind(&*self.account)
                .bind(i64::from(id))
                .fetch_optional(&self.db)
                .await
                .map_err(db_err)?;
        Ok(row.map(|r| Bytes::from(r.0)))
    }

    async fn load_prekeys_batch(&self, ids: &[u32]) -> Result<Vec<(u32, Bytes)>> {
        let wanted: Vec<i64> = ids.iter().map(|i| i64::from(*i)).collect();
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT id, record FROM wa_web_prekeys WHERE account_id = $1 AND id = ANY($2) ORDER BY id",
        )
        .bind(&*self.account)
        .bind(wanted)
        .fetch_all(&self.db)
        .await
        .map_err(db_err)?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, r)| u32::try_from(id).ok().map(|id| (id, Bytes::from(r))))
            .collect())
    }

    async fn mark_prekeys_uploaded(&self, ids: &[u32]) -> Result<()> {
        let ids: Vec<i64> = ids.iter().map(|i| i64::from(*i)).collect();
        // UPDATE, never upsert: a key consumed meanwhile stays deleted.
        self.write(
            sqlx::query(
                "UPDATE wa_web_prekeys SET uploaded = true WHERE account_id = $1 AND id = ANY($2)",
            )
            .bind(&*self.account)
            .bind(ids),
        )
        .await
    }

    async fn remove_prekey(&self, id: u32) -> Result<()> {
        self.write(
            sqlx::query("DELETE FROM wa_web_prekeys WHERE account_id = $1 AND id = $2")
                .bind(&*self.account)
                .bind(i64::from(id)),
        )
        .await
    }

    async fn get_max_prekey_id(&self) -> Result<u32> {
        let (max,): (Option<i64>,) =
            sqlx::query_as("SELECT max(id) FROM wa_web_prekeys WHERE account_id = $1")
                .bind(&*self.account)
                .fetch_one(&self.db)
                .await
                .map_err(db_err)?;
        Ok(max.and_then(|m| u32::try_from(m).ok()).unwrap_or(0))
    }

    async fn store_signed_prekey(&self, id: u32, record: &[u8]) -> Result<()> {
        self.put_record(kind::SIGNED_PREKEY, &id.to_string(), record)
            .await
    }

    async fn load_signed_prekey(&self, id: u32) -> Result<Option<Vec<u8>>> {
        self.get_record(kind::SIGNED_PREKEY, &id.to_string()).await
    }

    async fn load_all_signed_prekeys(&self) -> Result<Vec<(u32, Vec<u8>)>> {
        let mut all: Vec<(u32, Vec<u8>)> = self
            .record_keys(kind::SIGNED_PREKEY)
            .await?
            .into_iter()
            .filter_map(|(k, v)| k.parse().ok().map(|id| (id, v)))
            .collect();
        all.sort_by_key(|(id, _)| *id);
        Ok(all)
    }

    async fn remove_signed_prekey(&self, id: u32) -> Result<()> {
        self.delete_record(kind::SIGNED_PREKEY, &id.to_string())
            .await
    }

    async fn put_sender_key(&self, address: &str, record: &[u8]) -> Result<()> {
        self.put_record(kind::SENDER_KEY, address, record).await
    }

    async fn put_sender_keys_batch(&self, sender_keys: &[(Arc<str>, Bytes)]) -> Result<()> {
        let rows: Vec<(&str, &[u8])> = sender_keys.iter().map(|(a, r)| (&**a, &r[..])).collect();
        self.put_records(kind::SENDER_KEY, &rows).await
    }

    async fn get_sender_key(&self, address: &str) -> Result<Option<Vec<u8>>> {
        self.get_record(kind::SENDER_KEY, address).await
    }

    async fn delete_sender_key(&self, address: &str) -> Result<()> {
        self.delete_record(kind::SENDER_KEY, address).await
    }
}
#[async_trait]
impl AppSyncStore for PgStore {
    async fn get_sync_key(&self, key_id: &[u8]) -> Result<Option<AppStateSyncKey>> {
        match self.get_record(kind::SYNC_KEY, &hex_key(key_id)).await? {
            Some(v) => de(&v).map(Some),
            None => Ok(None),
        }
    }

    async fn set_sync_key(&self, key_id: &[u8], key: AppStateSyncKey) -> Result<()> {
        let value = ser(&key)?;
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO wa_web_records (account_id, kind, key, value)
             VALUES ($1, $2, $3, $4), ($1, $5, '', $6)
             ON CONFLICT (account_id, kind, key) DO UPDATE SET value = EXCLUDED.value",
        )
        .bind(&*self.account)
        .bind(kind::SYNC_KEY)
        .bind(hex_key(key_id))
        .bind(value)
        .bind(kind::LATEST_SYNC_KEY)
        .bind(key_id)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        Self::commit(tx).await
    }

    async fn get_version(&self, name: &str) -> Result<HashState> {
        match self.get_record(kind::APP_STATE_VERSION, name).await? {
            Some(v) => de(&v),
            None => Ok(HashState::default()),
        }
    }

    async fn set_version(&self, name: &str, state: HashState) -> Result<()> {
        self.put_record(kind::APP_STATE_VERSION, name, &ser(&state)?)
            .await
    }

    async fn put_mutation_macs(
        &self,
        name: &str,
        version: u64,
        mutations: &[AppStateMutationMAC],
    ) -> Result<()> {
        if mutations.is_empty() {
            return Ok(());
        }
        let index: Vec<&[u8]> = mutations.iter().map(|m| &m.index_mac[..]).collect();
        let value: Vec<&[u8]> = mutations.iter().map(|m| &m.value_mac[..]).collect();
        self.write(
            sqlx::query(
                "INSERT INTO wa_web_mutation_macs (account_id, collection, index_mac, version, value_mac)
                 SELECT $1, $2, i, $3, v FROM unnest($4::bytea[], $5::bytea[]) AS t(i, v)
                 ON CONFLICT (account_id, collection, index_mac)
                 DO UPDATE SET version = EXCLUDED.version, value_mac = EXCLUDED.value_mac",
            )
            .bind(&*self.account)
            .bind(name)
            .bind(i64::try_from(version).unwrap_or(i64::MAX))
            .bind(index)
            .bind(value),
        )
        .await
    }

    async fn get_mutation_mac(&self, name: &str, index_mac: &[u8]) -> Result<Option<Vec<u8>>> {
        let row: Option<(Vec<u8>,)> = sqlx::query_as(
            "SELECT value_mac FROM wa_web_mutation_macs
             WHERE account_id = $1 AND collection = $2 AND index_mac = $3",
        )
        .bind(&*self.account)
        .bind(name)
        .bind(index_mac)
        .fetch_optional(&self.db)
        .await
        .map_err(db_err)?;
        Ok(row.map(|r| r.0))
    }

    async fn get_mutation_macs(
        &self,
        name: &str,
        index_macs: &[[u8; 32]],
    ) -> Result<HashMap<[u8; 32], Vec<u8>>> {
        let wanted: Vec<&[u8]> = index_macs.iter().map(|m| m.as_slice()).collect();
        let rows: Vec<(Vec<u8>, Vec<u8>)> = sqlx::query_as(
            "SELECT index_mac, value_mac FROM wa_web_mutation_macs
             WHERE account_id = $1 AND collection = $2 AND index_mac = ANY($3)",
        )
        .bind(&*self.account)
        .bind(name)
        .bind(wanted)
        .fetch_all(&self.db)
        .await
        .map_err(db_err)?;
        Ok(rows
            .into_iter()
            .filter_map(|(i, v)| <[u8; 32]>::try_from(i).ok().map(|i| (i, v)))
            .collect())
    }

    async fn delete_mutation_macs(&self, name: &str, index_macs: &[Vec<u8>]) -> Result<()> {
        let gone: Vec<&[u8]> = index_macs.iter().map(|m| &m[..]).collect();
        self.write(
            sqlx::query(
                "DELETE FROM wa_web_mutation_macs
                 WHERE account_id = $1 AND collection = $2 AND index_mac = ANY($3)",
            )
            .bind(&*self.account)
            .bind(name)
            .bind(gone),
        )
        .await
    }

    async fn clear_mutation_macs(&self, name: &str) -> Result<()> {
        self.write(
            sqlx::query(
                "DELETE FROM wa_web_mutation_macs WHERE account_id = $1 AND collection = $2",
            )
            .bind(&*self.account)
            .bind(name),
        )
        .await
    }

    async fn get_latest_sync_key_id(&self) -> Result<Option<Vec<u8>>> {
        self.get_record(kind::LATEST_SYNC_KEY, "").await
    }
}

type LidRow = (String, String, i64, i64, String);

fn lid_entry(
    (lid, phone_number, created_at, updated_at, learning_source): LidRow,
) -> LidPnMappingEntry {
    LidPnMappingEntry {
        lid,
        phone_number,
        created_at,
        updated_at,
        learning_source,
    }
}

type TcRow = (Vec<u8>, i64, Option<i64>);

fn tc_entry((token, token_timestamp, sender_timestamp): TcRow) -> TcTokenEntry {
    TcTokenEntry {
        token,
        token_timestamp,
        sender_timestamp,
    }
}

#[async_trait]
impl ProtocolStore for PgStore {
    async fn get_sender_key_devices(&self, group_jid: &str) -> Result<Vec<(String, bool)>> {
        sqlx::query_as(
            "SELECT device_jid, has_key FROM wa_web_sender_key_devices
             WHERE account_id = $1 AND group_jid = $2 ORDER BY device_jid",
        )
        .bind(&*self.account)
        .bind(group_jid)
        .fetch_all(&self.db)
        .await
        .map_err(db_err)
    }

    async fn set_sender_key_status(&self, group_jid: &str, entries: &[(&str, bool)]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let devices: Vec<&str> = entries.iter().map(|e| e.0).collect();
        let has: Vec<bool> = entries.iter().map(|e| e.1).collect();
        self.write(
            sqlx::query(
                "INSERT INTO wa_web_sender_key_devices (account_id, group_jid, device_jid, has_key)
                 SELECT $1, $2, d, h FROM unnest($3::text[], $4::bool[]) AS t(d, h)
                 ON CONFLICT (account_id, group_jid, device_jid) DO UPDATE SET has_key = EXCLUDED.has_key",
            )
            .bind(&*self.account)
            .bind(group_jid)
            .bind(devices)
            .bind(has),
        )
        .await
    }

    async fn clear_sender_key_devices(&self, group_jid: &str) -> Result<()> {
        self.write(
            sqlx::query(
                "DELETE FROM wa_web_sender_key_devices WHERE account_id = $1 AND group_jid = $2",
            )
            .bind(&*self.account)
            .bind(group_jid),
        )
        .await
    }

    async fn delete_sender_key_device_rows(&self, device_jids: &[&str]) -> Result<()> {
        let devices: Vec<&str> = device_jids.to_vec();
        self.write(
            sqlx::query(
                "DELETE FROM wa_web_sender_key_devices WHERE account_id = $1 AND device_jid = ANY($2)",
            )
            .bind(&*self.account)
            .bind(devices),
        )
        .await
    }

    async fn clear_all_sender_key_devices(&self) -> Result<()> {
        self.write(
            sqlx::query("DELETE FROM wa_web_sender_key_devices WHERE account_id = $1")
                .bind(&*self.account),
        )
        .await
    }

    async fn get_lid_mapping(&self, lid: &str) -> Result<Option<LidPnMappingEntry>> {
        let row: Option<LidRow> = sqlx::query_as(
            "SELECT lid, phone_number, created_at, updated_at, learning_source
             FROM wa_web_lid_mappings WHERE account_id = $1 AND lid = $2",
        )
        .bind(&*self.account)
        .bind(lid)
        .fetch_optional(&self.db)
        .await
        .map_err(db_err)?;
        Ok(row.map(lid_entry))
    }

    async fn get_pn_mapping(&self, phone: &str) -> Result<Option<LidPnMappingEntry>> {
        let row: Option<LidRow> = sqlx::query_as(
            "SELECT lid, phone_number, created_at, updated_at, learning_source
             FROM wa_web_lid_mappings WHERE account_id = $1 AND phone_number = $2
             ORDER BY updated_at DESC, lid LIMIT 1",
        )
        .bind(&*self.account)
        .bind(phone)
        .fetch_optional(&self.db)
        .await
        .map_err(db_err)?;
        Ok(row.map(lid_entry))
    }

    async fn put_lid_mapping(&self, entry: &LidPnMappingEntry) -> Result<()> {
        self.put_lid_mappings(std::slice::from_ref(entry)).await
    }

    async fn put_lid_mappings(&self, entries: &[LidPnMappingEntry]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let lids: Vec<&str> = entries.iter().map(|e| e.lid.as_str()).collect();
        let phones: Vec<&str> = entries.iter().map(|e| e.phone_number.as_str()).collect();
        let created: Vec<i64> = entries.iter().map(|e| e.created_at).collect();
        let updated: Vec<i64> = entries.iter().map(|e| e.updated_at).collect();
        let sources: Vec<&str> = entries.iter().map(|e| e.learning_source.as_str()).collect();
        // A write replaces the entry (as the reference in-memory backend does); within one
        // batch the last entry of a LID wins.
        self.write(
            sqlx::query(
                "INSERT INTO wa_web_lid_mappings (account_id, lid, phone_number, created_at, updated_at, learning_source)
                 SELECT DISTINCT ON (l) $1, l, p, c, u, s
                 FROM unnest($2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::text[]) WITH ORDINALITY AS t(l, p, c, u, s, n)
                 ORDER BY l, n DESC
                 ON CONFLICT (account_id, lid) DO UPDATE SET
                     phone_number = EXCLUDED.phone_number,
                     created_at = EXCLUDED.created_at,
                     updated_at = EXCLUDED.updated_at,
                     learning_source = EXCLUDED.learning_source",
            )
            .bind(&*self.account)
            .bind(lids)
            .bind(phones)
            .bind(created)
            .bind(updated)
            .bind(sources),
        )
        .await
    }

    async fn get_all_lid_mappings(&self) -> Result<Vec<LidPnMappingEntry>> {
        let rows: Vec<LidRow> = sqlx::query_as(
            "SELECT lid, phone_number, created_at, updated_at, learning_source
             FROM wa_web_lid_mappings WHERE account_id = $1 ORDER BY lid",
        )
        .bind(&*self.account)
        .fetch_all(&self.db)
        .await
        .map_err(db_err)?;
        Ok(rows.into_iter().map(lid_entry).collect())
    }

    async fn save_base_key(&self, address: &str, message_id: &str, base_key: &[u8]) -> Result<()> {
        self.put_record(
            kind::BASE_KEY,
            &format!("{address}\u{1f}{message_id}"),
            base_key,
        )
        .await
    }

    async fn has_same_base_key(
        &self,
        address: &str,
        message_id: &str,
        current_base_key: &[u8],
    ) -> Result<bool> {
        Ok(self
            .get_record(kind::BASE_KEY, &format!("{address}\u{1f}{message_id}"))
            .await?
            .is_some_and(|stored| stored == current_base_key))
    }

    async fn delete_base_key(&self, address: &str, message_id: &str) -> Result<()> {
        self.delete_record(kind::BASE_KEY, &format!("{address}\u{1f}{message_id}"))
            .await
    }

    async fn update_device_list(&self, record: DeviceListRecord) -> Result<()> {
        self.update_device_lists(vec![record]).await
    }

    async fn update_device_lists(&self, records: Vec<DeviceListRecord>) -> Result<()> {
        let encoded: Vec<(String, Vec<u8>)> = records
            .iter()
            .map(|r| ser(r).map(|v| (r.user.clone(), v)))
            .collect::<Result<_>>()?;
        let rows: Vec<(&str, &[u8])> = encoded
            .iter()
            .map(|(u, v)| (u.as_str(), v.as_slice()))
            .collect();
        // Later records for the same user win, as in a loop of single updates.
        let mut last: HashMap<&str, &[u8]> = HashMap::new();
        for (u, v) in rows {
            last.insert(u, v);
        }
        let rows: Vec<(&str, &[u8])> = last.into_iter().collect();
        self.put_records(kind::DEVICE_LIST, &rows).await
    }

    async fn get_devices(&self, user: &str) -> Result<Option<DeviceListRecord>> {
        match self.get_record(kind::DEVICE_LIST, user).await? {
            Some(v) => de(&v).map(Some),
            None => Ok(None),
        }
    }

    async fn delete_devices(&self, user: &str) -> Result<()> {
        self.delete_record(kind::DEVICE_LIST, user).await
    }

    async fn get_group_metadata(&self, group_jid: &str) -> Result<Option<Vec<u8>>> {
        self.get_record(kind::GROUP_METADATA, group_jid).await
    }

    async fn put_group_metadata(&self, group_jid: &str, blob: &[u8]) -> Result<()> {
        self.put_record(kind::GROUP_METADATA, group_jid, blob).await
    }

    async fn delete_group_metadata(&self, group_jid: &str) -> Result<()> {
        self.delete_record(kind::GROUP_METADATA, group_jid).await
    }

    async fn get_tc_token(&self, jid: &str) -> Result<Option<TcTokenEntry>> {
        let row: Option<TcRow> = sqlx::query_as(
            "SELECT token, token_timestamp, sender_timestamp FROM wa_web_tc_tokens
             WHERE account_id = $1 AND jid = $2",
        )
        .bind(&*self.account)
        .bind(jid)
        .fetch_optional(&self.db)
        .await
        .map_err(db_err)?;
        Ok(row.map(tc_entry))
    }

    async fn put_tc_token(&self, jid: &str, entry: &TcTokenEntry) -> Result<()> {
        self.write(
            sqlx::query(
                "INSERT INTO wa_web_tc_tokens (account_id, jid, token, token_timestamp, sender_timestamp)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (account_id, jid) DO UPDATE SET token = EXCLUDED.token,
                     token_timestamp = EXCLUDED.token_timestamp, sender_timestamp = EXCLUDED.sender_timestamp",
            )
            .bind(&*self.account)
            .bind(jid)
            .bind(&entry.token)
            .bind(entry.token_timestamp)
            .bind(entry.sender_timestamp),
        )
        .await
    }

    async fn delete_tc_token(&self, jid: &str) -> Result<()> {
        self.write(
            sqlx::query("DELETE FROM wa_web_tc_tokens WHERE account_id = $1 AND jid = $2")
                .bind(&*self.account)
                .bind(jid),
        )
        .await
    }

    async fn get_all_tc_token_jids(&self) -> Result<Vec<String>> {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT jid FROM wa_web_tc_tokens WHERE account_id = $1 ORDER BY jid")
                .bind(&*self.account)
                .fetch_all(&self.db)
                .await
                .map_err(db_err)?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    async fn delete_expired_tc_tokens(&self, token_cutoff: i64, sender_cutoff: i64) -> Result<u32> {
        let n = self
            .exec_fenced(
                sqlx::query(
                    "DELETE FROM wa_web_tc_tokens WHERE account_id = $1
                     AND (length(token) = 0 OR token_timestamp < $2)
                     AND (sender_timestamp IS NULL OR sender_timestamp < $3)",
                )
                .bind(&*self.account)
                .bind(token_cutoff)
                .bind(sender_cutoff),
            )
            .await?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    async fn touch_tc_token_sender_timestamp(
        &self,
        jid: &str,
        sender_timestamp: i64,
    ) -> Result<()> {
        // One atomic upsert: the sender bucket only moves forward and a real token is kept.
        self.write(
            sqlx::query(
                "INSERT INTO wa_web_tc_tokens (account_id, jid, token, token_timestamp, sender_timestamp)
                 VALUES ($1, $2, ''::bytea, $3, $3)
                 ON CONFLICT (account_id, jid) DO UPDATE SET sender_timestamp =
                     greatest(coalesce(wa_web_tc_tokens.sender_timestamp, EXCLUDED.sender_timestamp), EXCLUDED.sender_timestamp)",
            )
            .bind(&*self.account)
            .bind(jid)
            .bind(sender_timestamp),
        )
        .await
    }

    async fn store_received_tc_token(
        &self,
        jid: &str,
        token: &[u8],
        token_timestamp: i64,
    ) -> Result<()> {
        // Newer wins, a placeholder never blocks a real token, the sender bucket is kept.
        self.write(
            sqlx::query(
                "INSERT INTO wa_web_tc_tokens (account_id, jid, token, token_timestamp, sender_timestamp)
                 VALUES ($1, $2, $3, $4, NULL)
                 ON CONFLICT (account_id, jid) DO UPDATE SET
                     token = EXCLUDED.token, token_timestamp = EXCLUDED.token_timestamp
                 WHERE length(wa_web_tc_tokens.token) = 0
                    OR EXCLUDED.token_timestamp >= wa_web_tc_tokens.token_timestamp",
            )
            .bind(&*self.account)
            .bind(jid)
            .bind(token)
            .bind(token_timestamp),
        )
        .await
    }

    async fn store_sent_message(
        &self,
        chat_jid: &str,
        message_id: &str,
        payload: &[u8],
    ) -> Result<()> {
        self.write(
            sqlx::query(
                "INSERT INTO wa_web_sent_messages (account_id, chat, message_id, payload, created_at)
                 VALUES ($1, $2, $3, $4, extract(epoch FROM now())::bigint)
                 ON CONFLICT (account_id, chat, message_id) DO UPDATE SET payload = EXCLUDED.payload",
            )
            .bind(&*self.account)
            .bind(chat_jid)
            .bind(message_id)
            .bind(payload),
        )
        .await
    }

    async fn take_sent_message(&self, chat_jid: &str, message_id: &str) -> Result<Option<Vec<u8>>> {
        let mut tx = self.begin().await?;
        let row: Option<(Vec<u8>,)> = sqlx::query_as(
            "DELETE FROM wa_web_sent_messages WHERE account_id = $1 AND chat = $2 AND message_id = $3
             RETURNING payload",
        )
        .bind(&*self.account)
        .bind(chat_jid)
        .bind(message_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err)?;
        Self::commit(tx).await?;
        Ok(row.map(|r| r.0))
    }

    async fn delete_expired_sent_messages(&self, cutoff_timestamp: i64) -> Result<u32> {
        let n = self
            .exec_fenced(
                sqlx::query(
                    "DELETE FROM wa_web_sent_messages WHERE account_id = $1 AND created_at < $2",
                )
                .bind(&*self.account)
                .bind(cutoff_timestamp),
            )
            .await?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    async fn store_pending_inbound(
        &self,
        chat: &str,
        sender: &str,
        id: &str,
        message: &[u8],
    ) -> Result<()> {
        self.store_pending_inbound_batch(&[PendingInboundRow {
            chat,
            sender,
            id,
            message,
        }])
        .await
    }

    async fn store_pending_inbound_batch(&self, rows: &[PendingInboundRow<'_>]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let chats: Vec<&str> = rows.iter().map(|r| r.chat).collect();
        let senders: Vec<&str> = rows.iter().map(|r| r.sender).collect();
        let ids: Vec<&str> = rows.iter().map(|r| r.id).collect();
        let messages: Vec<&[u8]> = rows.iter().map(|r| r.message).collect();
        self.write(
            sqlx::query(
                "INSERT INTO wa_web_pending_inbound (account_id, chat, sender, id, message, created_at)
                 SELECT $1, c, s, i, m, extract(epoch FROM now())::bigint
                 FROM unnest($2::text[], $3::text[], $4::text[], $5::bytea[]) AS t(c, s, i, m)
                 ON CONFLICT (account_id, chat, sender, id) DO UPDATE SET message = EXCLUDED.message",
            )
            .bind(&*self.account)
            .bind(chats)
            .bind(senders)
            .bind(ids)
            .bind(messages),
        )
        .await
    }

    async fn get_pending_inbound(
        &self,
        chat: &str,
        sender: &str,
        id: &str,
    ) -> Result<Option<Vec<u8>>> {
        let row: Option<(Vec<u8>,)> = sqlx::query_as(
            "SELECT message FROM wa_web_pending_inbound
             WHERE account_id = $1 AND chat = $2 AND sender = $3 AND id = $4",
        )
        .bind(&*self.account)
        .bind(chat)
        .bind(sender)
        .bind(id)
        .fetch_optional(&self.db)
        .await
        .map_err(db_err)?;
        Ok(row.map(|r| r.0))
    }

    async fn delete_pending_inbound(&self, chat: &str, sender: &str, id: &str) -> Result<()> {
        self.delete_pending_inbound_batch(&[PendingInboundKey { chat, sender, id }])
            .await
    }

    async fn delete_pending_inbound_batch(&self, keys: &[PendingInboundKey<'_>]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let chats: Vec<&str> = keys.iter().map(|r| r.chat).collect();
        let senders: Vec<&str> = keys.iter().map(|r| r.sender).collect();
        let ids: Vec<&str> = keys.iter().map(|r| r.id).collect();
        self.write(
            sqlx::query(
                "DELETE FROM wa_web_pending_inbound p
                 USING unnest($2::text[], $3::text[], $4::text[]) AS t(c, s, i)
                 WHERE p.account_id = $1 AND p.chat = t.c AND p.sender = t.s AND p.id = t.i",
            )
            .bind(&*self.account)
            .bind(chats)
            .bind(senders)
            .bind(ids),
        )
        .await
    }

    async fn delete_expired_pending_inbound(&self, cutoff_timestamp: i64) -> Result<u32> {
        let n = self
            .exec_fenced(
                sqlx::query(
                    "DELETE FROM wa_web_pending_inbound WHERE account_id = $1 AND created_at < $2",
                )
                .bind(&*self.account)
                .bind(cutoff_timestamp),
            )
            .await?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }
}

#[async_trait]
impl MsgSecretStore for PgStore {
    async fn put_msg_secrets(&self, entries: Vec<MsgSecretEntry>) -> Result<usize> {
        if entries.is_empty() {
            return Ok(0);
        }
        // Merge duplicates within the batch the same way a conflict with a stored row merges.
        let mut merged: HashMap<(Arc<str>, Arc<str>, Arc<str>), MsgSecretEntry> = HashMap::new();
        for e in entries {
            let key = (e.chat.clone(), e.sender.clone(), e.msg_id.clone());
            match merged.get_mut(&key) {
                Some(prev) => {
                    prev.expires_at = merge_msg_secret_expiry(prev.expires_at, e.expires_at);
                    prev.message_ts = merge_msg_secret_message_ts(prev.message_ts, e.message_ts);
                    prev.secret = e.secret;
                }
                None => {
                    merged.insert(key, e);
                }
            }
        }
        let rows: Vec<MsgSecretEntry> = merged.into_values().collect();
        let chats: Vec<&str> = rows.iter().map(|e| &*e.chat).collect();
        let senders: Vec<&str> = rows.iter().map(|e| &*e.sender).collect();
        let ids: Vec<&str> = rows.iter().map(|e| &*e.msg_id).collect();
        let secrets: Vec<&[u8]> = rows.iter().map(|e| e.secret.as_slice()).collect();
        let expires: Vec<i64> = rows.iter().map(|e| e.expires_at).collect();
        let ts: Vec<i64> = rows.iter().map(|e| e.message_ts).collect();
        // 0 = never expires and wins; otherwise the later deadline and the later parent time win.
        self.exec_fenced(
            sqlx::query(
                "INSERT INTO wa_web_msg_secrets (account_id, chat, sender, msg_id, secret, expires_at, message_ts)
                 SELECT $1, c, s, i, k, e, m
                 FROM unnest($2::text[], $3::text[], $4::text[], $5::bytea[], $6::bigint[], $7::bigint[]) AS t(c, s, i, k, e, m)
                 ON CONFLICT (account_id, chat, sender, msg_id) DO UPDATE SET
                     secret = EXCLUDED.secret,
                     expires_at = CASE WHEN wa_web_msg_secrets.expires_at = 0 OR EXCLUDED.expires_at = 0 THEN 0
                                       ELSE greatest(wa_web_msg_secrets.expires_at, EXCLUDED.expires_at) END,
                     message_ts = greatest(wa_web_msg_secrets.message_ts, EXCLUDED.message_ts)",
            )
            .bind(&*self.account)
            .bind(chats)
            .bind(senders)
            .bind(ids)
            .bind(secrets)
            .bind(expires)
            .bind(ts),
        )
        .await?;
        Ok(rows.len())
    }

    async fn get_msg_secret(
        &self,
        chat: &str,
        sender: &str,
        msg_id: &str,
    ) -> Result<Option<Vec<u8>>> {
        Ok(self
            .get_msg_secret_with_ts(chat, sender, msg_id)
            .await?
            .map(|(s, _)| s))
    }

    async fn get_msg_secret_with_ts(
        &self,
        chat: &str,
        sender: &str,
        msg_id: &str,
    ) -> Result<Option<(Vec<u8>, i64)>> {
        sqlx::query_as(
            "SELECT secret, message_ts FROM wa_web_msg_secrets
             WHERE account_id = $1 AND chat = $2 AND sender = $3 AND msg_id = $4",
        )
        .bind(&*self.account)
        .bind(chat)
        .bind(sender)
        .bind(msg_id)
        .fetch_optional(&self.db)
        .await
        .map_err(db_err)
    }

    async fn delete_expired_msg_secrets(&self, cutoff_timestamp: i64) -> Result<u32> {
        let n = self
            .exec_fenced(
                sqlx::query(
                    "DELETE FROM wa_web_msg_secrets
                     WHERE account_id = $1 AND expires_at <> 0 AND expires_at <= $2",
                )
                .bind(&*self.account)
                .bind(cutoff_timestamp),
            )
            .await?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }
}

#[async_trait]
impl DeviceStore for PgStore {
    async fn save(&self, device: &Device) -> Result<()> {
        let blob = ser(device)?;
        self.write(
            sqlx::query(
                "INSERT INTO wa_web_devices (account_id, device, updated_at) VALUES ($1, $2, now())
                 ON CONFLICT (account_id) DO UPDATE SET device = EXCLUDED.device, updated_at = now()",
            )
            .bind(&*self.account)
            .bind(blob),
        )
        .await
    }

    async fn load(&self) -> Result<Option<Device>> {
        let row: Option<(Vec<u8>,)> =
            sqlx::query_as("SELECT device FROM wa_web_devices WHERE account_id = $1")
                .bind(&*self.account)
                .fetch_optional(&self.db)
                .await
                .map_err(db_err)?;
        match row {
            Some((b,)) => {
                let mut device: Device = de(&b)?;
                // The library keeps DeviceProps out of the serialised device (runtime-only), so
                // they come back empty; its own stores set the defaults on load. Without them
                // the pairing request carries no OS, version, platform or history-sync settings.
                device.device_props = Arc::new(DEVICE_PROPS.clone());
                Ok(Some(device))
            }
            None => Ok(None),
        }
    }

    async fn exists(&self) -> Result<bool> {
        let (n,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM wa_web_devices WHERE account_id = $1")
                .bind(&*self.account)
                .fetch_one(&self.db)
                .await
                .map_err(db_err)?;
        Ok(n > 0)
    }

    async fn create(&self) -> Result<i32> {
        // One device per account: materialize a fresh identity unless one exists.
        if !self.exists().await? {
            self.save(&Device::new()).await?;
        }
        Ok(1)
    }

    async fn resource_report(&self) -> whatsapp_rust::wacore::stats::StorageResourceReport {
        whatsapp_rust::wacore::stats::StorageResourceReport {
            memory_bytes: Some(0),
            ..Default::default()
        }
    }
}
