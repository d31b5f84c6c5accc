//! mTLS configuration for HBONE, loaded from PEM files and reloaded when
//! they change, so certificate rotation needs no restart.
//!
//! Both ends require TLS 1.3, ALPN `h2` and a client certificate. Chains
//! are checked by rustls' webpki against the CA bundle; names are not DNS
//! names but SPIFFE URI SANs, which rustls does not check: the server reads
//! the client's identity after the handshake to apply its [`Policy`], and
//! the client compares the server's identity with the one it expected
//! before it sends anything.
//!
//! [`Policy`]: super::Policy

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime},
};

use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject as _},
    server::{ParsedCertificate, WebPkiClientVerifier},
};

use super::{Identity, cert_identity, mint};

pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}: no certificate in the file")]
    NoCertificate(PathBuf),
    #[error("{path}: the certificate names no usable identity: {source}")]
    Identity { path: PathBuf, source: super::Error },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Where a node's mTLS material lives: a directory with `ca.pem` (the CA
/// bundle), `cert.pem` (leaf first) and `key.pem`, as `redirector certs`
/// writes it and as a mounted Kubernetes secret would hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca: dir.join(mint::CA_FILE),
            cert: dir.join(mint::CERT_FILE),
            key: dir.join(mint::KEY_FILE),
        }
    }

    /// Modification times and sizes: what the reloader watches.
    fn stamp(&self) -> Vec<Option<(SystemTime, u64)>> {
        [&self.ca, &self.cert, &self.key]
            .iter()
            .map(|p| {
                std::fs::metadata(p)
                    .ok()
                    .and_then(|m| Some((m.modified().ok()?, m.len())))
            })
            .collect()
    }
}

/// One consistent set: the server and client configurations built from the
/// same files, and the identity they prove.
pub struct Configs {
    pub identity: Identity,
    /// The certificate proven (its validity drives a CA client's renewals).
    pub leaf: CertificateDer<'static>,
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
}

pub fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

