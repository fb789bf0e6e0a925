//! One QUIC connection to a broker, frame I/O on its streams, and unary
//! requests (one request per bidirectional stream).

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use arrowbus_wire::codec::Message;
use arrowbus_wire::{
    decode_control, encode_frame, ClientMessage, Frame, FrameError, FrameHeader, ServerMessage,
    FRAME_HEADER_BYTES,
};
use bytes::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::config::ClientConfig;
use crate::error::{Error, Result};

pub(crate) struct Conn {
    pub(crate) connection: quinn::Connection,
    // Kept so the endpoint (and its socket) lives as long as the connection.
    _endpoint: quinn::Endpoint,
    pub(crate) config: ClientConfig,
}

impl Conn {
    pub(crate) async fn connect(config: ClientConfig) -> Result<Self> {
        let crypto = client_crypto(&config)?;
        let mut last_err = None;
        for addr_text in &config.brokers {
            let addr = match resolve(addr_text) {
                Ok(a) => a,
                Err(e) => {
                    last_err = Some(e);
                    continue;
                }
            };
            let bind: SocketAddr = if addr.is_ipv6() {
                "[::]:0"
            } else {
                "0.0.0.0:0"
            }
            .parse()
            .map_err(|e| Error::Config(format!("bind address: {e}")))?;
            let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| Error::Connect {
                addr: addr_text.clone(),
                reason: format!("cannot open a UDP socket: {e}"),
            })?;
            let mut client_cfg = quinn::ClientConfig::new(crypto.clone());
            client_cfg.transport_config(Arc::new(transport_config()));
            endpoint.set_default_client_config(client_cfg);
            let server_name = config
                .server_name
                .clone()
                .unwrap_or_else(|| host_of(addr_text));
            let connecting = match endpoint.connect(addr, &server_name) {
                Ok(c) => c,
                Err(e) => {
                    last_err = Some(Error::Connect {
                        addr: addr_text.clone(),
                        reason: e.to_string(),
                    });
                    continue;
                }
            };
            match tokio::time::timeout(config.request_timeout, connecting).await {
                Ok(Ok(connection)) => {
                    return Ok(Self {
                        connection,
                        _endpoint: endpoint,
                        config,
                    })
                }
                Ok(Err(e)) => {
                    last_err = Some(Error::Connect {
                        addr: addr_text.clone(),
                        reason: explain_connect_error(&e),
                    })
                }
                Err(_) => {
                    last_err = Some(Error::Connect {
                        addr: addr_text.clone(),
                        reason: format!(
                            "no answer within {} ms (is busd running there?)",
                            config.request_timeout.as_millis()
                        ),
                    })
                }
            }
        }
        Err(last_err.unwrap_or_else(|| Error::Config("no broker address given".into())))
    }

    /// Send one request and wait for its one answer.
    pub(crate) async fn request(&self, msg: &ClientMessage) -> Result<ServerMessage> {
        let timeout_ms = self.config.request_timeout.as_millis() as u64;
        let fut = async {
            let (mut send, mut recv) = self.connection.open_bi().await.map_err(transport)?;
            write_frame(&mut send, msg, &[]).await?;
            let _ = send.finish();
            match read_frame::<ServerMessage>(&mut recv).await? {
                Some(f) => Ok(f.msg),
                None => Err(Error::Protocol(
                    "broker closed the stream without answering".into(),
                )),
            }
        };
        match tokio::time::timeout(self.config.request_timeout, fut).await {
            Ok(Ok(ServerMessage::Error(e))) => Err(Error::from_reply(&e)),
            Ok(r) => r,
            Err(_) => Err(Error::Timeout(timeout_ms)),
        }
    }
}

fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .map_err(|e| Error::Config(format!("broker address {addr:?}: {e} (expected HOST:PORT)")))?
        .next()
        .ok_or_else(|| Error::Config(format!("broker address {addr:?} resolves to nothing")))
}

fn host_of(addr: &str) -> String {
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h,
        None => addr,
    };
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned()
}

