//! The WhatsApp Web session store on real Postgres: every trait method round-trips, a deposed
//! holder cannot write, concurrent writers lose nothing, and what was acknowledged survives the
//! process that wrote it.

use std::sync::Arc;

use queue::testing::TestDb;
use whatsapp_rust::bytes::Bytes;
use whatsapp_rust::wacore::appstate::hash::HashState;
use whatsapp_rust::wacore::appstate::processor::AppStateMutationMAC;
use whatsapp_rust::wacore::store::Device;
use whatsapp_rust::wacore::store::traits::{
    AppStateSyncKey, AppSyncStore, DeviceInfo, DeviceListRecord, DeviceStore, LidPnMappingEntry,
    MsgSecretEntry, MsgSecretStore, PendingInboundKey, PendingInboundRow, ProtocolStore,
    SignalStore, TcTokenEntry,
};
use worker::web::store::PgStore;

const ACCOUNT: &str = "default/web-line";

/// A database with the account row and a store holding epoch 1.
async fn setup() -> (TestDb, PgStore) {
    let db = TestDb::new().await.expect("test database");
    queue::fence::upsert_account(
        &db.pool,
        ACCOUNT,
        "web:+5511987650001",
        "default/support",
        "hi",
        &[],
    )
    .await
    .expect("account");
    let epoch = queue::fence::bump(&db.pool, ACCOUNT, "gw-0")
        .await
        .expect("bump");
    let store = PgStore::new(db.pool.clone(), ACCOUNT, epoch);
    (db, store)
}

#[tokio::test]
async fn signal_state_round_trips() {
    let (db, s) = setup().await;
    let alice = "5511999990000@s.whatsapp.net";
    let alice2 = "5511999990000:2@s.whatsapp.net";

    assert_eq!(s.load_identity(alice).await.expect("load"), None);
    s.put_identity(alice, [7; 32]).await.expect("put identity");
    s.put_identities_batch(&[(Arc::from(alice2), [8; 32])])
        .await
        .expect("batch");
    assert_eq!(s.load_identity(alice).await.expect("load"), Some([7; 32]));
    assert_eq!(s.load_identity(alice2).await.expect("load"), Some([8; 32]));
    s.put_identity(alice, [9; 32]).await.expect("overwrite");
    assert_eq!(s.load_identity(alice).await.expect("load"), Some([9; 32]));
    s.delete_identity(alice).await.expect("delete");
    assert_eq!(s.load_identity(alice).await.expect("load"), None);

    assert!(!s.has_session(alice).await.expect("has"));
    s.put_session(alice, b"session-1")
        .await
        .expect("put session");
    s.put_sessions_batch(&[(Arc::from(alice2), Bytes::from_static(b"session-2"))])
        .await
        .expect("batch");
    assert_eq!(
        s.get_session(alice).await.expect("get").as_deref(),
        Some(&b"session-1"[..])
    );
    assert!(s.has_session(alice2).await.expect("has"));
    assert!(
        s.has_signal_state_for_user("5511999990000")
            .await
            .expect("user")
    );
    // A user this one is a prefix of is someone else.
    assert!(
        !s.has_signal_state_for_user("551199999")
            .await
            .expect("prefix")
    );
    s.delete_session(alice).await.expect("delete");
    assert_eq!(s.get_session(alice).await.expect("get"), None);

    assert_eq!(s.get_max_prekey_id().await.expect("max"), 0);
    s.store_prekey(5, b"pk5", false).await.expect("prekey");
    s.store_prekeys_batch(
        &[
            (6, Bytes::from_static(b"pk6")),
            (9, Bytes::from_static(b"pk9")),
        ],
        false,
    )
    .await
    .expect("batch");
    assert_eq!(s.get_max_prekey_id().await.expect("max"), 9);
    assert_eq!(
        s.load_prekey(6).await.expect("load").as_deref(),
        Some(&b"pk6"[..])
    );
    let batch = s.load_prekeys_batch(&[5, 7, 9]).await.expect("batch load");
    assert_eq!(
        batch.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        vec![5, 9]
    );
    s.remove_prekey(5).await.expect("remove");
    // Marking a consumed key uploaded must not bring it back.
    s.mark_prekeys_uploaded(&[5, 6]).await.expect("mark");
    assert_eq!(s.load_prekey(5).await.expect("load"), None);
    let (uploaded,): (bool,) =
        sqlx::query_as("SELECT uploaded FROM wa_web_prekeys WHERE account_id = $1 AND id = 6")
            .bind(ACCOUNT)
            .fetch_one(&db.pool)
            .await
            .expect("row");
    assert!(uploaded);

    s.store_signed_prekey(2, b"spk2").await.expect("spk");
    s.store_signed_prekey(1, b"spk1").await.expect("spk");
    assert_eq!(
        s.load_signed_prekey(2).await.expect("load"),
        Some(b"spk2".to_vec())
    );
    assert_eq!(
        s.load_all_signed_prekeys().await.expect("all"),
        vec![(1, b"spk1".to_vec()), (2, b"spk2".to_vec())]
    );
    s.remove_signed_prekey(1).await.expect("remove");
    assert_eq!(s.load_signed_prekey(1).await.expect("load"), None);

    let group_sender = "120363021033254949@g.us::5511999990000:2@s.whatsapp.net";
    s.put_sender_key(group_sender, b"sk")
        .await
        .expect("sender key");
    s.put_sender_keys_batch(&[(Arc::from("g2::x"), Bytes::from_static(b"sk2"))])
        .await
        .expect("batch");
    assert_eq!(
        s.get_sender_key(group_sender).await.expect("get"),
        Some(b"sk".to_vec())
    );
    assert_eq!(
        s.get_sender_key("g2::x").await.expect("get"),
        Some(b"sk2".to_vec())
    );
    s.delete_sender_key(group_sender).await.expect("delete");
    assert_eq!(s.get_sender_key(group_sender).await.expect("get"), None);
}

