//! Ephemeral messages (presence, cursors): one replica's `broadcast` reaches every other
//! session that may read the document, through a real relay on 127.0.0.1, and nothing is
//! stored; a session that may not read the document neither sends nor receives them.
#![cfg(feature = "net")]

use serde_json::json;
use tokio::time::timeout;
use weft::Replica;

use crate::support::relay::{LIMIT, Relay};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_messages_reach_readers_of_the_document_only() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::with_tokens(|_| {}).await;
    let a = Replica::open(dir.path().join("a.db")).unwrap();
    let b = Replica::open(dir.path().join("b.db")).unwrap();
    let c = Replica::open(dir.path().join("c.db")).unwrap();
    let doc = a.create("alpha", json!({"title": "shared"})).unwrap();
    let ca = relay.synced(&a, relay.token("*", "*")).await;
    let cb = relay.synced(&b, relay.token("alpha", "")).await;
    let cc = relay.synced(&c, relay.token("beta", "beta")).await;
    let mut at_b = cb.ephemeral();
    let mut at_c = cc.ephemeral();
    let mut at_a = ca.ephemeral();

    // A reader of alpha gets A's presence; the sender does not hear itself.
    let presence = b"\xa1dnamedalice".to_vec(); // CBOR {"name": "alice"}
    assert_eq!(ca.broadcast(&doc, presence.clone()).unwrap(), 1);
    let got = timeout(LIMIT, at_b.recv()).await.unwrap().unwrap();
    assert_eq!((got.doc, got.data), (doc, presence.clone()));
    assert_eq!(got.sender, a.replica_id().to_string(), "named by the relay");

    // A read-only session may send presence too (it is not a write), and A hears it.
    assert_eq!(b.broadcast(&doc, b"\xa0".to_vec()).unwrap(), 1);
    let got = timeout(LIMIT, at_a.recv()).await.unwrap().unwrap();
    assert_eq!((got.doc, got.data.as_slice()), (doc, &b"\xa0"[..]));

    // The reader of beta only heard nothing of alpha's document; prove the channel works by
    // a message about a beta document it may read.
    let beta_doc = a.create("beta", json!({})).unwrap();
    timeout(LIMIT, ca.wait_synced()).await.unwrap().unwrap();
    timeout(LIMIT, cc.wait_synced()).await.unwrap().unwrap();
    a.broadcast(&beta_doc, b"\x01".to_vec()).unwrap();
    let got = timeout(LIMIT, at_c.recv()).await.unwrap().unwrap();
    assert_eq!(
        got.doc, beta_doc,
        "C got a message about a document it cannot read"
    );

    // Nothing was stored: no change-feed entries beyond the two creates.
    assert_eq!(a.last_seq(), 2);
    // Over the size limit: refused before anything is sent.
    let err = a.broadcast(&doc, vec![0; 70_000]).unwrap_err();
    assert!(matches!(err, weft::Error::TooLarge { .. }), "{err}");
    // An unknown document: nothing to broadcast about.
    let unknown = weft::DocumentId::from_bytes([3; 16]);
    assert!(matches!(
        a.broadcast(&unknown, vec![1]),
        Err(weft::Error::NotFound(_))
    ));
}
