//! TLS end to end on 127.0.0.1: a relay serving a self-signed certificate (made with rcgen),
//! clients that trust it through `ca_file`, one that does not, plain `ws://` sent to the TLS
//! port, and the same through the `weft` binary. Every wait is bounded and awaits an event
//! (a status change, a process line), never a sleep.
#![cfg(feature = "net")]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use weft::Replica;
use weft::net::{ConnectOptions, NetError, TlsConfig};

use crate::support::relay::{Relay, RelayProcess, offline, synced};
use crate::support::{ok, weft};

/// A self-signed certificate for `localhost` and 127.0.0.1, as PEM files in `dir`.
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let generated =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

fn trusting(ca: &Path) -> ConnectOptions {
    ConnectOptions {
        ca_file: Some(ca.to_owned()),
        ..ConnectOptions::default()
    }
}

fn sorted<T: Ord>(mut heads: Vec<T>) -> Vec<T> {
    heads.sort();
    heads
}

/// An HTTPS request with a client that trusts `ca`, answered with the status line.
async fn https_get(addr: SocketAddr, ca: &Path, path: &str) -> String {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    tls.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_syncs_between_two_clients_over_wss() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let tls = TlsConfig::from_pem_files(&cert, &key).unwrap();
    let relay = Relay::start_in(&dir.path().join("relay"), |c| c.tls = Some(tls)).await;

    let a = Replica::open(dir.path().join("a.db")).unwrap();
    let b = Replica::open(dir.path().join("b.db")).unwrap();
    let id = a.create("todos", json!({"title": "over TLS"})).unwrap();
    let heads = a.get(&id).unwrap().heads;
    let ca = a.connect(&relay.url(), trusting(&cert));
    synced(&ca).await;
    let cb = b.connect(&relay.url(), trusting(&cert));
    synced(&cb).await;
    let got = b.get(&id).unwrap();
    assert_eq!(got.body, json!({"title": "over TLS"}));
    assert_eq!(sorted(got.heads), sorted(heads));

    // /healthz and /metrics over https on the same port.
    let health = https_get(relay.addr, &cert, "/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200 OK"), "{health}");
    let metrics = https_get(relay.addr, &cert, "/metrics").await;
    assert!(metrics.contains("weft_"), "{metrics}");

    ca.close().await;
    cb.close().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_reported_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let tls = TlsConfig::from_pem_files(&cert, &key).unwrap();
    let relay = Relay::start_in(&dir.path().join("relay"), |c| c.tls = Some(tls)).await;
    let replica = Replica::open(dir.path().join("a.db")).unwrap();

    // Without the CA (retrying, as for any connect error): the status says why.
    let untrusting = replica.connect(&relay.url(), ConnectOptions::default());
    let error = offline(&untrusting).await;
    assert!(
        error.contains("TLS") && error.contains("certificate") && error.contains("UnknownIssuer"),
        "{error}"
    );
    untrusting.close().await;

    // A CA file that cannot be read: the status names it.
    let missing = dir.path().join("no-such-ca.pem");
    let connection = replica.connect(&relay.url(), trusting(&missing));
    let error = offline(&connection).await;
    assert!(error.contains("no-such-ca.pem"), "{error}");
    connection.close().await;

    // A certificate issued for another name, even when trusted.
    let other = tempfile::tempdir().unwrap();
    let generated = rcgen::generate_simple_self_signed(vec!["example.com".into()]).unwrap();
    let (other_cert, other_key) = (other.path().join("c.pem"), other.path().join("k.pem"));
    std::fs::write(&other_cert, generated.cert.pem()).unwrap();
    std::fs::write(&other_key, generated.signing_key.serialize_pem()).unwrap();
    let misnamed_tls = TlsConfig::from_pem_files(&other_cert, &other_key).unwrap();
    let misnamed =
        Relay::start_in(&other.path().join("relay"), |c| c.tls = Some(misnamed_tls)).await;
    let connection = replica.connect(&misnamed.url(), trusting(&other_cert));
    let error = offline(&connection).await;
    assert!(error.contains("certificate"), "{error}");
    connection.close().await;
    misnamed.stop().await;

    // The relay is unaffected: a trusting client syncs.
    let trusted = replica.connect(&relay.url(), trusting(&cert));
    synced(&trusted).await;
    trusted.close().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_ws_on_the_tls_port_fails_and_the_relay_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let tls = TlsConfig::from_pem_files(&cert, &key).unwrap();
    let relay = Relay::start_in(&dir.path().join("relay"), |c| c.tls = Some(tls)).await;
    let a = Replica::open(dir.path().join("a.db")).unwrap();
    let b = Replica::open(dir.path().join("b.db")).unwrap();

    let plain = a.connect(
        &format!("ws://{}", relay.addr),
        ConnectOptions {
            reconnect: false,
            ..ConnectOptions::default()
        },
    );
    let error = offline(&plain).await;
    assert!(error.contains("speaks TLS"), "{error}");
    plain.close().await;

    // Garbage and an abandoned handshake cost only their own connections.
    let mut junk = TcpStream::connect(relay.addr).await.unwrap();
    junk.write_all(b"\x16\x03\x01\x00\x05hello").await.unwrap();
    let half_open = TcpStream::connect(relay.addr).await.unwrap();

    let id = a.create("todos", json!({"n": 1})).unwrap();
    let ca = a.connect(&relay.url(), trusting(&cert));
    synced(&ca).await;
    let cb = b.connect(&relay.url(), trusting(&cert));
    synced(&cb).await;
    assert_eq!(
        sorted(b.get(&id).unwrap().heads),
        sorted(a.get(&id).unwrap().heads)
    );
    drop((junk, half_open));
    ca.close().await;
    cb.close().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_to_a_plain_relay_fails_fast_with_a_tls_error() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_in(&dir.path().join("relay"), |_| {}).await;
    let replica = Replica::open(dir.path().join("a.db")).unwrap();
    let connection = replica.connect(
        &format!("wss://{}", relay.addr),
        ConnectOptions {
            reconnect: false,
            ..ConnectOptions::default()
        },
    );
    // Well within the relay's 10 s request timeout: the relay refuses a TLS hello at once.
    let error = timeout(Duration::from_secs(5), offline(&connection))
        .await
        .expect("the failure took the request timeout");
    assert!(error.contains("TLS"), "{error}");
    connection.close().await;
    relay.stop().await;
}

