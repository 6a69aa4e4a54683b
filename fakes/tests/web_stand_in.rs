//! The stand-in between two real clients: its media host carries a file (encrypted by the sender,
//! decrypted by the receiver, never readable on the host), and a group message reaches the other
//! member under the sender key.

use std::time::Duration;

use fakes::whatsapp_web::WebServer;
use fakes::whatsapp_web::contact::{Contact, ContactFile};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_photo_between_two_phones_arrives_byte_for_byte_and_the_host_sees_only_ciphertext() {
    let server = WebServer::start("15550000001").await.expect("stand-in");
    let (ana, ben) = tokio::join!(
        Contact::link(&server, "15550000002"),
        Contact::link(&server, "15550000003")
    );
    let (ana, ben) = (ana.expect("ana"), ben.expect("ben"));
    let photo: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
    ana.send_file(
        "15550000003",
        ContactFile::Image {
            bytes: photo.clone(),
            mime_type: "image/png",
            caption: Some("the broken hinge"),
        },
    )
    .await
    .expect("send");
    let got = ben
        .wait_messages(1, Duration::from_secs(20))
        .await
        .expect("ben gets it");
    assert_eq!(
        (got[0].kind.as_str(), got[0].text.as_str()),
        ("image", "the broken hinge")
    );
    let uploads = server.media().uploads();
    assert_eq!(uploads.len(), 1, "{uploads:?}");
    assert_eq!(uploads[0].kind, "image");
    // AES-CBC padding and a 10-byte MAC: never the plaintext's length.
    assert!(uploads[0].size > photo.len(), "{uploads:?}");

    let bytes = ben.download(&got[0].id).await.expect("download");
    assert_eq!(bytes, photo);
    assert_eq!(server.media().downloads(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_message_reaches_every_other_member_under_the_senders_key() {
    let server = WebServer::start("15550000001").await.expect("stand-in");
    let (ana, ben) = tokio::join!(
        Contact::link(&server, "15550000002"),
        Contact::link(&server, "15550000003")
    );
    let (ana, ben) = (ana.expect("ana"), ben.expect("ben"));
    let group = server.create_group("Hinges", &["15550000002", "15550000003"]);
    for (n, text) in ["first", "second"].into_iter().enumerate() {
        ana.send_group_text(&group, text).await.expect("send");
        let got = ben
            .wait_messages(n + 1, Duration::from_secs(20))
            .await
            .expect("ben reads it");
        assert_eq!(
            (got[n].chat.as_str(), got[n].text.as_str()),
            (group.as_str(), text)
        );
        assert_eq!(got[n].from, ana.jid);
    }
    // Ana's sender key went to ben once, beside the first message (in a `pkmsg`: their first
    // session); the second came under the sender key alone.
    let to_ben: Vec<String> = server
        .relayed()
        .into_iter()
        .filter(|r| r.to == ben.jid)
        .map(|r| r.enc_type)
        .collect();
    assert_eq!(to_ben, ["pkmsg", "skmsg", "skmsg"]);
    ben.send_group_text(&group, "got it").await.expect("reply");
    let got = ana
        .wait_messages(1, Duration::from_secs(20))
        .await
        .expect("ana reads the reply");
    assert_eq!(got[0].text, "got it");
    assert!(ana.undecryptable().is_empty() && ben.undecryptable().is_empty());
}
