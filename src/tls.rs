//! TLS for the uplink: rustls with the ring provider (no C crypto library to cross-compile for
//! ARM). The system trust store by default, a private CA with `ca_file`, a client certificate
//! for mutual TLS, server names always verified — unless `insecure_skip_verify`, for the lab,
//! logged loudly.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
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
        (Some(cert), Some(key)) => {
            let certs = read_certs(cert).map_err(|e| (Field::CertFile, e))?;
            let key = read_key(key).map_err(|e| (Field::KeyFile, e))?;
            builder.with_client_auth_cert(certs, key).map_err(|e| {
                (
                    Field::KeyFile,
                    format!("the key does not fit the certificate: {e}"),
                )
            })?
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
