//! TLS for the uplink: rustls with the ring provider (no C crypto library to cross-compile for
//! ARM). The system trust store by default, a private CA with `ca_file`, a client certificate
//! for mutual TLS, server names always verified — unless `insecure_skip_verify`, for the lab,
//! logged loudly.

use std::path::Path;
use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// `mqtt.tls` as resolved from the config.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TlsSettings {
    pub ca_file: Option<std::path::PathBuf>,
    pub cert_file: Option<std::path::PathBuf>,
    pub key_file: Option<std::path::PathBuf>,
    pub insecure_skip_verify: bool,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut pem.as_slice()).collect();
    let certs = certs.map_err(|e| format!("{}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in the file", path.display()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| format!("{}: not a PEM key: {e}", path.display()))?
        .ok_or_else(|| format!("{}: no private key in the file", path.display()))
}

/// Which setting an error is about, for the config's error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    CaFile,
    CertFile,
    KeyFile,
}

/// Builds the rustls client configuration; errors name the setting at fault.
pub fn client_config(s: &TlsSettings) -> Result<Arc<ClientConfig>, (Field, String)> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions");
    let mut roots = RootCertStore::empty();
    match &s.ca_file {
        Some(ca) => {
            for c in read_certs(ca).map_err(|e| (Field::CaFile, e))? {
                roots
                    .add(c)
                    .map_err(|e| (Field::CaFile, format!("{}: {e}", ca.display())))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                let _ = roots.add(c);
            }
            if roots.is_empty() && !s.insecure_skip_verify {
                return Err((
                    Field::CaFile,
                    "no system trust store found (install ca-certificates) and no `ca_file` given"
                        .into(),
                ));
            }
        }
    }
    let builder = if s.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification))
    } else {
        builder.with_root_certificates(roots)
    };
    let config = match (&s.cert_file, &s.key_file) {
        (Some(cert), Some(key_file)) => {
            let certs = read_certs(cert).map_err(|e| (Field::CertFile, e))?;
            let key = read_key(key_file).map_err(|e| (Field::KeyFile, e))?;
            let identity = client_identity(certs, key).map_err(|(f, e)| {
                let file = if f == Field::KeyFile { key_file } else { cert };
                (f, format!("{}: {e}", file.display()))
            })?;
            builder.with_client_cert_resolver(Arc::new(ClientIdentity(identity)))
        }
        (None, None) => builder.with_no_client_auth(),
        (Some(_), None) => {
            return Err((
                Field::KeyFile,
                "a client certificate needs `key_file`".into(),
            ));
        }
        (None, Some(_)) => return Err((Field::CertFile, "a client key needs `cert_file`".into())),
    };
    Ok(Arc::new(config))
}

/// The client certificate and its key, checked only for belonging together. The broker judges
/// the certificate: rustls's own parse refuses an X.509 version 1 certificate (what
/// `openssl x509 -req` without extensions makes, as in mosquitto's TLS recipe) that mosquitto
/// accepts for mutual TLS.
fn client_identity(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, (Field, String)> {
    let signer = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| (Field::KeyFile, format!("unusable private key: {e}")))?;
    // The certificate carries the SubjectPublicKeyInfo as DER, byte for byte: finding the key's
    // own SPKI in it proves they belong together, with no X.509 parser in the way.
    if let Some(spki) = signer.public_key() {
        let spki: &[u8] = spki.as_ref();
        let cert: &[u8] = certs[0].as_ref();
        if !cert.windows(spki.len()).any(|w| w == spki) {
            return Err((
                Field::KeyFile,
                "this key does not belong to the certificate in `cert_file`".into(),
            ));
        }
    }
    Ok(Arc::new(CertifiedKey::new(certs, signer)))
}

#[derive(Debug)]
struct ClientIdentity(Arc<CertifiedKey>);

impl ResolvesClientCert for ClientIdentity {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// What to do about a TLS failure at connect time that rustls words for its own developers:
/// the broker's certificate is one rustls cannot accept (X.509 version 1, no subjectAltName).
pub fn explain(error: &str) -> Option<&'static str> {
    if error.contains("UnsupportedCertVersion") {
        Some(
            "the broker's certificate is X.509 version 1 (made by `openssl x509 -req` without extensions); \
             rustls accepts only version 3: re-issue it with a subjectAltName, e.g. \
             `openssl x509 -req ... -extfile <(printf 'subjectAltName=DNS:broker.example,IP:192.0.2.10')`",
        )
    } else if error.contains("NotValidForName") {
        Some(
            "the broker's certificate does not name the host in the URL in a subjectAltName \
             (a name only in the CN does not count for rustls): re-issue it with \
             `-extfile <(printf 'subjectAltName=DNS:<host in mqtt.url>')`, or use a name it lists",
        )
    } else {
        None
    }
}

/// Accepts any server certificate. Only behind `insecure_skip_verify: true`.
#[derive(Debug)]
struct NoVerification;

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