#[tokio::test]
async fn app_state_round_trips() {
    let (_db, s) = setup().await;
    assert!(s.get_sync_key(b"k1").await.expect("get").is_none());
    assert_eq!(s.get_latest_sync_key_id().await.expect("latest"), None);
    let key = AppStateSyncKey {
        key_data: vec![1, 2, 3],
        fingerprint: vec![4],
        timestamp: 42,
    };
    s.set_sync_key(b"k1", key.clone()).await.expect("set");
    s.set_sync_key(b"k2", key.clone()).await.expect("set");
    let got = s.get_sync_key(b"k1").await.expect("get").expect("present");
    assert_eq!((got.key_data, got.timestamp), (vec![1, 2, 3], 42));
    assert_eq!(
        s.get_latest_sync_key_id().await.expect("latest"),
        Some(b"k2".to_vec())
    );

    assert_eq!(s.get_version("regular").await.expect("default").version, 0);
    let mut state = HashState {
        version: 17,
        ..HashState::default()
    };
    state.hash[0] = 0xAB;
    state.index_value_map.insert("idx".into(), vec![5]);
    s.set_version("regular", state).await.expect("set version");
    let back = s.get_version("regular").await.expect("get version");
    assert_eq!((back.version, back.hash[0]), (17, 0xAB));
    assert_eq!(back.index_value_map.get("idx"), Some(&vec![5]));

    let macs = vec![
        AppStateMutationMAC {
            index_mac: vec![1; 32],
            value_mac: b"v1".to_vec(),
        },
        AppStateMutationMAC {
            index_mac: vec![2; 32],
            value_mac: b"v2".to_vec(),
        },
    ];
    s.put_mutation_macs("regular", 17, &macs)
        .await
        .expect("put macs");
    s.put_mutation_macs("other", 1, &macs[..1])
        .await
        .expect("put macs");
    assert_eq!(
        s.get_mutation_mac("regular", &[1; 32]).await.expect("get"),
        Some(b"v1".to_vec())
    );
    let many = s
        .get_mutation_macs("regular", &[[1; 32], [2; 32], [3; 32]])
        .await
        .expect("batch");
    assert_eq!(many.len(), 2);
    assert_eq!(many.get(&[2; 32]), Some(&b"v2".to_vec()));
    s.delete_mutation_macs("regular", &[vec![1; 32]])
        .await
        .expect("delete");
    assert_eq!(
        s.get_mutation_mac("regular", &[1; 32]).await.expect("get"),
        None
    );
    s.clear_mutation_macs("regular").await.expect("clear");
    assert_eq!(
        s.get_mutation_mac("regular", &[2; 32]).await.expect("get"),
        None
    );
    // Other collections are untouched.
    assert_eq!(
        s.get_mutation_mac("other", &[1; 32]).await.expect("get"),
        Some(b"v1".to_vec())
    );
}

