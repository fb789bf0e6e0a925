//! One QUIC connection to a broker, frame I/O on its streams, and unary
//! requests (one request per bidirectional stream).

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrowbus_wire::codec::Message;
use arrowbus_wire::{
    decode_control, encode_frame, ClientMessage, ErrorCode, Frame, FrameError, FrameHeader,
    ServerMessage, FRAME_HEADER_BYTES,
};
use bytes::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::config::ClientConfig;
use crate::error::{Error, Result};

/// Connections to the nodes of a cluster. Unary requests go to any node and
/// follow `NotLeader` hints; producer and subscriber streams are opened on
/// the node that leads their partition ([`Conn::connection_to`]).
pub(crate) struct Conn {
    endpoint: quinn::Endpoint,
    pub(crate) config: ClientConfig,
    /// Open connections by node address.
    conns: Mutex<HashMap<String, quinn::Connection>>,
    /// Node id -> address, from the cluster's metadata.
    nodes: Mutex<BTreeMap<u64, String>>,
    /// The address unary requests go to first (the last that worked).
    primary: Mutex<String>,
}

/// How long to wait for one node to answer a handshake before trying
/// another: a dead leader must not stall failover.
const NODE_CONNECT_TIMEOUT: Duration = Duration::from_millis(750);
/// Handshake budget for a node whose last connection died.
const DEAD_NODE_CONNECT_TIMEOUT: Duration = Duration::from_millis(250);
/// First and largest pause between retries of a request that found no leader.
const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(50);
const RETRY_BACKOFF_MAX: Duration = Duration::from_millis(500);

