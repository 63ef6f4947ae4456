//! TLS for both kinds of connection the connector makes (SQL sessions through
//! tokio-postgres, and its own replication connection), with libpq's
//! `sslmode` meanings: `disable`; `prefer` (TLS when the server offers it);
//! `require` (TLS always, the server's certificate not checked, as libpq does
//! without a root certificate); `verify-ca` (the certificate chains to a trusted
//! root); `verify-full` (and names the host). Trusted roots: the system's, plus
//! `sslrootcert=FILE` (PEM) from the connection string.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_postgres::config::SslMode;

use oppen_connector_api::Error;

/// A connection string ready to connect: tokio-postgres's settings and the
/// TLS configuration they ask for.
#[derive(Clone)]
pub struct DbConfig {
    pub sql: tokio_postgres::Config,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for DbConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbConfig")
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl DbConfig {
    /// Parses a connection string (libpq URL or `key=value` form).
    pub fn parse(url: &str) -> Result<Self, Error> {
        let (rest, options) = split_options(url);
        let sql: tokio_postgres::Config = rest
            .parse()
            .map_err(|e| Error::Config(format!("source.postgres.url: {e}")))?;
        if options.verify != Verify::Nothing && sql.get_ssl_mode() == SslMode::Disable {
            return Err(Error::Config(
                "source.postgres.url: sslmode conflicts".into(),
            ));
        }
        let tls = client_config(sql.get_ssl_mode(), &options)?;
        Ok(DbConfig { sql, tls })
    }

    /// Opens a SQL session; its connection runs on a task whose handle is returned.
    pub async fn connect(
        &self,
    ) -> Result<
        (
            tokio_postgres::Client,
            tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
        ),
        tokio_postgres::Error,
    > {
        match &self.tls {
            None => {
                let (client, connection) = self.sql.connect(tokio_postgres::NoTls).await?;
                Ok((client, tokio::spawn(connection)))
            }
            Some(tls) => {
                let make = tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone());
                let (client, connection) = self.sql.connect(make).await?;
                Ok((client, tokio::spawn(connection)))
            }
        }
    }
}

/// The error for a server certificate the settings do not trust, if `e` (or
/// an error under it) is one: not transient, and it says what to do.
pub fn certificate_error(e: &(dyn std::error::Error + 'static)) -> Option<Error> {
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(rustls::Error::InvalidCertificate(c)) = err.downcast_ref::<rustls::Error>() {
            return Some(Error::Config(format!(
                "the server's TLS certificate is not trusted ({c:?}): give the CA that signed it \
                 as sslrootcert=FILE in the URL, or use sslmode=require to encrypt without \
                 checking it"
            )));
        }
        // An I/O error that wraps another one: look inside it.
        current = match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
}

/// How far the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verify {
    /// Not at all (`prefer`, `require`): encryption against eavesdropping only.
    #[default]
    Nothing,
    /// The chain to a trusted root (`verify-ca`).
    Chain,
    /// The chain and the host name (`verify-full`).
    Full,
}

/// The TLS settings of a connection string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    pub verify: Verify,
    pub root_cert: Option<PathBuf>,
}

/// Takes the TLS options tokio-postgres does not know (`sslmode=verify-ca`,
/// `sslmode=verify-full`, `sslrootcert`) out of a connection string, in URL or
/// `key=value` form; the verify modes become `sslmode=require` for tokio-postgres.
pub fn split_options(url: &str) -> (String, TlsOptions) {
    let mut options = TlsOptions::default();
    let mut take = |key: &str, value: &str| -> Option<String> {
        match (key, value) {
            ("sslmode", "verify-full") => {
                options.verify = Verify::Full;
                Some("sslmode=require".into())
            }
            ("sslmode", "verify-ca") => {
                options.verify = Verify::Chain;
                Some("sslmode=require".into())
            }
            ("sslrootcert", path) => {
                options.root_cert = Some(PathBuf::from(
                    percent_encoding::percent_decode_str(path)
                        .decode_utf8_lossy()
                        .into_owned(),
                ));
                None
            }
            _ => Some(format!("{key}={value}")),
        }
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            Some((base, query)) => {
                let kept: Vec<String> = query
                    .split('&')
                    .filter(|p| !p.is_empty())
                    .filter_map(|p| {
                        let (k, v) = p.split_once('=').unwrap_or((p, ""));
                        take(k, v)
                    })
                    .collect();
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
            None => url.to_string(),
        }
    } else {
        url.split_whitespace()
            .filter_map(|p| match p.split_once('=') {
                Some((k, v)) => take(k.trim(), v.trim()),
                None => Some(p.to_string()),
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    (rest, options)
}

/// The rustls client configuration for these options, or `None` when TLS is off.
pub fn client_config(
    mode: SslMode,
    options: &TlsOptions,
) -> Result<Option<Arc<rustls::ClientConfig>>, Error> {
    if mode == SslMode::Disable {
        return Ok(None);
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS: {e}")))?;
    let config = match options.verify {
        Verify::Nothing => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Relaxed {
                chain: None,
                algorithms: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth(),
        Verify::Chain | Verify::Full => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if let Some(path) = &options.root_cert {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| Error::Config(format!("sslrootcert {}: {e}", path.display())))?;
                if certs.is_empty() {
                    return Err(Error::Config(format!(
                        "sslrootcert {}: no PEM certificate in it",
                        path.display()
                    )));
                }
                for cert in certs {
                    roots.add(cert).map_err(|e| {
                        Error::Config(format!("sslrootcert {}: {e}", path.display()))
                    })?;
                }
            }
            let algorithms = provider.signature_verification_algorithms;
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| {
                Error::Config(format!(
                    "TLS: no trusted root certificate ({e}); give sslrootcert=FILE"
                ))
            })?;
            let verifier: Arc<dyn ServerCertVerifier> = if options.verify == Verify::Chain {
                Arc::new(Relaxed {
                    chain: Some(webpki),
                    algorithms,
                })
            } else {
                webpki
            };
            builder
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth()
        }
    };
    Ok(Some(Arc::new(config)))
}

/// The relaxed checks of libpq's weaker modes: `sslmode=require` without a
/// root certificate accepts any certificate (`chain: None`), `verify-ca` checks
/// the chain to a trusted root but not the host name. Both still check that the
/// server holds its certificate's key.
#[derive(Debug)]
struct Relaxed {
    chain: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Relaxed {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_modes_and_root_certs_leave_the_url_for_tokio_postgres() {
        let (rest, o) = split_options(
            "postgres://u:p@db.example:5432/econ?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
        );
        assert_eq!(
            rest,
            "postgres://u:p@db.example:5432/econ?sslmode=require&application_name=x"
        );
        assert_eq!(o.verify, Verify::Full);
        assert_eq!(o.root_cert, Some(PathBuf::from("/etc/ca.pem")));
        let (rest, o) = split_options("host=db sslmode=verify-ca sslrootcert=/ca.pem dbname=econ");
        assert_eq!(rest, "host=db sslmode=require dbname=econ");
        assert_eq!(o.verify, Verify::Chain);
        let (rest, o) = split_options("postgres://db/econ?sslmode=require");
        assert_eq!(rest, "postgres://db/econ?sslmode=require");
        assert_eq!(o, TlsOptions::default());
        let (rest, _) = split_options("postgres://db/econ?sslrootcert=/ca.pem");
        assert_eq!(rest, "postgres://db/econ");
    }
}
