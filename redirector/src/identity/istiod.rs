//! Certificates from istiod, the way an Istio ambient node gets them: a
//! key made here and kept in memory, a certificate request (CSR) naming our
//! SPIFFE identity, sent to Istio's CA service
//! (`istio.v1.auth.IstioCertificateService/CreateCertificate`, gRPC over TLS
//! on istiod's port 15012), authenticated by the projected ServiceAccount
//! token (audience `istio-ca`) and trusting the mesh root from the
//! `istio-ca-root-cert` ConfigMap. The answer becomes the HBONE TLS set
//! ([`Tls::in_memory`]), and a new certificate is asked for once half of the
//! current one's life is over ([`spawn_rotation`]), as istio-agent and
//! ztunnel do. The file-based mode (`--hbone-certs`) stays for other meshes.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::{
    Identity,
    tls::{Configs, Tls, parse_certs},
};

/// The gRPC method istiod's CA serves.
pub const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// `istio.v1.auth.IstioCertificateRequest` (istio/api security/v1alpha1/ca.proto);
/// field 4, metadata, is not sent.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded certificate request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Asked lifetime in seconds (the CA may give less).
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
}

/// `istio.v1.auth.IstioCertificateResponse`: the leaf first, the root last.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("istiod CA address `{address}`: {message}")]
    Address { address: String, message: String },
    #[error("cannot make the certificate request: {0}")]
    Request(String),
    #[error("istiod refused the certificate request: {code:?}: {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("istiod's certificate does not serve: {0}")]
    Answer(String),
    #[error("the mesh root in {path} expired {ago:?} ago; mount the current istio-ca-root-cert")]
    ExpiredRoot { path: PathBuf, ago: Duration },
}

/// Where istiod is, and what to prove to it.
#[derive(Clone, Debug)]
pub struct Settings {
    /// e.g. `https://istiod.istio-system.svc:15012`.
    pub address: String,
    /// The mesh root (`istio-ca-root-cert`'s `root-cert.pem`): trusted for
    /// istiod's own certificate and for HBONE peers.
    pub root_cert: PathBuf,
    /// The projected ServiceAccount token (audience `istio-ca`), read at
    /// each request: the kubelet rotates it.
    pub token: PathBuf,
    /// Istio's cluster id (`Kubernetes` by default).
    pub cluster_id: String,
    /// The identity asked for: our ServiceAccount's.
    pub identity: Identity,
    /// The lifetime asked for.
    pub lifetime: Duration,
    /// The TLS name istiod's certificate must carry when the address is an
    /// IP (tests); otherwise the address's host.
    pub server_name: Option<String>,
}

/// Istio's CA, over one gRPC channel.
pub struct CaClient {
    settings: Settings,
    channel: Channel,
}

fn read(path: &PathBuf) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.clone(),
        source,
    })
}

