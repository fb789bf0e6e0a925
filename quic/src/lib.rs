//! The QUIC endpoint settings that busd, its peer links and the clients
//! share. They exist because quinn's defaults are tuned for the public
//! internet (1,200–1,452-byte datagrams, kernel-default socket buffers), while
//! arrowbus moves megabyte Arrow batches, mostly inside one data centre or
//! over loopback. Two things decide throughput there:
//!
//! * **datagram size**: a 1 MiB batch in 1,452-byte packets is ~720 packets,
//!   each with its own header protection, AEAD seal, ACK bookkeeping and
//!   system call share. MTU discovery probes up to
//!   [`MTU_DISCOVERY_UPPER_BOUND`] (6,400 bytes), so loopback and jumbo-frame
//!   links carry ~165 packets per batch, sent ten per system call (GSO).
//!   Not higher: quinn hands the kernel up to ten datagrams per GSO send,
//!   the kernel refuses a send over 64 KiB, and quinn-udp drops such a send
//!   silently (EMSGSIZE). With 65 KB datagrams every multi-datagram send was
//!   lost; after three lost bursts quinn's black-hole detector fell back to
//!   1,200-byte datagrams for a minute. That cost a 100–200 ms stall on the
//!   first large batch of every connection and then half the throughput
//!   (measured: `bench/results/2026-11-22-quic-datagrams.md`);
//! * **receive buffers**: once datagrams are large, a kernel-default 208 KiB
//!   buffer holds three of them; a burst overflows it, the kernel drops
//!   datagrams, and QUIC's congestion controller halves its window for each
//!   loss. Both sides of every connection need the larger buffer.
//!
//! And one thing decides how fast a restarted node is noticed: its
//! **stateless-reset key**. A peer or client still holding a connection to
//! the killed process keeps sending to the same address; the new process
//! answers with a stateless reset, which the old connection honours only if
//! it is signed with the key the old process used. A key kept in the data
//! directory makes such connections close at once instead of at their idle
//! timeout, so Raft peers and clients reconnect in milliseconds.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::io::{self, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

/// Largest UDP payload an endpoint accepts (the IPv6 maximum): a peer may
/// send what it likes within it.
pub const MAX_UDP_PAYLOAD_BYTES: u16 = 65_527;

/// Largest datagram MTU discovery probes for, i.e. the most this endpoint
/// sends (see the crate docs): [`QUINN_GSO_SEGMENTS`] of them, plus IPv6
/// and UDP headers, must fit the kernel's 64 KiB limit for one GSO send.
pub const MTU_DISCOVERY_UPPER_BOUND: u16 = 6_400;

/// Datagrams quinn 0.11 puts into one GSO send (`MAX_TRANSMIT_SEGMENTS`
/// in quinn's `connection.rs`). Check it when upgrading quinn.
pub const QUINN_GSO_SEGMENTS: u32 = 10;

const _: () = assert!(
    QUINN_GSO_SEGMENTS * MTU_DISCOVERY_UPPER_BOUND as u32 + 40 + 8 <= 65_535,
    "a full GSO send would exceed 64 KiB and be dropped"
);

/// Default UDP send and receive buffer of every arrowbus endpoint: room for
/// ~128 full-size datagrams, a few batches in flight.
pub const DEFAULT_SOCKET_BUFFER_BYTES: usize = 8 * 1024 * 1024;

/// What the kernel granted for the socket buffers (it clamps requests to
/// `net.core.rmem_max` / `wmem_max` unless the process may override them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketBuffers {
    pub requested: usize,
    pub recv: usize,
    pub send: usize,
}

impl SocketBuffers {
    /// True when the kernel granted less than was asked for on either side.
    pub fn clamped(&self) -> bool {
        self.recv < self.requested || self.send < self.requested
    }

    /// A one-line operator hint for a clamped buffer.
    pub fn advice(&self) -> String {
        format!(
            "UDP socket buffers are {} KiB receive / {} KiB send, below the {} KiB asked for: \
             the kernel caps them at net.core.rmem_max / wmem_max; raise those \
             (sysctl -w net.core.rmem_max={} net.core.wmem_max={}) or run with CAP_NET_ADMIN, \
             or large batches will see packet drops and retransmissions",
            self.recv / 1024,
            self.send / 1024,
            self.requested / 1024,
            self.requested,
            self.requested
        )
    }
}

/// Bind a UDP socket for a QUIC endpoint and size its buffers.
pub fn bind_udp(addr: SocketAddr, buffer_bytes: usize) -> io::Result<(UdpSocket, SocketBuffers)> {
    let socket = UdpSocket::bind(addr)?;
    let buffers = set_socket_buffers(&socket, buffer_bytes);
    Ok((socket, buffers))
}