impl Conn {
    pub(crate) async fn connect(config: ClientConfig) -> Result<Self> {
        let client_cfg = quic_client_config(&config)?;
        let first = config
            .brokers
            .first()
            .cloned()
            .ok_or_else(|| Error::Config("no broker address given".into()))?;
        let bind: SocketAddr = if resolve(&first).map(|a| a.is_ipv6()).unwrap_or(false) {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        }
        .parse()
        .map_err(|e| Error::Config(format!("bind address: {e}")))?;
        // The client receives as much as it sends (acks, subscribed
        // batches): it needs the same socket buffers as the broker.
        let endpoint = arrowbus_quic::bind_udp(bind, arrowbus_quic::DEFAULT_SOCKET_BUFFER_BYTES)
            .and_then(|(socket, buffers)| {
                if buffers.clamped() {
                    tracing::debug!("{}", buffers.advice());
                }
                arrowbus_quic::client_endpoint(socket)
            });
        let mut endpoint = endpoint.map_err(|e| Error::Connect {
            addr: first.clone(),
            reason: format!("cannot open a UDP socket: {e}"),
        })?;
        endpoint.set_default_client_config(client_cfg);
        let conn = Self {
            endpoint,
            config,
            conns: Mutex::new(HashMap::new()),
            nodes: Mutex::new(BTreeMap::new()),
            primary: Mutex::new(first),
        };
        let mut last_err = None;
        for addr in conn.config.brokers.clone() {
            match conn.connect_addr(&addr, conn.config.request_timeout).await {
                Ok(_) => {
                    *lock(&conn.primary) = addr;
                    return Ok(conn);
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| Error::Config("no broker address given".into())))
    }

    async fn connect_addr(&self, addr_text: &str, timeout: Duration) -> Result<quinn::Connection> {
        let mut timeout = timeout;
        if let Some(c) = lock(&self.conns).get(addr_text) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
            // Its last connection died: likely down, so give up on it fast
            // (callers retry) rather than stall failover on a silent node.
            timeout = timeout.min(DEAD_NODE_CONNECT_TIMEOUT);
        }
        let addr = resolve(addr_text)?;
        let server_name = self
            .config
            .server_name
            .clone()
            .unwrap_or_else(|| host_of(addr_text));
        let connecting = self
            .endpoint
            .connect(addr, &server_name)
            .map_err(|e| Error::Connect {
                addr: addr_text.to_owned(),
                reason: e.to_string(),
            })?;
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(timeout, connecting).await;
        tracing::debug!(
            addr = addr_text,
            ms = started.elapsed().as_millis() as u64,
            ok = matches!(result, Ok(Ok(_))),
            "QUIC handshake"
        );
        let connection = match result {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(Error::Connect {
                    addr: addr_text.to_owned(),
                    reason: explain_connect_error(&e),
                })
            }
            Err(_) => {
                return Err(Error::Connect {
                    addr: addr_text.to_owned(),
                    reason: format!(
                        "no answer within {} ms (is busd running there?)",
                        timeout.as_millis()
                    ),
                })
            }
        };
        lock(&self.conns).insert(addr_text.to_owned(), connection.clone());
        Ok(connection)
    }

    /// A connection to node `id` (its address from the cluster metadata).
    pub(crate) async fn connection_to(&self, id: u64) -> Result<quinn::Connection> {
        let known = lock(&self.nodes).get(&id).cloned();
        let addr = match known {
            Some(a) => a,
            None => {
                self.refresh_nodes().await?;
                // A node the cluster just added (or whose metadata the
                // answering node has not caught up to yet): unreachable for
                // now, which `request` retries, not a protocol violation.
                lock(&self.nodes)
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| Error::Connect {
                        addr: format!("node {id}"),
                        reason: "not in the cluster metadata this client has seen yet".into(),
                    })?
            }
        };
        self.connect_addr(&addr, NODE_CONNECT_TIMEOUT.min(self.config.request_timeout))
            .await
    }

    /// The connection unary requests use (reconnecting or moving to another
    /// known node if it died).
    pub(crate) async fn primary(&self) -> Result<quinn::Connection> {
        let primary = lock(&self.primary).clone();
        let timeout = NODE_CONNECT_TIMEOUT.min(self.config.request_timeout);
        // A primary whose connection just died is probably down: ask the
        // other known nodes first instead of waiting for a handshake with it.
        let primary_died = lock(&self.conns)
            .get(&primary)
            .is_some_and(|c| c.close_reason().is_some());
        if primary_died {
            let others: Vec<String> = lock(&self.nodes)
                .values()
                .chain(self.config.brokers.iter())
                .filter(|a| **a != primary)
                .cloned()
                .collect();
            for addr in others {
                if let Ok(c) = self.connect_addr(&addr, timeout).await {
                    *lock(&self.primary) = addr;
                    return Ok(c);
                }
            }
        }
        match self.connect_addr(&primary, timeout).await {
            Ok(c) => Ok(c),
            Err(first_err) => {
                let mut candidates: Vec<String> = lock(&self.nodes).values().cloned().collect();
                candidates.extend(self.config.brokers.iter().cloned());
                for addr in candidates {
                    if addr == primary {
                        continue;
                    }
                    if let Ok(c) = self.connect_addr(&addr, timeout).await {
                        *lock(&self.primary) = addr;
                        return Ok(c);
                    }
                }
                Err(first_err)
            }
        }
    }

    /// Learn the cluster's nodes (id and address) from any node.
    pub(crate) async fn refresh_nodes(&self) -> Result<()> {
        let connection = self.primary().await?;
        let reply = tokio::time::timeout(
            self.config.request_timeout,
            unary_on(&connection, &ClientMessage::Metadata),
        )
        .await
        .map_err(|_| Error::Timeout(self.config.request_timeout.as_millis() as u64))??;
        match reply {
            ServerMessage::Metadata(m) => {
                let mut nodes = lock(&self.nodes);
                nodes.clear();
                for n in m.nodes {
                    nodes.insert(n.id, n.addr);
                }
                Ok(())
            }
            ServerMessage::Error(e) => Err(Error::from_reply(&e)),
            _ => Err(Error::Protocol("unexpected reply to Metadata".into())),
        }
    }

    pub(crate) fn known_nodes(&self) -> BTreeMap<u64, String> {
        lock(&self.nodes).clone()
    }

    pub(crate) fn is_connected(&self) -> bool {
        let primary = lock(&self.primary).clone();
        lock(&self.conns)
            .get(&primary)
            .is_some_and(|c| c.close_reason().is_none())
    }

    pub(crate) fn close(&self) {
        for c in lock(&self.conns).values() {
            c.close(0u32.into(), b"client closed");
        }
    }

    /// One request to one node (`None`: the primary), one answer.
    async fn request_once(&self, node: Option<u64>, msg: &ClientMessage) -> Result<ServerMessage> {
        let timeout_ms = self.config.request_timeout.as_millis() as u64;
        let fut = async {
            let connection = match node {
                Some(id) => self.connection_to(id).await?,
                None => self.primary().await?,
            };
            unary_on(&connection, msg).await
        };
        match tokio::time::timeout(self.config.request_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout(timeout_ms)),
        }
    }

    /// One request to one node; its error reply is returned as is.
    pub(crate) async fn request_to(&self, node: u64, msg: &ClientMessage) -> Result<ServerMessage> {
        self.request_once(Some(node), msg).await
    }

    /// Send one request and wait for its answer, following `NotLeader`
    /// hints and retrying while the cluster elects a leader, until the
    /// request timeout.
    pub(crate) async fn request(&self, msg: &ClientMessage) -> Result<ServerMessage> {
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        let mut target = None;
        let mut backoff = RETRY_BACKOFF_MIN;
        loop {
            let res = self.request_once(target, msg).await;
            let retry_to = match &res {
                Ok(ServerMessage::Error(e)) if e.code == ErrorCode::NotLeader as u16 => {
                    Some(e.leader_hint)
                }
                Ok(ServerMessage::Error(e)) if e.code == ErrorCode::ShuttingDown as u16 => {
                    Some(None)
                }
                Err(Error::Transport(_) | Error::Connect { .. }) => Some(None),
                _ => None,
            };
            match (retry_to, res) {
                (Some(hint), res) if tokio::time::Instant::now() + backoff < deadline => {
                    if hint.is_some() && hint != target {
                        target = hint;
                        continue;
                    }
                    target = hint;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
                    let _ = res;
                }
                (_, Ok(ServerMessage::Error(e))) => return Err(Error::from_reply(&e)),
                (_, res) => return res,
            }
        }
    }
}

