//! A throwaway certificate authority for tests and the local development setup.
//!
//! Production certificates come from the operator's PKI (cert-manager on
//! Kubernetes); this crate exists so that every test and the local quickstart run
//! over real mutual TLS with real X.509 chains rather than a switched-off check.

#![forbid(unsafe_code)]

use std::{
    fmt, fs, io,
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};

/// Why a certificate could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused the parameters or failed to sign.
    #[error("cannot generate certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// The files could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct CertifiedKey {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key (PKCS#8), PEM. Never printed by `Debug`.
    pub key_pem: String,
    /// The certificate's serial number: what a CRL names it by.
    serial: u64,
}

impl fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertifiedKey")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .field("serial", &self.serial)
            .finish()
    }
}

impl CertifiedKey {
    /// Writes `<dir>/<name>.crt` and `<dir>/<name>.key` (the key with mode 0600).
    pub fn write(&self, dir: &Path, name: &str) -> Result<(), PkiError> {
        write_file(&dir.join(format!("{name}.crt")), &self.cert_pem, 0o644)?;
        write_file(&dir.join(format!("{name}.key")), &self.key_pem, 0o600)
    }
}

/// A certificate revocation list, PEM and DER.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Crl {
    /// The CRL, PEM (`-----BEGIN X509 CRL-----`).
    pub pem: String,
    /// The same CRL, DER.
    pub der: Vec<u8>,
}

impl Crl {
    /// Writes the PEM form to `path`.
    pub fn write(&self, path: &Path) -> Result<(), PkiError> {
        write_file(path, &self.pem, 0o644)
    }
}

/// A self-signed certificate authority that issues server and client
/// certificates, and CRLs revoking them.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    /// The serial number of the last certificate issued, and of the last CRL:
    /// unique within this CA, which is all a CRL needs.
    issued: AtomicU64,
    crls: AtomicU64,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("cert_pem", &self.cert_pem)
            .finish()
    }
}

impl Ca {
    /// A new CA whose subject common name is `name`.
    pub fn new(name: &str) -> Result<Self, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
            issued: AtomicU64::new(0),
            crls: AtomicU64::new(0),
        })
    }

    /// The CA certificate, PEM: what peers put in their trust store.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A server certificate for `dns_names` plus the loopback addresses.
    pub fn server(&self, dns_names: &[&str]) -> Result<CertifiedKey, PkiError> {
        let mut params =
            CertificateParams::new(dns_names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name = distinguished_name(dns_names.first().unwrap_or(&"server"));
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A client certificate whose identity is the URI `identity`
    /// (for example `spiffe://cmk.local/control-plane`).
    pub fn client(&self, identity: &str) -> Result<CertifiedKey, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(identity);
        params.subject_alt_names = vec![SanType::URI(identity.try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    /// A client certificate with no SAN at all, only the common name `name`.
    pub fn client_with_common_name(&self, name: &str) -> Result<CertifiedKey, PkiError> {
        self.client_with_names(name, &[], &[])
    }

    /// A client certificate with the common name `common_name` and exactly
    /// the URI SANs `uris` and DNS SANs `dns_names`, in that order: for
    /// certificates whose identity is ambiguous or missing.
    pub fn client_with_names(
        &self,
        common_name: &str,
        uris: &[&str],
        dns_names: &[&str],
    ) -> Result<CertifiedKey, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(common_name);
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI((*uri).try_into()?));
        }
        for dns in dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName((*dns).try_into()?));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    /// A CRL of this CA revoking `revoked` (certificates it issued), issued
    /// a minute ago and due for renewal in a day.
    pub fn crl(&self, revoked: &[&CertifiedKey]) -> Result<Crl, PkiError> {
        let now = SystemTime::now();
        self.crl_between(
            revoked,
            now - Duration::from_secs(60),
            now + Duration::from_secs(86_400),
        )
    }

    /// A CRL of this CA revoking `revoked`, with the given thisUpdate and
    /// nextUpdate times (a nextUpdate in the past makes an expired CRL).
    pub fn crl_between(
        &self,
        revoked: &[&CertifiedKey],
        this_update: SystemTime,
        next_update: SystemTime,
    ) -> Result<Crl, PkiError> {
        let params = CertificateRevocationListParams {
            this_update: this_update.into(),
            next_update: next_update.into(),
            crl_number: SerialNumber::from(self.crls.fetch_add(1, Ordering::Relaxed) + 1),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|cert| RevokedCertParams {
                    serial_number: SerialNumber::from(cert.serial),
                    revocation_time: this_update.into(),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer)?;
        Ok(Crl {
            pem: crl.pem()?,
            der: crl.der().to_vec(),
        })
    }

    /// Writes the CA certificate to `path`.
    pub fn write_cert(&self, path: &Path) -> Result<(), PkiError> {
        write_file(path, &self.cert_pem, 0o644)
    }

    fn issue(&self, mut params: CertificateParams) -> Result<CertifiedKey, PkiError> {
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.use_authority_key_identifier_extension = true;
        let serial = self.issued.fetch_add(1, Ordering::Relaxed) + 1;
        params.serial_number = Some(SerialNumber::from(serial));
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial,
        })
    }
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| PkiError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    io::Write::write_all(&mut file, contents.as_bytes()).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_get_distinct_serials_and_crls_name_them() {
        let ca = Ca::new("test CA").expect("CA");
        let a = ca.client("spiffe://cmk.test/a").expect("cert");
        let b = ca.client("spiffe://cmk.test/a").expect("cert");
        assert_ne!(a.serial, b.serial);

        let crl = ca.crl(&[&a]).expect("CRL");
        assert!(
            crl.pem.starts_with("-----BEGIN X509 CRL-----"),
            "{}",
            crl.pem
        );
        assert!(!crl.der.is_empty());
        assert_ne!(ca.crl(&[&a]).expect("CRL"), crl, "a new CRL number");

        let now = SystemTime::now();
        assert!(
            ca.crl_between(&[], now, now - Duration::from_secs(1))
                .is_err(),
            "nextUpdate before thisUpdate"
        );
        assert!(!format!("{a:?}").contains("PRIVATE KEY"));
    }
}