/// Ask for `bytes` of send and receive buffer; when the kernel's cap is
/// lower, try the privileged variant (honoured with CAP_NET_ADMIN, which a
/// root-run busd has), then report what was granted. Never fails: a small
/// buffer costs throughput, not correctness.
pub fn set_socket_buffers(socket: &UdpSocket, bytes: usize) -> SocketBuffers {
    let fd = socket.as_raw_fd();
    let want = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let mut granted = [0usize; 2];
    for (slot, (opt, force)) in [
        (libc::SO_RCVBUF, libc::SO_RCVBUFFORCE),
        (libc::SO_SNDBUF, libc::SO_SNDBUFFORCE),
    ]
    .into_iter()
    .enumerate()
    {
        let _ = setsockopt_int(fd, opt, want);
        // The kernel reports twice the usable size (it counts bookkeeping).
        if getsockopt_int(fd, opt).map(|v| v / 2) < Some(bytes) {
            let _ = setsockopt_int(fd, force, want);
        }
        granted[slot] = getsockopt_int(fd, opt).map(|v| v / 2).unwrap_or(0);
    }
    SocketBuffers {
        requested: bytes,
        recv: granted[0],
        send: granted[1],
    }
}

fn setsockopt_int(fd: libc::c_int, opt: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `fd` is an open socket for the duration of the call and the
    // option value points at a live c_int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn getsockopt_int(fd: libc::c_int, opt: libc::c_int) -> Option<usize> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is an open socket; `value` and `len` are live and sized
    // for a c_int, which is what SOL_SOCKET buffer options return.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            &mut value as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    if rc == 0 {
        usize::try_from(value).ok()
    } else {
        None
    }
}

/// Bytes of a stateless-reset key.
pub const RESET_KEY_BYTES: usize = 32;

/// The node's stateless-reset key from `path`, created (random, mode 0600,
/// fsynced) when missing. A file of the wrong length is replaced: the key is
/// no secret worth refusing to start over, and a new one only means that
/// connections from before the restart close at their idle timeout. The
/// second value says whether a damaged file was replaced.
pub fn load_or_create_reset_key(path: &Path) -> io::Result<([u8; RESET_KEY_BYTES], bool)> {
    let replaced = match std::fs::read(path) {
        Ok(bytes) => match <[u8; RESET_KEY_BYTES]>::try_from(bytes.as_slice()) {
            Ok(key) => return Ok((key, false)),
            Err(_) => true,
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    let mut key = [0u8; RESET_KEY_BYTES];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| io::Error::other("the system random generator failed"))?;
    let tmp = path.with_extension("tmp");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&key)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok((key, replaced))
}

/// Endpoint settings: accept datagrams up to [`MAX_UDP_PAYLOAD_BYTES`] and,
/// with `reset_key`, sign stateless resets with it (a server that restarts
/// keeps its key; see the crate docs).
pub fn endpoint_config(reset_key: Option<&[u8; RESET_KEY_BYTES]>) -> quinn::EndpointConfig {
    let mut config = match reset_key {
        Some(k) => {
            quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k)))
        }
        None => quinn::EndpointConfig::default(),
    };
    // The value is within QUIC's bounds (1,200..=65,527), so this cannot fail.
    let _ = config.max_udp_payload_size(MAX_UDP_PAYLOAD_BYTES);
    config
}

/// Apply the datagram-size settings to a connection's transport config.
pub fn tune_transport(transport: &mut quinn::TransportConfig) {
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_DISCOVERY_UPPER_BOUND);
    transport.mtu_discovery_config(Some(mtu));
}

/// A client-only QUIC endpoint on `socket`.
pub fn client_endpoint(socket: UdpSocket) -> io::Result<quinn::Endpoint> {
    let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
    quinn::Endpoint::new(endpoint_config(None), None, socket, runtime)
}

/// A server endpoint on `socket` whose stateless resets are signed with
/// the node's persistent `reset_key`.
pub fn server_endpoint(
    socket: UdpSocket,
    server: quinn::ServerConfig,
    reset_key: &[u8; RESET_KEY_BYTES],
) -> io::Result<quinn::Endpoint> {
    let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
    quinn::Endpoint::new(
        endpoint_config(Some(reset_key)),
        Some(server),
        socket,
        runtime,
    )
}

