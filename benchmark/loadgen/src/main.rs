//! Client load generator of the fan-out benchmark (`benchmark/fanout.js`).
//!
//! Opens `--clients` WebSocket connections to one server on the loopback interface, brings each to
//! the point where it receives the broadcast (mode `usp`: welcome, then `subscribe` to `kv:*`,
//! then `subscribed`; mode `socketio`: the Engine.IO open packet, then `40` to join the default
//! namespace, then its `40` answer; mode `raw`: the WebSocket handshake alone), prints one line
//! `ready` on stdout when every client got there, and then counts what arrives:
//!
//! - `usp`: one delivery per event inside `{"type":"events","events":[…]}` frames, counted as the
//!   occurrences of `"seq":` in the frame (no JSON parsing); `gap` frames are counted apart;
//! - `raw`: one delivery per text message;
//! - `socketio`: one delivery per `42…` message (a socket.io event); pings (`2`) are answered
//!   with pongs (`3`).
//!
//! WebSocket pings are answered with pongs. It stops when every client got `--expect` deliveries
//! (clients that have them keep reading until then, so extra deliveries are counted too), when
//! every connection is gone, or `--timeout` seconds after `ready` (the connect phase has its own
//! `--timeout` seconds), and prints one JSON line: connections, deliveries, messages (frames),
//! the first and last delivery (ms since the epoch), per-client minimum and maximum, close codes,
//! errors and this process's CPU time from `ready` to the end.
//!
//! The WebSocket client is written here (RFC 6455, no extensions offered, so no compression):
//! the per-message work is a frame header, a few byte comparisons and, for `usp`, a substring
//! count; a library client would allocate per message. Only loopback addresses are accepted.
//!
//!   usp-fanout-loadgen --url ws://127.0.0.1:PORT/stream --clients 1000 --mode usp \
//!     --expect 2000 --timeout 60 [--threads 2] [--connect-concurrency 64] [--exit-on-stdin-eof]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use memchr::memmem;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify, Semaphore, SemaphorePermit};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Usp,
    Raw,
    SocketIo,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Usp => "usp",
            Mode::Raw => "raw",
            Mode::SocketIo => "socketio",
        }
    }
}

struct Config {
    url: String,
    host: String,
    port: u16,
    path: String,
    clients: usize,
    mode: Mode,
    expect: u64,
    timeout: Duration,
    threads: usize,
    connect_concurrency: usize,
    exit_on_stdin_eof: bool,
}

const USAGE: &str =
    "usage: usp-fanout-loadgen --url ws://127.0.0.1:PORT/PATH --clients N --mode usp|raw|socketio \
--expect N --timeout SECONDS [--threads 2] [--connect-concurrency 64] [--exit-on-stdin-eof]";

