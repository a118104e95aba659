//! The TLS listener: a CA and a server certificate generated here, the server started
//! with `[tls]`, and the client library speaking the protocol through rustls: login,
//! a message pushed from a plain-TCP sender to a TLS receiver, the same limits and
//! error answers. A client that does not trust the CA, or names another host, fails
//! the handshake; plain bytes sent to the TLS port do not reach the protocol.

mod common;

use common::pki::Pki;
use common::*;
use mychat_client::proto as pb;
use mychat_client::{Client, ConnectOptions, TlsOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Client options trusting the test CA, naming the server `name` (default: the address).
fn opts(pki: &Pki, name: Option<&str>) -> ConnectOptions {
    ConnectOptions {
        tls: Some(TlsOptions {
            ca_file: Some(pki.path("ca.pem")),
            server_name: name.map(str::to_string),
        }),
        ..ConnectOptions::default()
    }
}

async fn tls_server(pki: &Pki) -> (TestServer, String) {
    let (cert, key) = (pki.path("cert.pem"), pki.path("key.pem"));
    let s = TestServer::start_with(move |c| {
        c.tls.listen = "127.0.0.1:0".into();
        c.tls.cert_file = cert;
        c.tls.key_file = key;
    })
    .await;
    let tls = s.handle.as_ref().unwrap().tls_addr().unwrap().to_string();
    (s, tls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_protocol_runs_over_tls() {
    let pki = Pki::new();
    let (s, tls) = tls_server(&pki).await;
    s.register("alice").await;
    // Registering over TLS works like over TCP.
    let reg = Client::connect_with(&tls, opts(&pki, None)).await.unwrap();
    let bob_id = reg.register("bob", "password-bob").await.unwrap();
    let bob = Client::connect_with(&tls, opts(&pki, Some("localhost")))
        .await
        .unwrap();
    bob.login_password("bob", "password-bob", "b", pb::Platform::Desktop)
        .await
        .unwrap();
    let mut pushes = bob.take_pushes().unwrap();
    // Alice over plain TCP; bob's push travels over TLS, large enough to span records.
    let (alice, _) = s.login("alice", "a", pb::Platform::Desktop).await;
    let big = "z".repeat(16_000);
    for i in 0..20 {
        alice
            .send_text(bob_id, &format!("{i}:{big}"))
            .await
            .unwrap();
    }
    for i in 0..20 {
        let m = next_message(&mut pushes).await.message.unwrap();
        assert_eq!(m.text, format!("{i}:{big}"));
    }
    // Errors are answered the same way.
    let e = bob.send_text(bob_id, "me").await.unwrap_err();
    assert_eq!(code(e), pb::ErrorCode::BadRequest);
    // History over TLS: pages of up to 1 MiB.
    let h = bob
        .history(pb::HistoryRequest {
            peer_user_id: alice.user_id("alice").await.unwrap(),
            limit: 50,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(h.messages.len(), 20);
}

#[tokio::test]
async fn untrusted_or_misnamed_servers_fail_the_handshake() {
    let pki = Pki::new();
    let (s, tls) = tls_server(&pki).await;
    // Another CA: unknown issuer.
    let other = Pki::new();
    assert!(Client::connect_with(&tls, opts(&other, None))
        .await
        .is_err());
    // The right CA but another name.
    assert!(
        Client::connect_with(&tls, opts(&pki, Some("chat.example.com")))
            .await
            .is_err()
    );
    // Plain protocol bytes to the TLS port never reach the protocol: no MyChat frame
    // comes back (rustls answers with an alert, or the connection closes).
    let mut raw = tokio::net::TcpStream::connect(&tls).await.unwrap();
    let hb = mychat_codec::frame_bytes(
        mychat_codec::Header::request(pb::Command::Heartbeat.id(), 1),
        &[],
    );
    raw.write_all(&hb).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), raw.read(&mut buf))
        .await
        .expect("closed within 5 s")
        .unwrap_or(0);
    if n > 0 {
        assert_eq!(
            buf[0],
            0x15,
            "a TLS alert record, not a frame: {:?}",
            &buf[..n]
        );
    }
    // The plain listener keeps serving.
    s.client().await.heartbeat().await.unwrap();
}

#[tokio::test]
async fn a_bad_certificate_path_stops_the_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.tls.listen = "127.0.0.1:0".into();
    cfg.tls.cert_file = dir.path().join("missing.pem");
    cfg.tls.key_file = dir.path().join("missing-key.pem");
    let err = match mychat::start(cfg) {
        Ok(_) => panic!("started without a certificate"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("tls.cert_file"), "{err}");
}