fn explain_connect_error(e: &quinn::ConnectionError) -> String {
    let text = e.to_string();
    if text.contains("UnknownIssuer") || text.contains("certificate") {
        format!("{text}: the broker's certificate is not trusted; pass --ca (or ARROWBUS_CA) with the CA file that signed it")
    } else {
        text
    }
}

fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // Bounded windows: a subscriber's memory is bounded by its credit, and
    // the transport must not buffer more than that behind it.
    t.receive_window(quinn::VarInt::from_u32(64 * 1024 * 1024))
        .stream_receive_window(quinn::VarInt::from_u32(32 * 1024 * 1024))
        .send_window(32 * 1024 * 1024)
        .keep_alive_interval(Some(Duration::from_secs(5)))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(30)) {
        t.max_idle_timeout(Some(idle));
    }
    t
}

fn client_crypto(config: &ClientConfig) -> Result<Arc<quinn::crypto::rustls::QuicClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = config.ca.as_ref().ok_or_else(|| {
        Error::Config(
            "no CA file: pass --ca FILE (or ARROWBUS_CA), or use the profile written by `busd dev`"
                .into(),
        )
    })?;
    let pem = std::fs::read(ca)
        .map_err(|e| Error::Config(format!("cannot read CA file {}: {e}", ca.display())))?;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| Error::Config(format!("CA file {}: {e}", ca.display())))?;
        roots
            .add(cert)
            .map_err(|e| Error::Config(format!("CA file {}: {e}", ca.display())))?;
    }
    if roots.is_empty() {
        return Err(Error::Config(format!(
            "CA file {} holds no certificate",
            ca.display()
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    crypto.alpn_protocols = vec![arrowbus_wire::frame::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)
        .map_err(|e| Error::Config(e.to_string()))?;
    Ok(Arc::new(quic))
}

pub(crate) fn transport<E: std::fmt::Display>(e: E) -> Error {
    Error::Transport(e.to_string())
}

// Same frame reader as the broker's: the two sides may not share a crate
// with I/O in it (wire is a pure codec), and the function is short.
pub(crate) async fn read_frame<M: Message>(
    recv: &mut quinn::RecvStream,
) -> Result<Option<Frame<M>>> {
    let mut head = [0u8; FRAME_HEADER_BYTES];
    match recv.read_exact(&mut head).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(transport(e)),
    }
    let header = FrameHeader::decode(&head, M::DIRECTION).map_err(protocol)?;
    let mut control = vec![0u8; header.control_len as usize];
    recv.read_exact(&mut control).await.map_err(transport)?;
    let msg = decode_control::<M>(&control).map_err(protocol)?;
    let mut body = vec![0u8; header.body_len as usize];
    recv.read_exact(&mut body).await.map_err(transport)?;
    Ok(Some(Frame { msg, body }))
}

pub(crate) async fn write_frame(
    send: &mut quinn::SendStream,
    msg: &ClientMessage,
    body: &[u8],
) -> Result<()> {
    write_frame_chunks(send, msg, vec![Bytes::copy_from_slice(body)]).await
}

/// Write a frame whose body is the concatenation of `body` chunks (sent
/// without copying them together).
pub(crate) async fn write_frame_chunks(
    send: &mut quinn::SendStream,
    msg: &ClientMessage,
    body: Vec<Bytes>,
) -> Result<()> {
    let len: usize = body.iter().map(|b| b.len()).sum();
    let head = encode_frame(msg, len).map_err(|e| match e {
        FrameError::BodyTooLarge { len } => Error::BatchTooLarge(format!(
            "batch of {len} bytes exceeds the broker limit of {} bytes; split it",
            arrowbus_wire::limits::MAX_BATCH_BYTES
        )),
        other => protocol(other),
    })?;
    let mut chunks = Vec::with_capacity(body.len() + 1);
    chunks.push(Bytes::from(head));
    chunks.extend(body);
    send.write_all_chunks(&mut chunks).await.map_err(transport)
}

fn protocol(e: FrameError) -> Error {
    Error::Protocol(e.to_string())
}