#[test]
fn tls_config_errors_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let (_, other_key) = {
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        self_signed(&other)
    };
    TlsConfig::from_pem_files(&cert, &key).unwrap();
    // Certificate and key in one file.
    let both = dir.path().join("both.pem");
    let joined = std::fs::read_to_string(&cert).unwrap() + &std::fs::read_to_string(&key).unwrap();
    std::fs::write(&both, joined).unwrap();
    TlsConfig::from_pem_files(&both, &both).unwrap();

    let message = |r: Result<TlsConfig, NetError>| r.unwrap_err().to_string();
    let missing = dir.path().join("missing.pem");
    let e = message(TlsConfig::from_pem_files(&missing, &key));
    assert!(
        e.contains("missing.pem") && e.contains("No such file"),
        "{e}"
    );
    let e = message(TlsConfig::from_pem_files(&key, &key));
    assert!(
        e.contains("key.pem") && e.contains("no PEM certificate"),
        "{e}"
    );
    let e = message(TlsConfig::from_pem_files(&cert, &cert));
    assert!(
        e.contains("cert.pem") && e.contains("no PEM private key"),
        "{e}"
    );
    let e = message(TlsConfig::from_pem_files(&cert, &other_key));
    assert!(e.contains("does not belong to the certificate"), "{e}");
}

#[test]
fn cli_serve_with_a_certificate_and_sync_with_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let ca = cert.to_str().unwrap();
    let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));

    // Both files or neither: a usage error.
    weft(&a, &["serve", "--tls-cert", ca]).usage_error();
    // A bad certificate file fails before serving.
    let out = weft(
        &a,
        &["serve", "--tls-cert", "/nonexistent.pem", "--tls-key", ca],
    )
    .runtime_error();
    assert!(out.stderr.contains("/nonexistent.pem"), "{out:?}");

    let relay = RelayProcess::start(
        &dir.path().join("relay"),
        &[
            "--tls-cert".as_ref(),
            cert.as_os_str(),
            "--tls-key".as_ref(),
            key.as_os_str(),
        ],
    );
    let id = ok(
        &a,
        &["doc", "create", "-c", "todos", "--json", r#"{"tls":true}"#],
    )
    .trim()
    .to_owned();
    ok(
        &a,
        &["sync", "--server", &relay.url, "--once", "--ca-file", ca],
    );
    ok(
        &b,
        &["sync", "--server", &relay.url, "--once", "--ca-file", ca],
    );
    let meta = |db: &Path| -> serde_json::Value {
        serde_json::from_str(&ok(db, &["doc", "get", "--meta", &id])).unwrap()
    };
    let (ma, mb) = (meta(&a), meta(&b));
    assert_eq!(mb["body"], json!({"tls": true}), "{mb}");
    assert_eq!(ma["heads"], mb["heads"]);

    // Without --ca-file: exit 1, and the message says it is the certificate.
    let out = weft(&b, &["sync", "--server", &relay.url, "--once"]).runtime_error();
    assert!(out.stderr.contains("certificate"), "{out:?}");
}