fn parse_args() -> Result<Config, String> {
    let mut kv: BTreeMap<String, String> = BTreeMap::new();
    let mut flags: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let Some(name) = a.strip_prefix("--") else {
            return Err(format!("unexpected argument {a:?}"));
        };
        if name == "exit-on-stdin-eof" || name == "help" {
            flags.push(name.to_string());
            continue;
        }
        if let Some((k, v)) = name.split_once('=') {
            kv.insert(k.to_string(), v.to_string());
        } else {
            let v = args
                .next()
                .ok_or_else(|| format!("--{name} needs a value"))?;
            kv.insert(name.to_string(), v);
        }
    }
    if flags.iter().any(|f| f == "help") {
        println!("{USAGE}");
        std::process::exit(0);
    }
    let take = |k: &str| {
        kv.get(k)
            .cloned()
            .ok_or_else(|| format!("--{k} is required"))
    };
    let num = |k: &str, d: Option<u64>| -> Result<u64, String> {
        match kv.get(k) {
            Some(v) => v
                .parse::<u64>()
                .map_err(|_| format!("--{k} must be a whole number, got {v:?}")),
            None => d.ok_or_else(|| format!("--{k} is required")),
        }
    };
    let url = take("url")?;
    let mode = match take("mode")?.as_str() {
        "usp" => Mode::Usp,
        "raw" => Mode::Raw,
        "socketio" => Mode::SocketIo,
        m => return Err(format!("--mode must be usp, raw or socketio, got {m:?}")),
    };
    let rest = url
        .strip_prefix("ws://")
        .ok_or("--url must start with ws:// (no TLS)")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (
            h.to_string(),
            p.parse::<u16>()
                .map_err(|_| format!("bad port in {url:?}"))?,
        ),
        None => (authority.to_string(), 80),
    };
    // A load generator must not be pointed at other machines by mistake.
    if !matches!(host.as_str(), "127.0.0.1" | "localhost" | "[::1]") {
        return Err(format!(
            "only loopback hosts are allowed (127.0.0.1, localhost, [::1]), got {host:?}"
        ));
    }
    let path = if mode == Mode::SocketIo && path == "/" {
        "/socket.io/?EIO=4&transport=websocket".to_string()
    } else {
        path
    };
    let clients = num("clients", None)? as usize;
    let expect = num("expect", None)?;
    let timeout = num("timeout", None)?;
    let threads = num("threads", Some(2))? as usize;
    let connect_concurrency = num("connect-concurrency", Some(64))? as usize;
    if clients == 0 || timeout == 0 || threads == 0 || connect_concurrency == 0 {
        return Err(
            "--clients, --timeout, --threads and --connect-concurrency must be positive".into(),
        );
    }
    if let Some(k) = kv.keys().find(|k| {
        ![
            "url",
            "mode",
            "clients",
            "expect",
            "timeout",
            "threads",
            "connect-concurrency",
        ]
        .contains(&k.as_str())
    }) {
        return Err(format!("unknown option --{k}"));
    }
    Ok(Config {
        url,
        host,
        port,
        path,
        clients,
        mode,
        expect,
        timeout: Duration::from_secs(timeout),
        threads,
        connect_concurrency,
        exit_on_stdin_eof: flags.iter().any(|f| f == "exit-on-stdin-eof"),
    })
}

// ---------------------------------------------------------------------------------------------

/// Counters shared by the client tasks and the main task.
struct Shared {
    ready: AtomicUsize,
    done: AtomicUsize,
    /// Clients whose connection ended (or never opened) before they had `expect` deliveries.
    ended_short: AtomicUsize,
    notify: Notify,
    seq_finder: memmem::Finder<'static>,
}

#[derive(Default)]
struct ClientResult {
    connected: bool,
    ready: bool,
    done: bool,
    deliveries: u64,
    messages: u64,
    first: Option<Instant>,
    last: Option<Instant>,
    gaps: u64,
    other_messages: u64,
    close_code: Option<u16>,
    error: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    WaitWelcome,
    WaitSubscribed,
    WaitOpen,
    WaitNamespace,
    Live,
}

struct Client<'a> {
    cfg: &'a Config,
    sh: &'a Shared,
    res: &'a mut ClientResult,
    phase: Phase,
    permit: Option<SemaphorePermit<'a>>,
    out: Vec<u8>,
    rng: u32,
    closed: bool,
}

