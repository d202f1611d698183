//! How Hopper connects to PostgreSQL: a `postgres://` URL read as libpq reads it, TLS settings
//! included, and a rustls connector that does what its `sslmode` says.
//!
//! tokio-postgres knows `sslmode=disable|prefer|require` and no certificate settings; this
//! module takes `sslmode`, `sslrootcert`, `sslcert` and `sslkey` out of the URL, hands the rest
//! to tokio-postgres, and builds the TLS configuration itself:
//!
//! | `sslmode`          | encrypted                        | the server's certificate             |
//! |--------------------|----------------------------------|--------------------------------------|
//! | `disable`          | no                               | -                                    |
//! | `prefer` (default) | when the server offers TLS       | not checked                          |
//! | `require`          | yes, or no connection            | not checked; with `sslrootcert`, as `verify-ca` (as libpq) |
//! | `verify-ca`        | yes, or no connection            | issued by `sslrootcert` (or a system root) |
//! | `verify-full`      | yes, or no connection            | as `verify-ca`, and for the URL's host |
//!
//! Invariants: a mode that asks for TLS never falls back to plain text (only `prefer` does, as
//! libpq's); a certificate or key file that cannot be read or holds no PEM certificate or key
//! is an error when the URL is read, not when a connection is made; the password is never in
//! a message ([`redact_url`]).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{
    verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, Config};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::describe_place;
use crate::job::redact_url;

/// What `sslmode` asks of a connection (libpq's modes; `allow` is not offered: it only ever
/// encrypts when the server insists, which a Hopper user never wants to choose).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain text.
    Disable,
    /// TLS when the server offers it, the certificate not checked; libpq's default.
    Prefer,
    /// TLS or no connection; the certificate not checked unless `sslrootcert` is given.
    Require,
    /// TLS, with a certificate issued by a trusted root.
    VerifyCa,
    /// TLS, with a certificate issued by a trusted root for the host of the URL.
    VerifyFull,
}

impl TlsMode {
    fn parse(value: &str) -> Result<TlsMode, String> {
        Ok(match value {
            "disable" => TlsMode::Disable,
            "prefer" => TlsMode::Prefer,
            "require" => TlsMode::Require,
            "verify-ca" => TlsMode::VerifyCa,
            "verify-full" => TlsMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode={other:?} is not one of disable, prefer, require, verify-ca, \
                     verify-full"
                ))
            }
        })
    }

    /// True when the server's certificate is checked against roots: the modes whose failure
    /// to connect is worth a hint about `sslrootcert` and the host name.
    pub fn verifies(self) -> bool {
        matches!(self, TlsMode::VerifyCa | TlsMode::VerifyFull)
    }
}

/// A PostgreSQL URL ready to connect: tokio-postgres's config and the TLS connector its
/// `sslmode` asks for.
#[derive(Clone)]
pub struct PgLink {
    config: Config,
    tls: MakeRustlsConnect,
    mode: TlsMode,
    url: String,
}

impl std::fmt::Debug for PgLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgLink")
            .field("url", &redact_url(&self.url))
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// The libpq parameters this module reads itself, with file paths as given.
#[derive(Debug, Default)]
struct TlsParams {
    mode: Option<String>,
    root: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

/// Splits the URL's query into the TLS parameters and the URL tokio-postgres should read.
/// The other parameters keep their bytes as written (tokio-postgres decodes them itself).
fn split(url: &str) -> Result<(String, TlsParams), String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, q),
        None => (url, ""),
    };
    let mut params = TlsParams::default();
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| format!("{k}: not UTF-8 once decoded"))
        };
        let slot = match decode(k)?.as_str() {
            "sslmode" => &mut params.mode,
            "sslrootcert" => &mut params.root,
            "sslcert" => &mut params.cert,
            "sslkey" => &mut params.key,
            _ => {
                kept.push(pair);
                continue;
            }
        };
        *slot = Some(decode(v)?);
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, params))
}

/// `url` with the relative paths of `sslrootcert`, `sslcert` and `sslkey` made relative to
/// `dir` (the job file's directory, as for every other path in a job file), and checked as far
/// as it can be on any host: the mode known, a certificate not without its key, the rest a URL
/// tokio-postgres reads. The files are read by the side that connects ([`PgLink::parse`]): a
/// consumer's host need not hold the certificates of the dispatcher's source.
///
/// # Errors
/// A message for the URL's field, naming the parameter.
pub fn resolve(url: &str, dir: &Path) -> Result<String, String> {
    let (rest, params) = split(url)?;
    settings(url, &rest, &params)?;
    let mut out = url.to_string();
    for (name, value) in [
        ("sslrootcert", &params.root),
        ("sslcert", &params.cert),
        ("sslkey", &params.key),
    ] {
        let Some(v) = value else { continue };
        if v == "system" && name == "sslrootcert" || Path::new(v).is_absolute() {
            continue;
        }
        let full = dir.join(v);
        let encoded: String =
            percent_encoding::utf8_percent_encode(&full.to_string_lossy(), QUERY_VALUE).to_string();
        out = replace_param(&out, name, &encoded);
    }
    Ok(out)
}

