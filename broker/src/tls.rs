//! TLS material for the QUIC endpoint. TLS is always on: `busd dev` makes a
//! private CA and a leaf certificate in its data directory on first start, and
//! clients trust that CA (through the profile `busd dev` writes). Production
//! nodes are given a certificate and key by their config.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no usable {what} (expected PEM)")]
    Pem { what: &'static str, path: PathBuf },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration rejected: {0}")]
    Config(#[from] rustls::Error),
    #[error("TLS verifier: {0}")]
    Verifier(String),
}

/// Paths of a node's TLS files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA clients should trust (for dev certificates: our own CA).
    pub ca: Option<PathBuf>,
}

/// Create a private CA and a leaf certificate for `names` (DNS names or IP
/// addresses) in `dir`, unless they exist already (then they are reused, so
/// clients that trust the CA keep working across restarts).
pub fn ensure_dev_certificates(dir: &Path, names: &[String]) -> Result<TlsFiles, TlsError> {
    let files = TlsFiles {
        cert: dir.join("node.pem"),
        key: dir.join("node.key"),
        ca: Some(dir.join("ca.pem")),
    };
    let ca_path = dir.join("ca.pem");
    if files.cert.exists() && files.key.exists() && ca_path.exists() {
        return Ok(files);
    }
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "arrowbus dev CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)?;

    let leaf_key = rcgen::KeyPair::generate()?;
    let mut leaf_params = rcgen::CertificateParams::new(names.to_vec())?;
    leaf_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "arrowbus node");
    let leaf = leaf_params.signed_by(&leaf_key, &ca)?;

    write_private(&files.key, leaf_key.serialize_pem().as_bytes())?;
    write_file(&files.cert, leaf.pem().as_bytes())?;
    write_file(&ca_path, ca.pem().as_bytes())?;
    Ok(files)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    std::fs::write(path, bytes).map_err(|source| TlsError::Write {
        path: path.to_owned(),
        source,
    })
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| TlsError::Write {
            path: path.to_owned(),
            source,
        })?;
    f.write_all(bytes).map_err(|source| TlsError::Write {
        path: path.to_owned(),
        source,
    })
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        what: "certificate",
        path: path.to_owned(),
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what: "certificate",
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        what: "private key",
        path: path.to_owned(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::Pem {
        what: "private key",
        path: path.to_owned(),
    })
}

/// rustls server config for QUIC: TLS 1.3 only (QUIC requires it), both
/// ALPNs (clients and peer nodes), the one crypto provider of the workspace
/// (ring). With `peer_ca`, connecting nodes may present a certificate signed
/// by it; the peer protocol is served only to those that did (clients
/// present none and are not asked to).
pub fn server_crypto(
    files: &TlsFiles,
    peer_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut cfg = match peer_ca {
        Some(ca) => {
            let roots = Arc::new(root_store(ca)?);
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs, key)?
        }
        None => builder.with_no_client_auth().with_single_cert(certs, key)?,
    };
    cfg.alpn_protocols = vec![
        arrowbus_wire::frame::ALPN.to_vec(),
        arrowbus_wire::peer::PEER_ALPN.to_vec(),
    ];
    // 0-RTT data can be replayed; a replayed publish would duplicate rows.
    cfg.max_early_data_size = 0;
    Ok(Arc::new(cfg))
}

/// The QUIC client config a node uses to reach its peers: it verifies them
/// against `ca` and authenticates itself with its own certificate.
pub fn peer_client_config(files: &TlsFiles, ca: &Path) -> Result<quinn::ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(root_store(ca)?)
        .with_client_auth_cert(load_certs(&files.cert)?, load_key(&files.key)?)?;
    crypto.alpn_protocols = vec![arrowbus_wire::peer::PEER_ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(std::time::Duration::from_secs(2)));
    arrowbus_quic::tune_transport(&mut transport);
    // A dead peer is noticed by RPC timeouts first; this only frees the
    // connection state.
    transport.max_idle_timeout(Some(quinn::VarInt::from_u32(10_000).into()));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

fn root_store(ca: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots
            .add(c)
            .map_err(|e| TlsError::Verifier(format!("{}: {e}", ca.display())))?;
    }
    Ok(roots)
}
