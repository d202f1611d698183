//! TLS endpoints the tests start in front of the local services: a CA generated on the spot,
//! a server certificate for `localhost` issued by it (and a client certificate), and a proxy
//! on a free port of 127.0.0.1 that terminates TLS and passes the bytes on in plain text.

// Each test file that includes this module uses part of it.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// A CA, a server certificate for `localhost` and a client certificate, all issued by it.
pub struct Pki {
    pub ca_pem: String,
    pub ca_der: CertificateDer<'static>,
    pub server: (CertificateDer<'static>, PrivateKeyDer<'static>),
    pub client_pem: String,
    pub client_key_pem: String,
}

pub fn pki() -> Pki {
    let ca_key = KeyPair::generate().expect("a CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // A name of its own: a certificate of another CA is then of an unknown issuer.
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    ca.distinguished_name
        .push(DnType::CommonName, format!("Hopper test CA {n}"));
    let ca_cert = ca.self_signed(&ca_key).expect("the CA certificate");
    let issue = |names: Vec<String>| {
        let key = KeyPair::generate().expect("a key");
        let cert = CertificateParams::new(names)
            .expect("params")
            .signed_by(&key, &ca_cert, &ca_key)
            .expect("a certificate");
        (cert, key)
    };
    let (server, server_key) = issue(vec!["localhost".to_string()]);
    let (client, client_key) = issue(vec!["hopper-client".to_string()]);
    Pki {
        ca_pem: ca_cert.pem(),
        ca_der: ca_cert.der().clone(),
        server: (
            server.der().clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        ),
        client_pem: client.pem(),
        client_key_pem: client_key.serialize_pem(),
    }
}

/// The server side of TLS with `pki`'s certificate; with `client_auth`, it wants a client
/// certificate of `pki`'s CA.
fn acceptor(pki: &Pki, client_auth: bool) -> TlsAcceptor {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("TLS versions");
    let builder = if client_auth {
        let mut roots = RootCertStore::empty();
        roots.add(pki.ca_der.clone()).expect("the CA as a root");
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .expect("a client verifier");
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let config = builder
        .with_single_cert(vec![pki.server.0.clone()], pki.server.1.clone_key())
        .expect("the server certificate");
    TlsAcceptor::from(Arc::new(config))
}

/// Starts a TLS endpoint in front of the local RabbitMQ (127.0.0.1:5672); returns its port.
pub async fn amqp_endpoint(pki: &Pki, client_auth: bool) -> u16 {
    let acceptor = acceptor(pki, client_auth);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let port = listener.local_addr().expect("its address").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A client that refuses the certificate ends here: nothing reaches the broker.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut broker) = TcpStream::connect("127.0.0.1:5672").await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
            });
        }
    });
    port
}

/// What a PostgreSQL endpoint does with a client's SSLRequest.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum PgTls {
    /// Answers `S` and terminates TLS.
    Offer,
    /// Answers `N` (no TLS here) and passes plain text on.
    Refuse,
}

/// Starts an endpoint in front of the PostgreSQL at `upstream` (host:port) that speaks the
/// protocol's TLS opening: it reads the client's SSLRequest, answers it as `tls` says, then
/// terminates TLS (or not) and passes the bytes on in plain text. Returns its port and the
/// number of TLS sessions it has completed (a handshake the client refused does not count).
pub async fn pg_endpoint(
    pki: &Pki,
    tls: PgTls,
    client_auth: bool,
    upstream: String,
) -> (u16, Arc<AtomicUsize>) {
    let acceptor = acceptor(pki, client_auth);
    let sessions = Arc::new(AtomicUsize::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let port = listener.local_addr().expect("its address").port();
    let counted = sessions.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let (acceptor, counted, upstream) =
                (acceptor.clone(), counted.clone(), upstream.clone());
            tokio::spawn(async move {
                // SSLRequest: length 8, code 80877103.
                let mut request = [0u8; 8];
                if tcp.read_exact(&mut request).await.is_err()
                    || request != [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]
                {
                    return;
                }
                let Ok(mut db) = TcpStream::connect(&upstream).await else {
                    return;
                };
                if tls == PgTls::Refuse {
                    if tcp.write_all(b"N").await.is_ok() {
                        let _ = tokio::io::copy_bidirectional(&mut tcp, &mut db).await;
                    }
                    return;
                }
                if tcp.write_all(b"S").await.is_err() {
                    return;
                }
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut db).await;
            });
        }
    });
    (port, sessions)
}