/// Read exactly `len` bytes from `recv` into a new vector, like
/// [`quinn::RecvStream::read_exact`] into `vec![0; len]` but without zeroing
/// the buffer first: the received chunks are appended as they come. A
/// megabyte batch body is otherwise written twice (zeroes, then data).
/// `len` must already be checked against the protocol's limits.
pub async fn read_exact_vec(
    recv: &mut quinn::RecvStream,
    len: usize,
) -> Result<Vec<u8>, quinn::ReadExactError> {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        match recv.read_chunk(len - buf.len(), true).await? {
            Some(chunk) => buf.extend_from_slice(&chunk.bytes),
            None => return Err(quinn::ReadExactError::FinishedEarly(buf.len())),
        }
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_granted_or_reported_as_clamped() {
        let (socket, buffers) = bind_udp("127.0.0.1:0".parse().unwrap(), 4 * 1024 * 1024).unwrap();
        assert_eq!(buffers.requested, 4 * 1024 * 1024);
        // The kernel grants at least its default and never more than asked
        // plus its own rounding; `clamped` must agree with the numbers.
        assert!(buffers.recv > 0 && buffers.send > 0);
        assert_eq!(
            buffers.clamped(),
            buffers.recv < buffers.requested || buffers.send < buffers.requested
        );
        assert!(buffers.advice().contains("net.core.rmem_max"));
        drop(socket);
    }

    #[test]
    fn reset_key_survives_a_restart_and_a_damaged_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("quic-reset-key");
        let (first, replaced) = load_or_create_reset_key(&path).unwrap();
        assert!(!replaced);
        assert_ne!(first, [0u8; RESET_KEY_BYTES], "the key must be random");
        let (again, replaced) = load_or_create_reset_key(&path).unwrap();
        assert_eq!(first, again);
        assert!(!replaced);
        std::fs::write(&path, b"short").unwrap();
        let (new, replaced) = load_or_create_reset_key(&path).unwrap();
        assert!(replaced);
        assert_ne!(new, first);
        assert_eq!(std::fs::read(&path).unwrap(), new.to_vec());
    }

    #[test]
    fn endpoints_accept_the_largest_udp_payload() {
        let config = endpoint_config(None);
        assert_eq!(
            config.get_max_udp_payload_size(),
            u64::from(MAX_UDP_PAYLOAD_BYTES)
        );
    }

    /// A tuned client and server on loopback move megabytes both ways: MTU
    /// discovery must settle above the 1,200-byte floor, and no datagram may
    /// be lost (a GSO send over 64 KiB is dropped whole, which quinn's
    /// black-hole detector then blames on the path MTU).
    #[tokio::test]
    async fn bulk_transfer_keeps_large_datagrams_and_loses_none() {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let key =
            quinn::rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let mut server =
            quinn::ServerConfig::with_single_cert(vec![cert.cert.der().clone()], key).unwrap();
        let mut t = quinn::TransportConfig::default();
        tune_transport(&mut t);
        server.transport_config(Arc::new(t));
        let mut roots = quinn::rustls::RootCertStore::empty();
        roots.add(cert.cert.der().clone()).unwrap();
        let mut client = quinn::ClientConfig::with_root_certificates(Arc::new(roots)).unwrap();
        let mut t = quinn::TransportConfig::default();
        tune_transport(&mut t);
        client.transport_config(Arc::new(t));

        let addr = "127.0.0.1:0".parse().unwrap();
        let (sock, _) = bind_udp(addr, DEFAULT_SOCKET_BUFFER_BYTES).unwrap();
        let server_ep = server_endpoint(sock, server, &[7u8; RESET_KEY_BYTES]).unwrap();
        let server_addr = server_ep.local_addr().unwrap();
        let (sock, _) = bind_udp(addr, DEFAULT_SOCKET_BUFFER_BYTES).unwrap();
        let client_ep = client_endpoint(sock).unwrap();

        const BYTES: usize = 16 * 1024 * 1024;
        let echo = tokio::spawn(async move {
            let conn = server_ep.accept().await.unwrap().await.unwrap();
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            let got = read_exact_vec(&mut recv, BYTES).await.unwrap();
            send.write_all(&got).await.unwrap();
            send.finish().unwrap();
            let _ = send.stopped().await;
            conn.stats()
        });
        let conn = client_ep
            .connect_with(client, server_addr, "localhost")
            .unwrap()
            .await
            .unwrap();
        let data: Vec<u8> = (0..BYTES).map(|i| (i % 251) as u8).collect();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        // In 1 MiB writes with pauses between, as batches arrive: each pause
        // lets the sender go idle, so every batch starts a new burst.
        for chunk in data.chunks(1024 * 1024) {
            send.write_all(chunk).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        send.finish().unwrap();
        let back = read_exact_vec(&mut recv, BYTES).await.unwrap();
        assert!(back == data, "echoed bytes differ");
        let server_stats = echo.await.unwrap();
        let client_stats = conn.stats();
        for (side, st) in [("client", client_stats), ("server", server_stats)] {
            assert_eq!(st.path.black_holes_detected, 0, "{side}: {st:?}");
            assert_eq!(st.path.lost_packets, 0, "{side}: {st:?}");
            assert!(
                st.path.current_mtu > 1_200 && st.path.current_mtu <= MTU_DISCOVERY_UPPER_BOUND,
                "{side}: MTU {} after a bulk transfer",
                st.path.current_mtu
            );
        }
    }
}