impl CaClient {
    /// Connects lazily: the first request dials.
    pub fn new(settings: Settings) -> Result<Self, Error> {
        let bad = |message: String| Error::Address {
            address: settings.address.clone(),
            message,
        };
        let root = read(&settings.root_cert)?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(root));
        if let Some(name) = &settings.server_name {
            tls = tls.domain_name(name.clone());
        }
        let channel = Endpoint::from_shared(settings.address.clone())
            .map_err(|e| bad(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            .connect_lazy();
        Ok(Self { settings, channel })
    }

    /// A fresh key, kept in memory, and a certificate for it from istiod,
    /// as the TLS set HBONE uses.
    pub async fn issue(&self) -> Result<Configs, Error> {
        let key = rcgen::KeyPair::generate().map_err(|e| Error::Request(e.to_string()))?;
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            self.settings
                .identity
                .to_string()
                .try_into()
                .map_err(|e: rcgen::Error| Error::Request(e.to_string()))?,
        )];
        let csr = params
            .serialize_request(&key)
            .and_then(|csr| csr.pem())
            .map_err(|e| Error::Request(e.to_string()))?;
        let token = String::from_utf8_lossy(&read(&self.settings.token)?)
            .trim()
            .to_string();
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(self.settings.lifetime.as_secs()).unwrap_or(i64::MAX),
        });
        let metadata = request.metadata_mut();
        metadata.insert(
            "authorization",
            format!("Bearer {token}")
                .parse()
                .map_err(|_| Error::Request("the token is not a valid header value".into()))?,
        );
        metadata.insert(
            "clusterid",
            self.settings
                .cluster_id
                .parse()
                .map_err(|_| Error::Request("the cluster id is not a valid header value".into()))?,
        );
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        let refused = |status: tonic::Status| Error::Refused {
            code: status.code(),
            message: status.message().to_string(),
        };
        grpc.ready()
            .await
            .map_err(|e| refused(tonic::Status::unavailable(e.to_string())))?;
        let response: tonic::Response<IstioCertificateResponse> = grpc
            .unary(
                request,
                http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .map_err(refused)?;
        let mut chain = Vec::new();
        for pem in response.into_inner().cert_chain {
            chain.extend(parse_certs(pem.as_bytes()).map_err(Error::Answer)?);
        }
        let roots = parse_certs(&read(&self.settings.root_cert)?).map_err(Error::Answer)?;
        // webpki does not look at a trust anchor's dates; an expired mesh
        // root is a configuration to fix, said plainly.
        let now = SystemTime::now();
        for root in &roots {
            if let Some((_, until)) = validity(root)
                && let Ok(ago) = now.duration_since(until)
            {
                return Err(Error::ExpiredRoot {
                    path: self.settings.root_cert.clone(),
                    ago,
                });
            }
        }
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let configs =
            Configs::from_parts(roots, chain, key).map_err(|e| Error::Answer(e.to_string()))?;
        if configs.identity != self.settings.identity {
            return Err(Error::Answer(format!(
                "asked for {}, the certificate says {}",
                self.settings.identity, configs.identity
            )));
        }
        Ok(configs)
    }
}

/// When a certificate valid from `not_before` to `not_after`, received at
/// `received`, is renewed: half-way through what is left of its life once
/// received (istio-agent's default grace is 50%; CAs backdate
/// `not_before` for clock skew, which must not make a renewal due at
/// once), and never sooner than [`MIN_RENEWAL`] after receipt.
pub fn renewal_at(
    not_before: SystemTime,
    not_after: SystemTime,
    received: SystemTime,
) -> SystemTime {
    let from = not_before.max(received);
    let life = not_after.duration_since(from).unwrap_or(Duration::ZERO);
    (from + life / 2).max(received + MIN_RENEWAL)
}

/// The shortest time between two renewals.
pub const MIN_RENEWAL: Duration = Duration::from_secs(1);

/// The validity of a certificate.
pub fn validity(cert: &CertificateDer<'_>) -> Option<(SystemTime, SystemTime)> {
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    let (_, parsed) = X509Certificate::from_der(cert).ok()?;
    let at = |t: x509_parser::time::ASN1Time| {
        let secs = u64::try_from(t.timestamp()).ok()?;
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
    };
    Some((
        at(parsed.validity().not_before)?,
        at(parsed.validity().not_after)?,
    ))
}

/// How long to wait after a failed renewal before asking again.
pub const RETRY: Duration = Duration::from_secs(10);