/// Bytes escaped in a query value: those that would end it or change its meaning.
const QUERY_VALUE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'&')
    .add(b'=')
    .add(b'#')
    .add(b'%')
    .add(b'+')
    .add(b'?');

/// `url` with the value of query parameter `name` replaced by `encoded`.
fn replace_param(url: &str, name: &str, encoded: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_string();
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            // Compared decoded, as split() reads the keys.
            Some((k, _)) if percent_encoding::percent_decode_str(k).decode_utf8_lossy() == name => {
                format!("{k}={encoded}")
            }
            _ => pair.to_string(),
        })
        .collect();
    format!("{base}?{}", pairs.join("&"))
}

impl PgLink {
    /// Reads `url`: tokio-postgres's parameters, and the TLS ones this module handles.
    ///
    /// # Errors
    /// A message naming what is wrong (an unknown `sslmode`, a file that cannot be read or
    /// holds no certificate or key, a parameter tokio-postgres refuses), never the password.
    pub fn parse(url: &str) -> Result<PgLink, String> {
        let (rest, params) = split(url)?;
        let (config, mode) = settings(url, &rest, &params)?;
        let tls = client_config(mode, &params)?;
        Ok(PgLink {
            config,
            tls: MakeRustlsConnect::new(tls),
            mode,
            url: url.to_string(),
        })
    }

    /// The connection settings, to adjust before connecting (options, timeouts, a name).
    pub fn config_mut(&mut self) -> &mut Config {
        &mut self.config
    }

    /// The connection settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The TLS connector (for a pool's manager).
    pub fn tls(&self) -> MakeRustlsConnect {
        self.tls.clone()
    }

    /// What `sslmode` asks.
    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// Host and port, for messages.
    pub fn place(&self) -> String {
        describe_place(&self.config)
    }

    /// Host and port of `url`, for messages, without building its TLS configuration (which
    /// reads certificate files and may load the system's roots); `None` for a URL that does
    /// not parse.
    pub fn place_of(url: &str) -> Option<String> {
        let (rest, _) = split(url).ok()?;
        Config::from_str(&rest).ok().map(|c| describe_place(&c))
    }

    /// Why a connection failed, as a person acts on it: the database's own words, and for a
    /// TLS failure which settings to check.
    pub fn explain(&self, e: &tokio_postgres::Error) -> String {
        let text = super::describe(e);
        let tls = text.contains("TLS") || text.contains("certificate");
        if tls && self.mode.verifies() {
            format!(
                "{text} (TLS with sslmode={}: check sslrootcert, and that the certificate is for \
                 the URL's host)",
                self.mode_name()
            )
        } else if tls {
            format!("{text} (TLS with sslmode={})", self.mode_name())
        } else {
            text
        }
    }

    fn mode_name(&self) -> &'static str {
        match self.mode {
            TlsMode::Disable => "disable",
            TlsMode::Prefer => "prefer",
            TlsMode::Require => "require",
            TlsMode::VerifyCa => "verify-ca",
            TlsMode::VerifyFull => "verify-full",
        }
    }

    /// One connection, driven on a task of its own until the client is dropped.
    ///
    /// # Errors
    /// The connection could not be made ([`PgLink::explain`] says why).
    pub async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        let (client, connection) = self.config.connect(self.tls.clone()).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "a connection to PostgreSQL ended");
            }
        });
        Ok(client)
    }
}

/// tokio-postgres's config of `rest` (the URL without the TLS parameters) and the mode, with
/// what can be checked without reading a file.
fn settings(url: &str, rest: &str, params: &TlsParams) -> Result<(Config, TlsMode), String> {
    let mut config = Config::from_str(rest).map_err(|e| format!("{}: {e}", redact_url(url)))?;
    let mode = match &params.mode {
        Some(m) => TlsMode::parse(m)?,
        None => TlsMode::Prefer,
    };
    config.ssl_mode(match mode {
        TlsMode::Disable => SslMode::Disable,
        TlsMode::Prefer => SslMode::Prefer,
        TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => SslMode::Require,
    });
    match (&params.cert, &params.key) {
        (Some(_), None) => Err("sslcert is given without sslkey".to_string()),
        (None, Some(_)) => Err("sslkey is given without sslcert".to_string()),
        _ => Ok((config, mode)),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls configuration `mode` asks for, with the client certificate when one is given.
fn client_config(mode: TlsMode, p: &TlsParams) -> Result<ClientConfig, String> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let checked = match mode {
        TlsMode::VerifyCa | TlsMode::VerifyFull => true,
        TlsMode::Require => p.root.is_some(),
        TlsMode::Disable | TlsMode::Prefer => false,
    };
    let chain = if checked {
        let roots = Arc::new(roots(p.root.as_deref())?);
        let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| format!("sslrootcert: {e}"))?;
        Some(webpki)
    } else {
        None
    };
    let builder = match chain {
        Some(webpki) if mode == TlsMode::VerifyFull => builder.with_webpki_verifier(webpki),
        chain => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Lenient {
                chain,
                algorithms: provider.signature_verification_algorithms,
            })),
    };
    match (&p.cert, &p.key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => {
            let chain = certificates("sslcert", cert)?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("sslkey {key:?}: no PEM private key could be read: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("sslcert and sslkey do not make a client identity: {e}"))
        }
        // settings() refused a certificate without its key, and the reverse.
        (Some(_), None) | (None, Some(_)) => Ok(builder.with_no_client_auth()),
    }
}

