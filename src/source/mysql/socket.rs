//! A buffered reader for the replication stream. mysql_cdc 0.2 reads every binlog packet with two
//! unbuffered `read`s (header, then body), so catching up costs about ten system calls per
//! single-row transaction. After mysql_cdc's handshake the engine reads the stream itself, through
//! a 64 KiB buffer, from a duplicate of that socket; mysql_cdc still decodes the events.
//!
//! mysql_cdc also writes each packet in three `write`s with Nagle's algorithm on, so during its
//! handshake every command waits for the server's delayed ACK (about 40 ms each, over 200 ms per
//! connect): `with_nodelay` sets TCP_NODELAY on the socket as soon as it appears.
//!
//! The socket is found on Linux as the one TCP connection to the server's port opened during the
//! handshake (`/proc/self/fd`, then the peer address of each new socket). Elsewhere, or when
//! another connection to the same port was opened meanwhile (two candidates), mysql_cdc keeps
//! reading as before.

use std::collections::HashSet;
use std::io::{self, BufRead, BufReader, Read};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// MySQL packets carry at most this many payload bytes; a longer payload continues in the next.
const MAX_PAYLOAD: usize = 0xFF_FFFF;

/// Reads MySQL protocol packets from a buffered stream.
pub struct PacketReader<R> {
    inner: BufReader<R>,
}

impl<R: Read> PacketReader<R> {
    pub fn new(inner: R) -> Self {
        PacketReader {
            inner: BufReader::with_capacity(64 * 1024, inner),
        }
    }

    /// A whole packet is already buffered: the next `read_packet` will not wait.
    pub fn packet_ready(&self) -> bool {
        let b = self.inner.buffer();
        b.len() >= 4 && b.len() >= 4 + u32::from_le_bytes([b[0], b[1], b[2], 0]) as usize
    }

    /// The next packet's payload, with a payload split over several packets joined.
    pub fn read_packet(&mut self) -> io::Result<Vec<u8>> {
        if self.packet_ready() {
            // The common case while catching up: copy the payload out of the buffer, without
            // zeroing a vector first.
            let b = self.inner.buffer();
            let len = u32::from_le_bytes([b[0], b[1], b[2], 0]) as usize;
            if len < MAX_PAYLOAD {
                let out = b[4..4 + len].to_vec();
                self.inner.consume(4 + len);
                return Ok(out);
            }
        }
        let mut out = Vec::new();
        loop {
            let mut header = [0u8; 4];
            self.inner.read_exact(&mut header)?;
            let len = u32::from_le_bytes([header[0], header[1], header[2], 0]) as usize;
            let start = out.len();
            out.resize(start + len, 0);
            self.inner.read_exact(&mut out[start..])?;
            if len < MAX_PAYLOAD {
                return Ok(out);
            }
        }
    }
}

/// The inode numbers of the sockets this process holds open (empty where /proc is missing).
pub fn open_sockets() -> HashSet<u64> {
    fds().into_iter().map(|(_, inode)| inode).collect()
}

/// Opens a reader on a duplicate of the one TCP socket to `port` opened since `before` was
/// taken, or `None` when there is not exactly one.
pub fn adopt(before: &HashSet<u64>, port: u16) -> Option<PacketReader<TcpStream>> {
    let mut found = fds()
        .into_iter()
        .filter(|(_, inode)| !before.contains(inode))
        .filter_map(|(fd, inode)| match peer(fd, inode) {
            Peer::Tcp(p, stream) if p == port => Some(stream),
            _ => None,
        });
    // The descriptor is the replication socket, owned by the `BinlogEvents` that the caller
    // holds for as long as this reader lives: it stays open. Its read timeout is the socket's
    // own, set by mysql_cdc (heartbeat plus a margin).
    let stream = found.next()?;
    if found.next().is_some() {
        tracing::debug!("two new connections to the server: binlog packets read by mysql_cdc");
        return None;
    }
    Some(PacketReader::new(stream))
}

/// Runs `f` (mysql_cdc's connect and handshake) while a helper thread sets TCP_NODELAY on every
/// new connection to `port`, checking every 200 µs (for at most 10 s).
pub fn with_nodelay<T>(port: u16, f: impl FnOnce() -> T) -> T {
    let before = open_sockets();
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let start = Instant::now();
            let mut handled: HashSet<u64> = HashSet::new();
            while !done.load(Relaxed) && start.elapsed() < Duration::from_secs(10) {
                for (fd, inode) in fds() {
                    if before.contains(&inode) || handled.contains(&inode) {
                        continue;
                    }
                    match peer(fd, inode) {
                        Peer::Tcp(p, stream) => {
                            if p == port {
                                let _ = stream.set_nodelay(true);
                            }
                            handled.insert(inode);
                        }
                        Peer::Other => {
                            handled.insert(inode);
                        }
                        Peer::NotYet => {}
                    }
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        let out = f();
        done.store(true, Relaxed);
        out
    })
}