fn mapping(lid: &str, pn: &str, created: i64, updated: i64) -> LidPnMappingEntry {
    LidPnMappingEntry {
        lid: lid.into(),
        phone_number: pn.into(),
        created_at: created,
        updated_at: updated,
        learning_source: "usync".into(),
    }
}

#[tokio::test]
async fn protocol_state_round_trips() {
    let (_db, s) = setup().await;
    let g = "120363021033254949@g.us";
    s.set_sender_key_status(
        g,
        &[("a:1@s.whatsapp.net", true), ("b:2@s.whatsapp.net", false)],
    )
    .await
    .expect("status");
    s.set_sender_key_status("g2@g.us", &[("a:1@s.whatsapp.net", true)])
        .await
        .expect("status");
    assert_eq!(
        s.get_sender_key_devices(g).await.expect("devices"),
        vec![
            ("a:1@s.whatsapp.net".to_string(), true),
            ("b:2@s.whatsapp.net".to_string(), false)
        ]
    );
    s.set_sender_key_status(g, &[("b:2@s.whatsapp.net", true)])
        .await
        .expect("flip");
    assert!(
        s.get_sender_key_devices(g)
            .await
            .expect("devices")
            .iter()
            .all(|d| d.1)
    );
    s.delete_sender_key_device_rows(&["a:1@s.whatsapp.net"])
        .await
        .expect("rows");
    assert_eq!(s.get_sender_key_devices(g).await.expect("devices").len(), 1);
    assert!(
        s.get_sender_key_devices("g2@g.us")
            .await
            .expect("devices")
            .is_empty()
    );
    s.clear_sender_key_devices(g).await.expect("clear");
    assert!(
        s.get_sender_key_devices(g)
            .await
            .expect("devices")
            .is_empty()
    );
    s.set_sender_key_status(g, &[("c@s.whatsapp.net", true)])
        .await
        .expect("status");
    s.clear_all_sender_key_devices().await.expect("clear all");
    assert!(
        s.get_sender_key_devices(g)
            .await
            .expect("devices")
            .is_empty()
    );

    s.put_lid_mapping(&mapping("100000012345678", "5511987650001", 10, 10))
        .await
        .expect("map");
    s.put_lid_mappings(&[
        mapping("100000012345679", "5511987650001", 20, 20),
        mapping("200", "5511000000000", 5, 5),
        mapping("200", "5511000000001", 6, 6),
    ])
    .await
    .expect("maps");
    // Same phone, two LIDs: the most recent one.
    let pn = s
        .get_pn_mapping("5511987650001")
        .await
        .expect("pn")
        .expect("present");
    assert_eq!(pn.lid, "100000012345679");
    // The last write of a LID in a batch wins.
    let l = s
        .get_lid_mapping("200")
        .await
        .expect("lid")
        .expect("present");
    assert_eq!(l.phone_number, "5511000000001");
    // A write replaces the entry, as in the reference backend.
    s.put_lid_mapping(&mapping("200", "5511000000001", 99, 99))
        .await
        .expect("again");
    let l = s
        .get_lid_mapping("200")
        .await
        .expect("lid")
        .expect("present");
    assert_eq!((l.created_at, l.updated_at), (99, 99));
    assert_eq!(s.get_all_lid_mappings().await.expect("all").len(), 3);

    s.save_base_key("addr", "m1", b"base").await.expect("base");
    assert!(
        s.has_same_base_key("addr", "m1", b"base")
            .await
            .expect("same")
    );
    assert!(
        !s.has_same_base_key("addr", "m1", b"other")
            .await
            .expect("diff")
    );
    assert!(
        !s.has_same_base_key("addr", "m2", b"base")
            .await
            .expect("absent")
    );
    s.delete_base_key("addr", "m1").await.expect("delete");
    assert!(
        !s.has_same_base_key("addr", "m1", b"base")
            .await
            .expect("gone")
    );

    let record = |ts| DeviceListRecord {
        user: "5511999990000".into(),
        devices: vec![
            DeviceInfo::new(0, None),
            DeviceInfo::new(2, Some(1)).with_hosting(true),
        ],
        timestamp: ts,
        phash: Some("2:abc".into()),
        raw_id: Some(7),
    };
    s.update_device_list(record(1)).await.expect("devices");
    s.update_device_lists(vec![record(2), record(3)])
        .await
        .expect("devices batch");
    let d = s
        .get_devices("5511999990000")
        .await
        .expect("get")
        .expect("present");
    assert_eq!((d.timestamp, d.devices.len(), d.raw_id), (3, 2, Some(7)));
    assert!(d.devices[1].is_hosted);
    s.delete_devices("5511999990000").await.expect("delete");
    assert!(s.get_devices("5511999990000").await.expect("get").is_none());

    s.put_group_metadata(g, b"meta").await.expect("meta");
    assert_eq!(
        s.get_group_metadata(g).await.expect("meta"),
        Some(b"meta".to_vec())
    );
    s.delete_group_metadata(g).await.expect("delete");
    assert_eq!(s.get_group_metadata(g).await.expect("meta"), None);

    // Trusted-contact tokens: newer wins, placeholders never block, sender bucket only grows.
    let jid = "100000012345678@lid";
    s.touch_tc_token_sender_timestamp(jid, 100)
        .await
        .expect("touch");
    let t = s
        .get_tc_token(jid)
        .await
        .expect("get")
        .expect("placeholder");
    assert!(t.token.is_empty());
    assert_eq!(t.sender_timestamp, Some(100));
    s.store_received_tc_token(jid, b"tok", 50)
        .await
        .expect("first real token");
    s.store_received_tc_token(jid, b"old", 40)
        .await
        .expect("stale token");
    s.touch_tc_token_sender_timestamp(jid, 90)
        .await
        .expect("older touch");
    let t = s.get_tc_token(jid).await.expect("get").expect("token");
    assert_eq!(
        (t.token.as_slice(), t.token_timestamp, t.sender_timestamp),
        (&b"tok"[..], 50, Some(100))
    );
    s.put_tc_token(
        "other@lid",
        &TcTokenEntry {
            token: b"x".to_vec(),
            token_timestamp: 1,
            sender_timestamp: None,
        },
    )
    .await
    .expect("put");
    assert_eq!(
        s.get_all_tc_token_jids().await.expect("jids"),
        vec![jid.to_string(), "other@lid".to_string()]
    );
    // `other` is stale on both sides; `jid` keeps a live sender bucket.
    assert_eq!(s.delete_expired_tc_tokens(60, 95).await.expect("expire"), 1);
    s.delete_tc_token(jid).await.expect("delete");
    assert!(s.get_all_tc_token_jids().await.expect("jids").is_empty());

    s.store_sent_message("chat@s.whatsapp.net", "M1", b"payload")
        .await
        .expect("sent");
    assert_eq!(
        s.take_sent_message("chat@s.whatsapp.net", "M1")
            .await
            .expect("take"),
        Some(b"payload".to_vec())
    );
    // A take consumes: a second retry receipt finds nothing.
    assert_eq!(
        s.take_sent_message("chat@s.whatsapp.net", "M1")
            .await
            .expect("take"),
        None
    );
    s.store_sent_message("chat@s.whatsapp.net", "M2", b"p2")
        .await
        .expect("sent");
    assert_eq!(
        s.delete_expired_sent_messages(i64::MAX)
            .await
            .expect("expire"),
        1
    );

    s.store_pending_inbound("chat", "sender", "id1", b"m1")
        .await
        .expect("pending");
    s.store_pending_inbound_batch(&[
        PendingInboundRow {
            chat: "chat",
            sender: "sender",
            id: "id2",
            message: b"m2",
        },
        PendingInboundRow {
            chat: "chat",
            sender: "other",
            id: "id2",
            message: b"m3",
        },
    ])
    .await
    .expect("pending batch");
    assert_eq!(
        s.get_pending_inbound("chat", "other", "id2")
            .await
            .expect("get"),
        Some(b"m3".to_vec())
    );
    s.delete_pending_inbound("chat", "sender", "id1")
        .await
        .expect("delete");
    s.delete_pending_inbound_batch(&[PendingInboundKey {
        chat: "chat",
        sender: "sender",
        id: "id2",
    }])
    .await
    .expect("delete batch");
    assert_eq!(
        s.get_pending_inbound("chat", "sender", "id2")
            .await
            .expect("get"),
        None
    );
    assert_eq!(
        s.delete_expired_pending_inbound(i64::MAX)
            .await
            .expect("expire"),
        1
    );
}