/// Keeps `tls` renewed for as long as the runtime runs: a new key and
/// certificate once half of the current one's life is over; a failure is
/// logged and retried every [`RETRY`] (the current set serves meanwhile).
pub fn spawn_rotation(client: Arc<CaClient>, tls: Arc<Tls>, current_leaf: CertificateDer<'static>) {
    tokio::spawn(async move {
        let mut leaf = current_leaf;
        let mut received = SystemTime::now();
        loop {
            let wait = validity(&leaf)
                .map(|(from, to)| renewal_at(from, to, received))
                .and_then(|at| at.duration_since(SystemTime::now()).ok())
                .unwrap_or(MIN_RENEWAL);
            tokio::time::sleep(wait).await;
            match client.issue().await {
                Ok(configs) => {
                    leaf = configs.leaf.clone();
                    received = SystemTime::now();
                    tls.replace(configs);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the HBONE certificate from istiod; retrying");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    });
}

/// istiod's CA played in-process, for the tests here and the daemon's.
#[cfg(test)]
pub(crate) mod fake {
    use std::{
        convert::Infallible,
        net::SocketAddr,
        pin::Pin,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rustls::pki_types::pem::PemObject as _;

    use super::*;
    use crate::identity::mint::Ca;

    pub const ISTIOD: &str = "istiod.istio-system.svc";

    /// Plays istiod's CA: `CreateCertificate` over TLS (a certificate for
    /// istiod's name from the mesh root), signing with `ca` for `lifetime`
    /// when the bearer token is `token`.
    pub struct FakeIstiod {
        pub addr: SocketAddr,
        pub signed: Arc<AtomicUsize>,
    }

    #[derive(Clone)]
    struct Sign {
        ca: Arc<Ca>,
        token: &'static str,
        lifetime: Duration,
        signed: Arc<AtomicUsize>,
    }

    impl tonic::server::UnaryService<IstioCertificateRequest> for Sign {
        type Response = IstioCertificateResponse;
        type Future = Pin<
            Box<
                dyn std::future::Future<
                        Output = Result<tonic::Response<IstioCertificateResponse>, tonic::Status>,
                    > + Send,
            >,
        >;

        fn call(&mut self, request: tonic::Request<IstioCertificateRequest>) -> Self::Future {
            let this = self.clone();
            Box::pin(async move {
                let bearer = request
                    .metadata()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "));
                if bearer != Some(this.token) {
                    return Err(tonic::Status::unauthenticated("token not accepted"));
                }
                if request.metadata().get("clusterid").is_none() {
                    return Err(tonic::Status::invalid_argument("no cluster id"));
                }
                let leaf = this
                    .ca
                    .sign_request(&request.get_ref().csr, this.lifetime)
                    .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
                this.signed.fetch_add(1, Ordering::Relaxed);
                Ok(tonic::Response::new(IstioCertificateResponse {
                    cert_chain: vec![leaf, this.ca.cert_pem().to_string()],
                }))
            })
        }
    }

    pub async fn fake_istiod(ca: Arc<Ca>, token: &'static str, lifetime: Duration) -> FakeIstiod {
        let serving = ca.issue_server(ISTIOD).expect("istiod certificate");
        let certs = parse_certs(serving.chain_pem.as_bytes()).expect("chain");
        let key = PrivateKeyDer::from_pem_slice(serving.key_pem.as_bytes()).expect("key");
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let signed = Arc::new(AtomicUsize::new(0));
        let sign = Sign {
            ca,
            token,
            lifetime,
            signed: Arc::clone(&signed),
        };
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, sign) = (acceptor.clone(), sign.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |request| {
                        let sign = sign.clone();
                        async move {
                            if request.uri().path() != CREATE_CERTIFICATE {
                                return Ok::<_, Infallible>(
                                    tonic::Status::unimplemented("no such method").into_http(),
                                );
                            }
                            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<
                                IstioCertificateResponse,
                                IstioCertificateRequest,
                            >::default(
                            ));
                            Ok(grpc.unary(sign, request).await)
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        FakeIstiod { addr, signed }
    }

    /// A directory with the mesh root and a token, removed on drop.
    pub struct Files(pub PathBuf);

    impl Files {
        pub fn new(name: &str, root_pem: &str, token: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("rdr-istiod-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("dir");
            std::fs::write(dir.join("root-cert.pem"), root_pem).expect("root");
            std::fs::write(dir.join("istio-token"), format!("{token}\n")).expect("token");
            Self(dir)
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    impl FakeIstiod {
        /// A client's settings for this CA, with the root and token in `files`.
        pub fn settings(&self, files: &Files, identity: Identity, lifetime: Duration) -> Settings {
            Settings {
                address: format!("https://{}", self.addr),
                root_cert: files.0.join("root-cert.pem"),
                token: files.0.join("istio-token"),
                cluster_id: "Kubernetes".into(),
                identity,
                lifetime,
                server_name: Some(ISTIOD.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::{
        fake::{FakeIstiod, Files, fake_istiod},
        *,
    };
    use crate::identity::mint::Ca;

    fn me() -> Identity {
        Identity::new("cluster.local", "redirector-system", "redirector")
    }

    fn client(istiod: &FakeIstiod, files: &Files, lifetime: Duration) -> CaClient {
        CaClient::new(istiod.settings(files, me(), lifetime)).expect("client")
    }

    #[tokio::test]
    async fn istiod_issues_our_identity_for_a_key_that_never_leaves_memory() {
        let ca = Arc::new(Ca::new("cluster.local").expect("ca"));
        let istiod = fake_istiod(Arc::clone(&ca), "good", Duration::from_secs(3600)).await;
        let files = Files::new("issue", ca.cert_pem(), "good");
        let configs = client(&istiod, &files, Duration::from_secs(3600))
            .issue()
            .await
            .expect("a certificate");
        assert_eq!(configs.identity, me());
        let (from, until) = validity(&configs.leaf).expect("validity");
        let life = until.duration_since(from).expect("ordered");
        assert!(life >= Duration::from_secs(3600), "{life:?}");
        assert_eq!(istiod.signed.load(Ordering::Relaxed), 1);
        assert!(
            std::fs::read_dir(&files.0).expect("dir").count() == 2,
            "nothing written but what was mounted"
        );
    }

    #[tokio::test]
    async fn a_refused_token_is_an_error_that_says_so() {
        let ca = Arc::new(Ca::new("cluster.local").expect("ca"));
        let istiod = fake_istiod(Arc::clone(&ca), "good", Duration::from_secs(3600)).await;
        let files = Files::new("refused", ca.cert_pem(), "stolen");
        match client(&istiod, &files, Duration::from_secs(3600))
            .issue()
            .await
        {
            Err(Error::Refused { code, .. }) => assert_eq!(code, tonic::Code::Unauthenticated),
            other => panic!("expected a refusal, got {:?}", other.map(|c| c.identity)),
        }
        assert_eq!(istiod.signed.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn an_expired_mesh_root_is_refused_with_the_file_to_fix() {
        let expired =
            Ca::valid_until("cluster.local", Some(Duration::from_secs(3600))).expect("ca");
        let ca = Arc::new(Ca::new("cluster.local").expect("ca"));
        let istiod = fake_istiod(Arc::clone(&ca), "good", Duration::from_secs(3600)).await;
        // The mounted root is the current one plus an expired one.
        let both = format!("{}{}", ca.cert_pem(), expired.cert_pem());
        let files = Files::new("expired", &both, "good");
        match client(&istiod, &files, Duration::from_secs(3600))
            .issue()
            .await
        {
            Err(e @ Error::ExpiredRoot { .. }) => {
                assert!(e.to_string().contains("root-cert.pem"), "{e}");
            }
            other => panic!("expected ExpiredRoot, got {:?}", other.map(|c| c.identity)),
        }
    }

    #[tokio::test]
    async fn certificates_rotate_half_way_through_their_life() {
        let ca = Arc::new(Ca::new("cluster.local").expect("ca"));
        let lifetime = Duration::from_secs(4);
        let istiod = fake_istiod(Arc::clone(&ca), "good", lifetime).await;
        let files = Files::new("rotate", ca.cert_pem(), "good");
        let client = Arc::new(client(&istiod, &files, lifetime));
        let first = client.issue().await.expect("first certificate");
        let first_leaf = first.leaf.clone();
        let tls = Tls::in_memory(first);
        spawn_rotation(Arc::clone(&client), Arc::clone(&tls), first_leaf.clone());
        // Half of a 4 s life: renewed after about 2 s, well before expiry.
        tokio::time::timeout(Duration::from_secs(4), async {
            while tls.current().leaf == first_leaf {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("renewed before the first certificate expired");
        assert_eq!(tls.current().identity, me());
        assert!(istiod.signed.load(Ordering::Relaxed) >= 2);
    }

    #[test]
    fn renewal_is_half_way_through_what_is_left_once_received() {
        let t = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        // Backdated an hour, valid 24 h from receipt: renewed at 12 h.
        assert_eq!(
            renewal_at(t(10_000 - 3600), t(10_000 + 86400), t(10_000)),
            t(10_000 + 43200)
        );
        // Received as it was issued.
        assert_eq!(renewal_at(t(1000), t(1100), t(1000)), t(1050));
        // Expired already: no sooner than a second later.
        assert_eq!(renewal_at(t(0), t(500), t(1000)), t(1001));
    }
}