fn file_error(path: &Path) -> impl Fn(String) -> Error + '_ {
    move |message| Error::File {
        path: path.to_owned(),
        message,
    }
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| file_error(path)(e.to_string()))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Configs {
    pub fn load(files: &CertFiles) -> Result<Self, Error> {
        let ca = parse_certs(&read(&files.ca)?).map_err(file_error(&files.ca))?;
        if ca.is_empty() {
            return Err(Error::NoCertificate(files.ca.clone()));
        }
        let chain = parse_certs(&read(&files.cert)?).map_err(file_error(&files.cert))?;
        let leaf = chain
            .first()
            .ok_or_else(|| Error::NoCertificate(files.cert.clone()))?;
        cert_identity(leaf).map_err(|source| Error::Identity {
            path: files.cert.clone(),
            source,
        })?;
        let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?)
            .map_err(|e| file_error(&files.key)(e.to_string()))?;
        Self::from_parts(ca, chain, key)
    }

    /// A set from certificates and a key held in memory (a CA client's).
    pub fn from_parts(
        ca: Vec<CertificateDer<'static>>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, Error> {
        let leaf = chain
            .first()
            .ok_or_else(|| Error::Config("no certificate in the chain".into()))?;
        let identity =
            cert_identity(leaf).map_err(|e| Error::Config(format!("the leaf certificate: {e}")))?;
        let leaf = leaf.clone();
        let mut roots = RootCertStore::empty();
        for cert in ca {
            roots
                .add(cert)
                .map_err(|e| Error::Config(format!("a trust root: {e}")))?;
        }
        if roots.is_empty() {
            return Err(Error::Config("no trust root".into()));
        }
        let roots = Arc::new(roots);
        let config = |e: rustls::Error| Error::Config(e.to_string());

        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), provider())
                .build()
                .map_err(|e| Error::Config(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(config)?;
        server.alpn_protocols = vec![ALPN_H2.to_vec()];

        let mut client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
                roots,
                provider: provider(),
            }))
            .with_client_auth_cert(chain, key)
            .map_err(config)?;
        client.alpn_protocols = vec![ALPN_H2.to_vec()];

        Ok(Self {
            identity,
            leaf,
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// Checks a server's chain against the CA bundle, and that its leaf carries
/// a SPIFFE identity. The SNI name is ignored: HBONE dials addresses, and
/// which identity the server must have is checked by the caller, who knows
/// it, once the handshake is done.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        cert_identity(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The node's current mTLS configuration. New tunnels take the current
/// set; tunnels already up keep the one they were made with.
pub struct Tls {
    /// `None`: the certificates come from a CA client ([`Tls::replace`]).
    files: Option<CertFiles>,
    current: RwLock<Arc<Configs>>,
    /// The files as last looked at (loaded, or refused).
    stamp: Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl Tls {
    pub fn load(files: CertFiles) -> Result<Arc<Self>, Error> {
        let stamp = files.stamp();
        let configs = Configs::load(&files)?;
        Ok(Arc::new(Self {
            files: Some(files),
            current: RwLock::new(Arc::new(configs)),
            stamp: Mutex::new(stamp),
        }))
    }

    /// A set held in memory, replaced by its owner (the istiod CA client).
    pub fn in_memory(configs: Configs) -> Arc<Self> {
        Arc::new(Self {
            files: None,
            current: RwLock::new(Arc::new(configs)),
            stamp: Mutex::new(Vec::new()),
        })
    }

    /// New tunnels take `configs` from now on (a rotation).
    pub fn replace(&self, configs: Configs) {
        tracing::info!(identity = %configs.identity, "mTLS certificates rotated");
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(configs);
    }

    pub fn current(&self) -> Arc<Configs> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Reloads if any file changed since the last look. A set that does not
    /// load (a rotation caught half-way) leaves the old one in place, is
    /// reported once, and is tried again when the files change again.
    pub fn reload_if_changed(&self) -> Result<bool, Error> {
        let Some(files) = &self.files else {
            return Ok(false);
        };
        let stamp = files.stamp();
        let mut last = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
        if *last == stamp {
            return Ok(false);
        }
        *last = stamp;
        let configs = Configs::load(files)?;
        tracing::info!(identity = %configs.identity, "mTLS certificates reloaded");
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(configs);
        Ok(true)
    }

    /// Watches the files every `interval` for as long as the runtime runs.
    pub fn spawn_reloader(self: &Arc<Self>, interval: Duration) {
        let tls = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = tls.reload_if_changed() {
                    tracing::warn!(error = %e, "mTLS certificates changed but do not load; keeping the previous ones");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::mint::Ca;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("rdr-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn rotation_swaps_the_set_and_a_broken_one_keeps_the_old() {
        let dir = temp_dir("rotate");
        let ca = Ca::new("cluster.local").expect("ca");
        let first = Identity::new("cluster.local", "redis", "first");
        ca.issue_into(&first, &dir).expect("issue");
        let tls = Tls::load(CertFiles::in_dir(&dir)).expect("load");
        assert_eq!(tls.current().identity, first);
        assert!(!tls.reload_if_changed().expect("unchanged"));

        // A new certificate (another identity, so the swap shows).
        let second = Identity::new("cluster.local", "redis", "second");
        ca.issue_into(&second, &dir).expect("reissue");
        assert!(tls.reload_if_changed().expect("reload"));
        assert_eq!(tls.current().identity, second);

        // Half a rotation: the key does not match the certificate any more.
        let stray = Ca::new("cluster.local")
            .expect("ca")
            .issue(&first)
            .expect("issue");
        std::fs::write(dir.join(mint::KEY_FILE), stray.key_pem).expect("write key");
        assert!(tls.reload_if_changed().is_err(), "a mismatched key loaded");
        assert_eq!(tls.current().identity, second, "the old set stays");
        // Reported once, not on every look.
        assert!(!tls.reload_if_changed().expect("same broken files"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn missing_or_empty_files_are_named_in_the_error() {
        let dir = temp_dir("missing");
        let error = Configs::load(&CertFiles::in_dir(&dir))
            .err()
            .expect("no files");
        assert!(error.to_string().contains("ca.pem"), "{error}");
        let ca = Ca::new("cluster.local").expect("ca");
        ca.issue_into(&Identity::new("cluster.local", "a", "b"), &dir)
            .expect("issue");
        std::fs::write(dir.join(mint::CERT_FILE), "").expect("empty cert");
        let error = Configs::load(&CertFiles::in_dir(&dir))
            .err()
            .expect("empty cert");
        assert!(matches!(error, Error::NoCertificate(_)), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