#[tokio::test]
async fn message_secrets_merge_like_the_reference_backend() {
    let (_db, s) = setup().await;
    let entry = |secret: u8, expires_at, message_ts| MsgSecretEntry {
        chat: Arc::from("c@s.whatsapp.net"),
        sender: Arc::from("s@s.whatsapp.net"),
        msg_id: Arc::from("M1"),
        secret: [secret; 32],
        expires_at,
        message_ts,
    };
    assert_eq!(
        s.put_msg_secrets(vec![entry(1, 100, 10)])
            .await
            .expect("put"),
        1
    );
    // A shorter deadline never shrinks the window; a 0 parent time never clobbers a known one.
    s.put_msg_secrets(vec![entry(2, 50, 0)]).await.expect("put");
    let (secret, ts) = s
        .get_msg_secret_with_ts("c@s.whatsapp.net", "s@s.whatsapp.net", "M1")
        .await
        .expect("get")
        .expect("present");
    assert_eq!((secret[0], ts), (2, 10));
    assert_eq!(s.delete_expired_msg_secrets(99).await.expect("expire"), 0);
    assert_eq!(s.delete_expired_msg_secrets(100).await.expect("expire"), 1);
    // 0 means never.
    s.put_msg_secret("c@s.whatsapp.net", "s@s.whatsapp.net", "M2", &[3; 32])
        .await
        .expect("put");
    assert_eq!(
        s.delete_expired_msg_secrets(i64::MAX)
            .await
            .expect("expire"),
        0
    );
    assert_eq!(
        s.get_msg_secret("c@s.whatsapp.net", "s@s.whatsapp.net", "M2")
            .await
            .expect("get"),
        Some(vec![3; 32])
    );
}