impl Client<'_> {
    fn mask(&mut self) -> [u8; 4] {
        // xorshift32: masking keys only need to vary, not to be secret here.
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.rng = x;
        x.to_le_bytes()
    }

    /// Queues a masked frame (client frames must be masked) for the next write.
    fn send(&mut self, opcode: u8, payload: &[u8]) {
        let mask = self.mask();
        let out = &mut self.out;
        out.push(0x80 | opcode);
        let n = payload.len();
        if n < 126 {
            out.push(0x80 | n as u8);
        } else if n < 65536 {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
    }

    fn mark_ready(&mut self) {
        if self.res.ready {
            return;
        }
        self.res.ready = true;
        self.phase = Phase::Live;
        self.permit = None; // the next client may connect
        self.sh.ready.fetch_add(1, Relaxed);
        self.sh.notify.notify_one();
    }

    fn deliver(&mut self, n: u64) {
        let now = Instant::now();
        let r = &mut *self.res;
        r.deliveries += n;
        r.messages += 1;
        if r.first.is_none() {
            r.first = Some(now);
        }
        r.last = Some(now);
        if !r.done && r.deliveries >= self.cfg.expect {
            r.done = true;
            self.sh.done.fetch_add(1, Relaxed);
            self.sh.notify.notify_one();
        }
    }

    fn fail(&mut self, msg: String) {
        if self.res.error.is_none() {
            self.res.error = Some(msg);
        }
    }

    /// One complete data message (text or binary).
    fn on_message(&mut self, text: bool, m: &[u8]) {
        match self.cfg.mode {
            Mode::Raw => {
                if text {
                    self.deliver(1)
                } else {
                    self.res.other_messages += 1
                }
            }
            Mode::Usp => {
                let head = &m[..m.len().min(48)];
                let is = |t: &[u8]| memmem::find(head, t).is_some();
                if is(b"\"type\":\"events\"") {
                    let n = self.sh.seq_finder.find_iter(m).count() as u64;
                    self.deliver(n);
                } else if is(b"\"type\":\"welcome\"") && self.phase == Phase::WaitWelcome {
                    self.send(0x1, br#"{"type":"subscribe","channels":["kv:*"],"id":1}"#);
                    self.phase = Phase::WaitSubscribed;
                } else if is(b"\"type\":\"subscribed\"") && self.phase == Phase::WaitSubscribed {
                    self.mark_ready();
                } else if is(b"\"type\":\"gap\"") {
                    self.res.gaps += 1;
                } else if is(b"\"type\":\"error\"") {
                    let s = String::from_utf8_lossy(&m[..m.len().min(200)]).into_owned();
                    self.fail(format!("server error frame: {s}"));
                } else {
                    self.res.other_messages += 1;
                }
            }
            Mode::SocketIo => {
                // Engine.IO v4 packet type, then (for `4`, message) the socket.io packet type.
                if m.starts_with(b"42") {
                    self.deliver(1);
                } else if m == b"2" {
                    self.send(0x1, b"3");
                } else if m.starts_with(b"0") && self.phase == Phase::WaitOpen {
                    self.send(0x1, b"40");
                    self.phase = Phase::WaitNamespace;
                } else if m.starts_with(b"40") && self.phase == Phase::WaitNamespace {
                    self.mark_ready();
                } else if m.starts_with(b"44") || m.starts_with(b"41") || m.starts_with(b"1") {
                    let s = String::from_utf8_lossy(&m[..m.len().min(200)]).into_owned();
                    self.fail(format!("socket.io refused or closed: {s}"));
                } else {
                    self.res.other_messages += 1;
                }
            }
        }
    }
}

struct Header {
    fin: bool,
    opcode: u8,
    header_len: usize,
    payload_len: usize,
}

const MAX_FRAME: usize = 256 << 20;

/// Parses a server frame header; Ok(None) when more bytes are needed.
fn parse_header(b: &[u8]) -> Result<Option<Header>, String> {
    if b.len() < 2 {
        return Ok(None);
    }
    if b[0] & 0x70 != 0 {
        return Err("a frame with reserved bits set (no extension was negotiated)".into());
    }
    if b[1] & 0x80 != 0 {
        return Err("the server sent a masked frame".into());
    }
    let (payload_len, header_len) = match b[1] & 0x7f {
        126 => {
            if b.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([b[2], b[3]]) as usize, 4)
        }
        127 => {
            if b.len() < 10 {
                return Ok(None);
            }
            let n = u64::from_be_bytes(b[2..10].try_into().unwrap());
            if n > MAX_FRAME as u64 {
                return Err(format!("a frame of {n} bytes"));
            }
            (n as usize, 10)
        }
        n => (n as usize, 2),
    };
    Ok(Some(Header {
        fin: b[0] & 0x80 != 0,
        opcode: b[0] & 0x0f,
        header_len,
        payload_len,
    }))
}

async fn connect(cfg: &Config) -> Result<TcpStream, String> {
    let addr = format!(
        "{}:{}",
        cfg.host.trim_start_matches('[').trim_end_matches(']'),
        cfg.port
    );
    let mut last = String::new();
    for attempt in 0..5u64 {
        match TcpStream::connect(&addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(20 * (attempt + 1))).await;
    }
    Err(format!("connect to {addr}: {last}"))
}

