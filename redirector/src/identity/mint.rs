//! A local certificate authority for the demo and the tests
//! (`redirector certs`). Production nodes get their certificates from the
//! mesh's CA; this only mints the same shapes: an ECDSA P-256 root, and leaf
//! certificates whose one URI SAN is the node's SPIFFE identity, valid for
//! both TLS client and server use (a node proxy dials and accepts tunnels).

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

use super::Identity;

/// File names, the same for a CA directory and a node directory, so a node
/// directory can be handed to `redirector run --hbone-certs`.
pub const CA_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A CA that can issue node certificates.
pub struct Ca {
    key: KeyPair,
    cert_pem: String,
}

/// A node's certificate chain and key, PEM-encoded.
pub struct Issued {
    pub chain_pem: String,
    pub key_pem: String,
}

impl Ca {
    /// A new self-signed root for `trust_domain`, valid for ten years.
    pub fn new(trust_domain: &str) -> Result<Self, Error> {
        Self::valid_until(trust_domain, None)
    }

    /// A CA whose own certificate expired `ago` (tests of what an expired
    /// root does to clients); `None`: valid for ten years.
    pub fn valid_until(trust_domain: &str, expired_ago: Option<Duration>) -> Result<Self, Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, trust_domain);
        // A CA's name is how certificates find their issuer: two CAs of one
        // trust domain (a rotation, a test's foreign CA) must not share it.
        let minted = OffsetDateTime::now_utc().unix_timestamp_nanos();
        name.push(
            DnType::CommonName,
            format!("redirector CA for {trust_domain} ({minted:x})"),
        );
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, Duration::from_secs(10 * 365 * 24 * 3600));
        if let Some(ago) = expired_ago {
            let now = OffsetDateTime::now_utc();
            params.not_before = now - Duration::from_secs(2 * 24 * 3600) - ago;
            params.not_after = now - ago;
        }
        let cert_pem = params.self_signed(&key)?.pem();
        Ok(Self { key, cert_pem })
    }

    /// A CA saved by [`Ca::save`].
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let cert_pem = read(&dir.join(CA_FILE))?;
        let key = KeyPair::from_pem(&read(&dir.join(CA_KEY_FILE))?)?;
        // Fails early on a certificate the issuer could not use.
        Issuer::from_ca_cert_pem(&cert_pem, &key)?;
        Ok(Self { key, cert_pem })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Writes `ca.pem` and `ca-key.pem` (0600) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), Error> {
        write(dir, CA_FILE, &self.cert_pem, 0o644)?;
        write(dir, CA_KEY_FILE, &self.key.serialize_pem(), 0o600)
    }

    /// A leaf certificate for `identity`, valid for `lifetime`.
    pub fn issue_for(&self, identity: &Identity, lifetime: Duration) -> Result<Issued, Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, identity.trust_domain.as_str());
        params.distinguished_name = name;
        params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        validity(&mut params, lifetime);
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Issued {
            chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A leaf certificate for `identity`, valid for 90 days.
    /// Signs a certificate request as a mesh CA does: the SANs it asks
    /// for, for `lifetime` (tests of the istiod client play istiod).
    pub fn sign_request(&self, csr_pem: &str, lifetime: Duration) -> Result<String, Error> {
        let mut request = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
        validity(&mut request.params, lifetime);
        request.params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        Ok(request.signed_by(&issuer)?.pem())
    }

    /// A server certificate for a DNS name (istiod's serving certificate,
    /// in tests).
    pub fn issue_server(&self, dns_name: &str) -> Result<Issued, Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![dns_name.to_string()])?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        validity(&mut params, Duration::from_secs(24 * 3600));
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Issued {
            chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    pub fn issue(&self, identity: &Identity) -> Result<Issued, Error> {
        self.issue_for(identity, Duration::from_secs(90 * 24 * 3600))
    }

    /// Issues for `identity` and writes `cert.pem`, `key.pem` (0600) and this
    /// CA's `ca.pem` into `dir`: everything `redirector run` loads. The key
    /// is written first and the certificate last, so a watcher that reloads
    /// on the certificate's change sees a matching pair.
    pub fn issue_into(&self, identity: &Identity, dir: &Path) -> Result<(), Error> {
        let issued = self.issue(identity)?;
        write(dir, CA_FILE, &self.cert_pem, 0o644)?;
        write(dir, KEY_FILE, &issued.key_pem, 0o600)?;
        write(dir, CERT_FILE, &issued.chain_pem, 0o644)
    }
}

/// Valid from an hour ago (clock skew between nodes) for `lifetime`.
fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::from_secs(3600);
    params.not_after = now + lifetime;
}

fn read(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes through a temporary file and a rename, so a reader never sees
/// half a file.
fn write(dir: &Path, name: &str, contents: &str, mode: u32) -> Result<(), Error> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Io { path, source }
    };
    fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    std::io::Write::write_all(&mut file, contents.as_bytes()).map_err(io(&tmp))?;
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io(&tmp))?;
    fs::rename(&tmp, &path).map_err(io(&path))
}