#[tokio::test]
async fn the_device_identity_round_trips() {
    let (_db, s) = setup().await;
    assert!(!s.exists().await.expect("exists"));
    assert!(s.load().await.expect("load").is_none());
    s.create().await.expect("create");
    assert!(s.exists().await.expect("exists"));
    let mut device = s.load().await.expect("load").expect("created");
    let identity = device.identity_key.public_key.public_key_bytes().to_vec();
    // create() keeps an existing identity.
    s.create().await.expect("create again");
    let again = s.load().await.expect("load").expect("device");
    assert_eq!(
        again.identity_key.public_key.public_key_bytes(),
        &identity[..]
    );

    device.push_name = "Acme Sales".into();
    device.registration_id = 4242;
    device.next_pre_key_id = 812;
    s.save(&device).await.expect("save");
    let back: Device = s.load().await.expect("load").expect("device");
    assert_eq!(
        (
            back.push_name.as_str(),
            back.registration_id,
            back.next_pre_key_id
        ),
        ("Acme Sales", 4242, 812)
    );
    assert_eq!(
        back.identity_key.private_key.serialize(),
        device.identity_key.private_key.serialize()
    );
}

#[tokio::test]
async fn a_deposed_holder_cannot_write_session_state() {
    let (db, old) = setup().await;
    old.put_session("peer@s.whatsapp.net", b"before")
        .await
        .expect("holder writes");
    // Another gateway takes the Lease and bumps the fence.
    let epoch = queue::fence::bump(&db.pool, ACCOUNT, "gw-1")
        .await
        .expect("bump");
    let new = PgStore::new(db.pool.clone(), ACCOUNT, epoch);

    let err = old
        .put_session("peer@s.whatsapp.net", b"stale")
        .await
        .expect_err("fenced");
    assert!(format!("{err:?}").contains("Fenced"), "{err:?}");
    assert!(old.store_prekey(1, b"pk", false).await.is_err());
    assert!(old.delete_session("peer@s.whatsapp.net").await.is_err());
    assert!(old.save(&Device::new()).await.is_err());
    assert!(old.take_sent_message("c", "m").await.is_err());
    assert!(
        old.put_msg_secrets(vec![MsgSecretEntry {
            chat: Arc::from("c"),
            sender: Arc::from("s"),
            msg_id: Arc::from("m"),
            secret: [0; 32],
            expires_at: 0,
            message_ts: 0,
        }])
        .await
        .is_err()
    );

    // Nothing the deposed holder tried is visible; reads still work for both.
    assert_eq!(
        new.get_session("peer@s.whatsapp.net")
            .await
            .expect("get")
            .as_deref(),
        Some(&b"before"[..])
    );
    assert_eq!(
        old.get_session("peer@s.whatsapp.net")
            .await
            .expect("get")
            .as_deref(),
        Some(&b"before"[..])
    );
    assert_eq!(new.load_prekey(1).await.expect("load"), None);
    assert!(!new.exists().await.expect("exists"));
    new.put_session("peer@s.whatsapp.net", b"after")
        .await
        .expect("new holder writes");
    assert_eq!(
        new.get_session("peer@s.whatsapp.net")
            .await
            .expect("get")
            .as_deref(),
        Some(&b"after"[..])
    );
}