/// A client from connect to the end of its connection; `stop` cancels it from outside.
async fn client_body(
    id: usize,
    cfg: &Config,
    sh: &Shared,
    sem: &Semaphore,
    res: &mut ClientResult,
) -> Result<(), String> {
    let permit = sem
        .acquire()
        .await
        .map_err(|_| "semaphore closed".to_string())?;
    let mut stream = connect(cfg).await?;
    let _ = stream.set_nodelay(true);
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}:{}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        cfg.path, cfg.host, cfg.port
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;

    let mut buf: Vec<u8> = vec![0; 64 * 1024];
    let mut end = 0usize;
    let mut start;
    loop {
        if let Some(pos) = memmem::find(&buf[..end], b"\r\n\r\n") {
            let status = buf[..pos].split(|&c| c == b'\n').next().unwrap_or(b"");
            if !status.starts_with(b"HTTP/1.1 101") {
                return Err(format!(
                    "handshake refused: {}",
                    String::from_utf8_lossy(status).trim()
                ));
            }
            start = pos + 4; // the server may already have sent frames after the response
            break;
        }
        if end == buf.len() {
            return Err("handshake response too large".into());
        }
        let n = stream
            .read(&mut buf[end..])
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed during the handshake".into());
        }
        end += n;
    }
    res.connected = true;

    let seed = (id as u32).wrapping_add(1).wrapping_mul(2_654_435_761)
        ^ SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(7);
    let mut c = Client {
        cfg,
        sh,
        res,
        phase: match cfg.mode {
            Mode::Usp => Phase::WaitWelcome,
            Mode::SocketIo => Phase::WaitOpen,
            Mode::Raw => Phase::Live,
        },
        permit: Some(permit),
        out: Vec::new(),
        rng: seed | 1,
        closed: false,
    };
    if c.phase == Phase::Live {
        c.mark_ready();
    }
    // A fragmented message being assembled: (is text, bytes so far).
    let mut fragment: Option<(bool, Vec<u8>)> = None;
    loop {
        let mut need = 0usize;
        while start < end {
            let Some(h) = parse_header(&buf[start..end])? else {
                need = 10;
                break;
            };
            let total = h.header_len + h.payload_len;
            if end - start < total {
                need = total;
                break;
            }
            let payload = &buf[start + h.header_len..start + total];
            match h.opcode {
                0x1 | 0x2 if h.fin && fragment.is_none() => c.on_message(h.opcode == 0x1, payload),
                0x1 | 0x2 => fragment = Some((h.opcode == 0x1, payload.to_vec())),
                0x0 => {
                    let Some((text, mut acc)) = fragment.take() else {
                        return Err("a continuation frame without a first fragment".into());
                    };
                    acc.extend_from_slice(payload);
                    if acc.len() > MAX_FRAME {
                        return Err("a fragmented message over 256 MiB".into());
                    }
                    if h.fin {
                        c.on_message(text, &acc);
                    } else {
                        fragment = Some((text, acc));
                    }
                }
                0x8 => {
                    let code = if payload.len() >= 2 {
                        u16::from_be_bytes([payload[0], payload[1]])
                    } else {
                        1005
                    };
                    c.res.close_code = Some(code);
                    c.closed = true;
                }
                0x9 => c.send(0xA, payload),
                0xA => {}
                op => return Err(format!("a frame with opcode {op}")),
            }
            start += total;
            if c.closed {
                break;
            }
        }
        if !c.out.is_empty() {
            stream
                .write_all(&c.out)
                .await
                .map_err(|e| format!("write: {e}"))?;
            c.out.clear();
        }
        if c.closed {
            return Ok(());
        }
        // Make room: move the unread tail to the front, grow for a frame larger than the buffer.
        if start == end {
            start = 0;
            end = 0;
        } else if start > 0 && (buf.len() - end < 16 * 1024 || start + need > buf.len()) {
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
        }
        if start + need > buf.len() {
            buf.resize((start + need).next_power_of_two(), 0);
        }
        let n = stream
            .read(&mut buf[end..])
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed by the server without a close frame".into());
        }
        end += n;
    }
}

