//! The stand-in's media host carries a file between two real clients: encrypted by the sender,
//! decrypted by the receiver, never readable on the host.

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