#[tokio::test]
async fn concurrent_writers_lose_nothing() {
    let (_db, s) = setup().await;
    let mut tasks = Vec::new();
    for w in 0..16u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25u32 {
                let addr = format!("{w}-{i}@s.whatsapp.net");
                s.put_session(&addr, format!("s{w}-{i}").as_bytes())
                    .await
                    .expect("session");
                s.store_prekey(w * 1000 + i, b"pk", false)
                    .await
                    .expect("prekey");
                // Everyone also rewrites one shared row: last writer wins, never an error.
                s.put_identity("shared@s.whatsapp.net", [w as u8; 32])
                    .await
                    .expect("identity");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    for w in 0..16u32 {
        for i in 0..25u32 {
            let addr = format!("{w}-{i}@s.whatsapp.net");
            assert_eq!(
                s.get_session(&addr).await.expect("get").as_deref(),
                Some(format!("s{w}-{i}").as_bytes())
            );
        }
    }
    assert_eq!(
        s.load_prekeys_batch(
            &(0..16)
                .flat_map(|w| (0..25).map(move |i| w * 1000 + i))
                .collect::<Vec<_>>()
        )
        .await
        .expect("all")
        .len(),
        400
    );
    assert!(
        s.load_identity("shared@s.whatsapp.net")
            .await
            .expect("shared")
            .is_some()
    );
}

#[tokio::test]
async fn acknowledged_writes_survive_the_process_that_wrote_them() {
    let (db, s) = setup().await;
    // A "process": its own connection pool. It persists a session whose sender-chain
    // reservation must be durable before any ciphertext leaves, then dies without closing.
    let options: sqlx::postgres::PgConnectOptions = db.url.parse().expect("url");
    let dying = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options.application_name("dying-writer"))
        .await
        .expect("second pool");
    let writer = PgStore::new(dying.clone(), ACCOUNT, s.epoch());
    writer
        .put_session("peer@s.whatsapp.net", b"reserved-through-128")
        .await
        .expect("persist");
    writer
        .store_prekey(77, b"pk77", true)
        .await
        .expect("prekey");
    let pids: Vec<(i32,)> = sqlx::query_as(
        // Only the dying process's connections: the test's own pool goes on.
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'dying-writer'",
    )
    .fetch_all(&db.pool)
    .await
    .expect("pids");
    assert!(!pids.is_empty(), "the writer's connections are open");
    for (pid,) in pids {
        let _ = sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .execute(&db.pool)
            .await;
    }
    drop(writer);
    drop(dying);

    // The replacement takes over (new epoch) and finds exactly what was acknowledged.
    let epoch = queue::fence::bump(&db.pool, ACCOUNT, "gw-1")
        .await
        .expect("bump");
    let next = PgStore::new(db.pool.clone(), ACCOUNT, epoch);
    assert_eq!(
        next.get_session("peer@s.whatsapp.net")
            .await
            .expect("get")
            .as_deref(),
        Some(&b"reserved-through-128"[..])
    );
    assert_eq!(
        next.load_prekey(77).await.expect("load").as_deref(),
        Some(&b"pk77"[..])
    );
}