async fn stopped(rx: &mut watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn run_client(
    id: usize,
    cfg: Arc<Config>,
    sh: Arc<Shared>,
    sem: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) -> ClientResult {
    let mut res = ClientResult::default();
    let outcome = tokio::select! {
        r = client_body(id, &cfg, &sh, &sem, &mut res) => Some(r),
        _ = stopped(&mut stop) => None,
    };
    if let Some(r) = outcome {
        // The connection ended (or never opened) before the main task stopped the run.
        if let Err(e) = r {
            res.error.get_or_insert(e);
        }
        if !res.done {
            sh.ended_short.fetch_add(1, Relaxed);
            sh.notify.notify_one();
        }
    }
    res
}

/// Waits until `cond` holds or `deadline` passes; true when it holds.
async fn wait_until(sh: &Shared, deadline: Instant, cond: impl Fn() -> bool) -> bool {
    loop {
        if cond() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        let step = (deadline - now).min(Duration::from_millis(20));
        let _ = tokio::time::timeout(step, sh.notify.notified()).await;
    }
}

fn cpu_us() -> (u64, u64) {
    // SAFETY: getrusage fills the zeroed struct it is given.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        (
            ru.ru_utime.tv_sec as u64 * 1_000_000 + ru.ru_utime.tv_usec as u64,
            ru.ru_stime.tv_sec as u64 * 1_000_000 + ru.ru_stime.tv_usec as u64,
        )
    }
}

fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for ch in s.chars() {
        match ch {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn num_or_null(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.3}"),
        _ => "null".into(),
    }
}

