//! TLS on the ring provider: the relay's certificate ([`TlsConfig`], read from PEM files) and
//! the client's trust (the system's root certificates plus an optional CA file), and turning
//! rustls errors into messages that say what is wrong.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::NetError;

/// The relay's TLS setting: a certificate chain and its private key, ready to accept
/// connections. With it the relay serves `wss://` (and `/healthz`, `/metrics` over `https://`).
#[derive(Clone)]
pub struct TlsConfig {
    server: Arc<ServerConfig>,
    /// Where the certificate came from, for logs.
    source: String,
}

impl TlsConfig {
    /// Reads a PEM certificate chain (leaf first, as issued) and the PEM private key of its
    /// leaf (PKCS#8, PKCS#1 or SEC1). Both may be the same file. Fails with a message naming
    /// the file when one cannot be read, holds no certificate or no key, or the key does not
    /// belong to the certificate.
    pub fn from_pem_files(cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Result<Self, NetError> {
        let (cert, key) = (cert.as_ref(), key.as_ref());
        let chain = read_certificates(cert, "TLS certificate")?;
        let key_der = read_private_key(key)?;
        let server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| NetError::Tls {
                what: "choosing the TLS versions".into(),
                source,
            })?
            .with_no_client_auth()
            .with_single_cert(chain, key_der)
            .map_err(|source| match source {
                rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                    NetError::TlsKeyMismatch {
                        cert: cert.to_owned(),
                        key: key.to_owned(),
                    }
                }
                source => NetError::Tls {
                    what: format!(
                        "using the certificate {} with the key {}",
                        cert.display(),
                        key.display()
                    ),
                    source,
                },
            })?;
        Ok(TlsConfig {
            server: Arc::new(server),
            source: cert.display().to_string(),
        })
    }

    /// A server configuration built by the caller (certificate resolvers, client
    /// certificates, ALPN...). It should use the ring provider, as the rest of weft does.
    pub fn from_server_config(server: Arc<ServerConfig>) -> Self {
        TlsConfig {
            server,
            source: "a caller-built rustls::ServerConfig".into(),
        }
    }

    /// The rustls configuration the relay accepts connections with.
    pub fn server_config(&self) -> &Arc<ServerConfig> {
        &self.server
    }
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("certificate", &self.source)
            .finish_non_exhaustive()
    }
}

/// The one crypto provider weft uses (ring: no C toolchain beyond a compiler, and no process
/// default to install).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM file (at least one).
fn read_certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, NetError> {
    let bytes = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| pem_error(path, source))?;
    if certs.is_empty() {
        return Err(NetError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key in a PEM file.
fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, NetError> {
    let bytes = read(path, "TLS private key")?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|source| match source {
        pem::Error::NoItemsFound => NetError::NoPrivateKey {
            path: path.to_owned(),
        },
        source => pem_error(path, source),
    })
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, NetError> {
    std::fs::read(path).map_err(|source| NetError::Io {
        what: format!("reading the {what} {}", path.display()),
        source,
    })
}

fn pem_error(path: &Path, source: pem::Error) -> NetError {
    NetError::Pem {
        path: path.to_owned(),
        source,
    }
}

/// The system's root certificates, read once per process (a few hundred files on some
/// systems; reconnects must not re-read them).
fn native_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::debug!("reading the system's root certificates: {e}");
        }
        let mut roots = RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(found.certs);
        tracing::debug!(added, ignored, "system root certificates");
        roots
    })
}

/// The client's TLS configuration: the system's roots plus every certificate in `ca_file`.
/// Blocking (file reads): call it off the async workers.
pub(crate) fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, NetError> {
    let mut roots = native_roots().clone();
    if let Some(path) = ca_file {
        for cert in read_certificates(path, "CA file")? {
            roots.add(cert).map_err(|source| NetError::Tls {
                what: format!("the CA certificate in {}", path.display()),
                source,
            })?;
        }
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| NetError::Tls {
            what: "choosing the TLS versions".into(),
            source,
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// What a failed dial says, with the TLS failure spelled out when there is one.
pub(crate) fn dial_error(url: &str, error: &tokio_tungstenite::tungstenite::Error) -> String {
    use tokio_tungstenite::tungstenite::Error;
    let tls = match error {
        Error::Io(e) => e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()),
        _ => None,
    };
    if let Some(tls) = tls {
        let hint = match tls {
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => {
                " (the relay's certificate is not signed by a trusted CA; for a self-signed \
                 relay, trust its certificate with `ca_file` / `weft sync --ca-file`)"
            }
            // Not a TLS record: the relay speaks plain WebSocket on this port.
            rustls::Error::InvalidMessage(_) => {
                " (the relay does not seem to serve TLS on this port; try ws://)"
            }
            // `openssl req -x509` marks its self-signed certificates as CAs, which a server
            // may not present (webpki's error has no public type to match).
            rustls::Error::InvalidCertificate(e)
                if format!("{e:?}").contains("CaUsedAsEndEntity") =>
            {
                " (the relay serves a CA certificate; serve a certificate issued by it, or make \
                 the self-signed one with `-addext basicConstraints=critical,CA:FALSE`)"
            }
            _ => "",
        };
        return format!("cannot connect to {url}: TLS: {tls}{hint}");
    }
    if let Error::Http(response) = error {
        // The relay explains refusals in the body (e.g. plain HTTP sent to its TLS port).
        let body = response
            .body()
            .as_deref()
            .map(String::from_utf8_lossy)
            .map(|b| b.trim().chars().take(200).collect::<String>())
            .unwrap_or_default();
        if !body.is_empty() {
            return format!("cannot reach {url}: {error}: {body}");
        }
    }
    format!("cannot reach {url}: {error}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_errors_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no PEM here\n").unwrap();
        let err = TlsConfig::from_pem_files(&missing, &missing).unwrap_err();
        assert!(
            err.to_string().contains("missing.pem") && matches!(err, NetError::Io { .. }),
            "{err}"
        );
        let err = TlsConfig::from_pem_files(&empty, &empty).unwrap_err();
        assert!(matches!(err, NetError::NoCertificate { .. }), "{err}");
        assert!(client_config(Some(&empty)).is_err());
    }
}