/// The trusted roots: the certificates of `sslrootcert`, or the system's.
fn roots(file: Option<&str>) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    match file {
        Some(path) if path != "system" => {
            for cert in certificates("sslrootcert", path)? {
                store
                    .add(cert)
                    .map_err(|e| format!("sslrootcert {path:?}: {e}"))?;
            }
        }
        _ => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(
                    "no system root certificates were found: name the CA with sslrootcert"
                        .to_string(),
                );
            }
        }
    }
    Ok(store)
}

/// Every certificate of the PEM file at `path`; at least one.
fn certificates(param: &str, path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let file = PathBuf::from(path);
    let certs = CertificateDer::pem_file_iter(&file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{param} {path:?}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{param} {path:?}: holds no PEM certificate"));
    }
    Ok(certs)
}

/// The modes below `verify-full`, as libpq means them: `verify-ca` (and `require` with a root
/// file) checks that the chain leads to a trusted root but not the host name; `prefer` and
/// `require` without a root file take the certificate as it comes (`chain` is `None`). Either
/// way the handshake's signatures are checked.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<WebPkiServerVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_leave_the_url_and_the_rest_keep_their_bytes() {
        let (rest, p) = split(
            "postgres://u:p%40ss@h:5/db?options=-c%20search_path%3Dx&sslmode=verify-full&sslrootcert=%2Ftmp%2Fca%20file.pem",
        )
        .expect("split");
        assert_eq!(
            rest,
            "postgres://u:p%40ss@h:5/db?options=-c%20search_path%3Dx"
        );
        assert_eq!(p.mode.as_deref(), Some("verify-full"));
        assert_eq!(p.root.as_deref(), Some("/tmp/ca file.pem"));
        let (rest, _) = split("postgres://h/db?sslmode=disable").expect("split");
        assert_eq!(rest, "postgres://h/db");
        // Where a URL goes, told without reading its files.
        assert_eq!(
            PgLink::place_of("postgres://u:p@h:5/db?sslmode=verify-full&sslrootcert=/nowhere.pem")
                .as_deref(),
            Some("h:5")
        );
    }

    #[test]
    fn modes_map_to_what_tokio_postgres_does_and_bad_ones_are_named() {
        let mode = |u: &str| PgLink::parse(u).map(|l| (l.mode(), l.config().get_ssl_mode()));
        assert_eq!(
            mode("postgres://h/db"),
            Ok((TlsMode::Prefer, SslMode::Prefer))
        );
        assert_eq!(
            mode("postgres://h/db?sslmode=disable"),
            Ok((TlsMode::Disable, SslMode::Disable))
        );
        assert_eq!(
            mode("postgres://h/db?sslmode=require"),
            Ok((TlsMode::Require, SslMode::Require))
        );
        let e = PgLink::parse("postgres://u:s3cret@h/db?sslmode=sideways").expect_err("bad");
        assert!(e.contains("sideways") && !e.contains("s3cret"), "{e}");
        let e = PgLink::parse("postgres://h/db?sslmode=verify-full&sslrootcert=/nonexistent.pem")
            .expect_err("missing file");
        assert!(
            e.contains("sslrootcert") && e.contains("/nonexistent.pem"),
            "{e}"
        );
        let e = PgLink::parse("postgres://h/db?sslcert=/c.pem").expect_err("no key");
        assert!(e.contains("sslkey"), "{e}");
    }

    #[test]
    fn relative_files_are_read_from_the_job_files_directory_by_the_side_that_connects() {
        let dir = tempfile::tempdir().expect("dir");
        let url = "postgres://h/db?sslmode=verify-ca&sslrootcert=ca%20file.pem&application_name=a";
        // Checked on any host without the file...
        let resolved = resolve(url, dir.path()).expect("no file needed to read the URL");
        let expected = dir.path().join("ca file.pem");
        let (_, p) = split(&resolved).expect("split");
        assert_eq!(p.root.as_deref(), Some(expected.to_str().expect("UTF-8")));
        assert!(resolved.ends_with("&application_name=a"), "{resolved}");
        // ...and read by the side that connects.
        let e = PgLink::parse(&resolved).expect_err("no such file");
        assert!(e.contains(&expected.display().to_string()), "{e}");
        std::fs::write(&expected, "not a certificate").expect("write");
        let e = PgLink::parse(&resolved).expect_err("no certificate");
        assert!(e.contains("no PEM certificate"), "{e}");
        let e = resolve("postgres://h/db?sslkey=k.pem", dir.path()).expect_err("no cert");
        assert!(e.contains("sslcert"), "{e}");
        let e = resolve("postgres://h/db?sslmode=allow", dir.path()).expect_err("no allow");
        assert!(e.contains("allow"), "{e}");
    }
}