/// One request on its own stream of `connection`, one answer.
async fn unary_on(connection: &quinn::Connection, msg: &ClientMessage) -> Result<ServerMessage> {
    let (mut send, mut recv) = connection.open_bi().await.map_err(transport)?;
    write_frame(&mut send, msg, &[]).await?;
    let _ = send.finish();
    match read_frame::<ServerMessage>(&mut recv).await? {
        Some(f) => Ok(f.msg),
        None => Err(Error::Protocol(
            "broker closed the stream without answering".into(),
        )),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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

/// The QUIC client settings every connection of this client uses: TLS 1.3
/// verified against `config.ca`, the transport limits below, and the tuned
/// datagram sizes. Public (hidden) for `busbench transport`, which measures
/// the transport alone with exactly these settings.
#[doc(hidden)]
pub fn quic_client_config(config: &ClientConfig) -> Result<quinn::ClientConfig> {
    let mut cfg = quinn::ClientConfig::new(client_crypto(config)?);
    cfg.transport_config(Arc::new(transport_config()));
    Ok(cfg)
}

fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // Bounded windows: a subscriber's memory is bounded by its credit, and
    // the transport must not buffer more than that behind it.
    t.receive_window(quinn::VarInt::from_u32(64 * 1024 * 1024))
        .stream_receive_window(quinn::VarInt::from_u32(32 * 1024 * 1024))
        .send_window(32 * 1024 * 1024)
        // A node that dies silently (kill -9, power loss, partition) must
        // be noticed in seconds, not at the 30 s default: its partitions'
        // producers and subscribers then move to the new leader. Pings every
        // 500 ms cost a few bytes per second per node.
        .keep_alive_interval(Some(Duration::from_millis(400)))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    arrowbus_quic::tune_transport(&mut t);
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(2)) {
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
    let control = arrowbus_quic::read_exact_vec(recv, header.control_len as usize)
        .await
        .map_err(transport)?;
    let msg = decode_control::<M>(&control).map_err(protocol)?;
    let body = arrowbus_quic::read_exact_vec(recv, header.body_len as usize)
        .await
        .map_err(transport)?;
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