enum Peer {
    /// A TCP socket connected to this port, and a duplicate of it.
    Tcp(u16, TcpStream),
    /// Not connected yet: look again later.
    NotYet,
    /// Not a TCP socket, or gone.
    Other,
}

/// What descriptor `fd` (socket `inode`) is connected to.
fn peer(fd: i32, inode: u64) -> Peer {
    let Some(stream) = duplicate(fd, inode) else {
        return Peer::Other;
    };
    match stream.peer_addr() {
        Ok(addr) => Peer::Tcp(addr.port(), stream),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Peer::NotYet,
        Err(_) => Peer::Other,
    }
}

/// A duplicate of descriptor `fd`, if it still is socket `inode`.
#[cfg(target_os = "linux")]
fn duplicate(fd: i32, inode: u64) -> Option<TcpStream> {
    use std::os::fd::BorrowedFd;
    use std::os::unix::fs::MetadataExt;
    // SAFETY: `fd` was listed in /proc/self/fd as socket `inode`. Should its owner close it in
    // between, duplicating fails (EBADF), or yields another file, which the inode check rejects
    // and drops; the original descriptor is never closed or used here.
    let owned = unsafe { BorrowedFd::borrow_raw(fd) }
        .try_clone_to_owned()
        .ok()?;
    let file = std::fs::File::from(owned);
    if file.metadata().ok()?.ino() != inode {
        return None;
    }
    Some(TcpStream::from(std::os::fd::OwnedFd::from(file)))
}

#[cfg(not(target_os = "linux"))]
fn duplicate(_fd: i32, _inode: u64) -> Option<TcpStream> {
    None
}

/// (descriptor, socket inode) of every socket this process has open.
fn fds() -> Vec<(i32, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let fd: i32 = e.file_name().to_str()?.parse().ok()?;
        let target = std::fs::read_link(e.path()).ok()?;
        let inode = target
            .to_str()?
            .strip_prefix("socket:[")?
            .strip_suffix(']')?
            .parse()
            .ok()?;
        Some((fd, inode))
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(seq: u8, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_le_bytes();
        let mut p = vec![len[0], len[1], len[2], seq];
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn reads_packets_and_joins_split_payloads() {
        let big = vec![7u8; MAX_PAYLOAD];
        let mut wire = packet(0, b"\x00abc");
        wire.extend(packet(1, b"xy"));
        wire.extend(packet(2, &big));
        wire.extend(packet(3, b"tail"));
        wire.extend(packet(4, b""));
        let mut r = PacketReader::new(io::Cursor::new(wire));
        assert!(
            !r.packet_ready(),
            "nothing is buffered before the first read"
        );
        assert_eq!(r.read_packet().unwrap(), b"\x00abc");
        assert!(r.packet_ready(), "a short packet that came along is whole");
        assert_eq!(r.read_packet().unwrap(), b"xy");
        assert!(!r.packet_ready(), "16 MiB do not fit the buffer");
        let joined = r.read_packet().unwrap();
        assert_eq!(joined.len(), MAX_PAYLOAD + 4);
        assert_eq!(&joined[MAX_PAYLOAD..], b"tail");
        assert!(r.packet_ready(), "an empty packet is a whole packet");
        assert_eq!(r.read_packet().unwrap(), b"");
        assert_eq!(
            r.read_packet().unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn a_truncated_packet_is_an_error() {
        let mut wire = packet(0, b"hello");
        wire.truncate(7);
        wire.splice(0..0, packet(0, b"ok"));
        let mut r = PacketReader::new(io::Cursor::new(wire));
        assert_eq!(r.read_packet().unwrap(), b"ok");
        assert!(!r.packet_ready(), "half a packet is not a packet");
        assert!(r.read_packet().is_err());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn nodelay_is_set_on_connections_opened_meanwhile() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stream = with_nodelay(port, || {
            let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            let t = Instant::now();
            while !s.nodelay().unwrap() && t.elapsed() < Duration::from_secs(2) {
                std::thread::sleep(Duration::from_millis(1));
            }
            s
        });
        assert!(stream.nodelay().unwrap());
        // The helper stopped with the handshake: later connections are left as they are.
        let later = TcpStream::connect(("127.0.0.1", port)).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert!(!later.nodelay().unwrap());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn adopts_the_one_new_connection_and_reads_through_it() {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let before = open_sockets();
        let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        // The server side's socket is new too, but its remote port is the client's.
        let mut reader = adopt(&before, port).expect("the new connection is found");
        server.write_all(&packet(0, b"\x00event")).unwrap();
        assert_eq!(reader.read_packet().unwrap(), b"\x00event");

        // A second new connection to the same port makes the choice ambiguous: no adoption.
        let before = open_sockets();
        let _a = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _b = TcpStream::connect(("127.0.0.1", port)).unwrap();
        assert!(adopt(&before, port).is_none());
        drop(client);
    }
}