async fn run(cfg: Arc<Config>) -> i32 {
    let t0 = Instant::now();
    let wall0_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0);
    let epoch_ms = |i: Instant| wall0_ms + i.duration_since(t0).as_secs_f64() * 1000.0;
    let sh = Arc::new(Shared {
        ready: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        ended_short: AtomicUsize::new(0),
        notify: Notify::new(),
        seq_finder: memmem::Finder::new(b"\"seq\":").into_owned(),
    });
    if cfg.exit_on_stdin_eof {
        // The driver holds our stdin open; when it goes away, so do we.
        tokio::spawn(async {
            let mut stdin = tokio::io::stdin();
            let mut b = [0u8; 256];
            loop {
                match stdin.read(&mut b).await {
                    Ok(0) | Err(_) => {
                        eprintln!("loadgen: stdin closed, exiting");
                        std::process::exit(3);
                    }
                    Ok(_) => {}
                }
            }
        });
    }
    let sem = Arc::new(Semaphore::new(cfg.connect_concurrency));
    let (stop_tx, stop_rx) = watch::channel(false);
    let handles: Vec<_> = (0..cfg.clients)
        .map(|id| {
            tokio::spawn(run_client(
                id,
                cfg.clone(),
                sh.clone(),
                sem.clone(),
                stop_rx.clone(),
            ))
        })
        .collect();

    // 1. Connect (and subscribe) every client, within --timeout.
    let n = cfg.clients;
    let all_ready = wait_until(&sh, t0 + cfg.timeout, || {
        sh.ready.load(Relaxed) + sh.ended_short.load(Relaxed) >= n
    })
    .await
        && sh.ready.load(Relaxed) == n;
    let ready_at = Instant::now();
    let cpu_ready = cpu_us();
    let mut timed_out = false;
    if all_ready {
        println!("ready");
        // 2. Count deliveries until every client has them all, or nobody is left, or --timeout.
        timed_out = !wait_until(&sh, ready_at + cfg.timeout, || {
            sh.done.load(Relaxed) + sh.ended_short.load(Relaxed) >= n
        })
        .await;
    } else {
        eprintln!(
            "loadgen: only {} of {} clients ready within {} s",
            sh.ready.load(Relaxed),
            n,
            cfg.timeout.as_secs()
        );
    }
    let end_at = Instant::now();
    let _ = stop_tx.send(true);
    let mut results = Vec::with_capacity(n);
    for h in handles {
        results.push(h.await.unwrap_or_else(|e| ClientResult {
            error: Some(format!("task failed: {e}")),
            ..Default::default()
        }));
    }
    let cpu_end = cpu_us();

    let connected = results.iter().filter(|r| r.connected).count();
    let ready = results.iter().filter(|r| r.ready).count();
    let deliveries: u64 = results.iter().map(|r| r.deliveries).sum();
    let messages: u64 = results.iter().map(|r| r.messages).sum();
    let gaps: u64 = results.iter().map(|r| r.gaps).sum();
    let other: u64 = results.iter().map(|r| r.other_messages).sum();
    let complete = results
        .iter()
        .filter(|r| r.deliveries == cfg.expect)
        .count();
    let min = results.iter().map(|r| r.deliveries).min().unwrap_or(0);
    let max = results.iter().map(|r| r.deliveries).max().unwrap_or(0);
    let first = results.iter().filter_map(|r| r.first).min();
    let last = results.iter().filter_map(|r| r.last).max();
    let duration_ms = match (first, last) {
        (Some(f), Some(l)) => Some(l.duration_since(f).as_secs_f64() * 1000.0),
        _ => None,
    };
    let rate = duration_ms
        .filter(|d| *d > 0.0)
        .map(|d| deliveries as f64 / (d / 1000.0));
    let mut close_codes: BTreeMap<u16, usize> = BTreeMap::new();
    for r in &results {
        if let Some(c) = r.close_code {
            *close_codes.entry(c).or_default() += 1;
        }
    }
    let errors: Vec<&String> = results.iter().filter_map(|r| r.error.as_ref()).collect();
    let mut first_errors: Vec<&String> = Vec::new();
    for e in &errors {
        if first_errors.len() < 5 && !first_errors.contains(e) {
            first_errors.push(e);
        }
    }
    let codes = close_codes
        .iter()
        .map(|(k, v)| format!("\"{k}\":{v}"))
        .collect::<Vec<_>>()
        .join(",");
    let errs = first_errors
        .iter()
        .map(|e| json_str(e))
        .collect::<Vec<_>>()
        .join(",");
    println!(
        "{{\"mode\":\"{}\",\"url\":{},\"clients\":{},\"threads\":{},\"connected\":{},\"ready\":{},\"allReady\":{},\
         \"expectPerClient\":{},\"deliveries\":{},\"messages\":{},\"completeClients\":{},\"minPerClient\":{},\"maxPerClient\":{},\
         \"gaps\":{},\"otherMessages\":{},\"closeCodes\":{{{}}},\"errors\":{},\"firstErrors\":[{}],\"timedOut\":{},\
         \"readyAtMs\":{},\"firstDeliveryMs\":{},\"lastDeliveryMs\":{},\"endAtMs\":{},\"durationMs\":{},\"deliveriesPerSec\":{},\
         \"connectMs\":{},\"cpuUserMs\":{},\"cpuSystemMs\":{},\"cpuConnectMs\":{}}}",
        cfg.mode.name(),
        json_str(&cfg.url),
        cfg.clients,
        cfg.threads,
        connected,
        ready,
        all_ready,
        cfg.expect,
        deliveries,
        messages,
        complete,
        min,
        max,
        gaps,
        other,
        codes,
        errors.len(),
        errs,
        timed_out,
        num_or_null(Some(epoch_ms(ready_at))),
        num_or_null(first.map(epoch_ms)),
        num_or_null(last.map(epoch_ms)),
        num_or_null(Some(epoch_ms(end_at))),
        num_or_null(duration_ms),
        num_or_null(rate),
        num_or_null(Some(ready_at.duration_since(t0).as_secs_f64() * 1000.0)),
        num_or_null(Some(cpu_end.0.saturating_sub(cpu_ready.0) as f64 / 1000.0)),
        num_or_null(Some(cpu_end.1.saturating_sub(cpu_ready.1) as f64 / 1000.0)),
        num_or_null(Some((cpu_ready.0 + cpu_ready.1) as f64 / 1000.0)),
    );
    if all_ready && complete == n && !timed_out {
        0
    } else {
        1
    }
}

fn main() {
    let cfg = match parse_args() {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("loadgen: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: cannot start the runtime: {e}");
            std::process::exit(2);
        }
    };
    let code = rt.block_on(run(cfg));
    // Exit without waiting for the runtime's blocking threads (the stdin reader).
    std::process::exit(code);
}
