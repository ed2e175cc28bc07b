//! The file watch that wakes the SQLite store thread when another process commits: an inotify
//! watch on `<db>-wal` that fires once (`IN_ONESHOT`) and is armed again by the store thread
//! when it takes the wake, right before it reads the log. A writer's transaction writes the WAL
//! thousands of times; with a plain watch each write raised an event for a thread to take (about
//! half a µs of CPU per row in a bulk write from another process), and now one does per read.
//! Linux only; elsewhere `WalWatch::start` returns None and the store polls (`tailInterval`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::Relaxed};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::store::Op;

/// Write transactions of ours in a row that pause the watch.
const WATCH_PAUSE_STREAK: u32 = 4;
/// Without a write of ours for this long, the watch is armed again.
const WATCH_RESUME_AFTER: Duration = Duration::from_millis(20);
/// How often the log is read while the watch is paused and this process does not write.
const WATCH_PAUSED_POLL: Duration = Duration::from_millis(2);
/// A WAL write within this long after our own commit is taken for ours.
const OWN_WRITE_US: i64 = 2_000;

/// The watch, paused while this process writes back to back: its own writes would fire it, and
/// the store thread reads the log after each of its transactions anyway (which also finds other
/// processes' commits, through `PRAGMA data_version`). It is armed again `WATCH_RESUME_AFTER`
/// after our last write; meanwhile the loop reads the log every `WATCH_PAUSED_POLL`.
/// Dropping it stops its thread.
pub struct WalWatch {
    inner: imp::Watch,
    paused: Arc<AtomicBool>,
    /// Write transactions in a row, each within `WATCH_RESUME_AFTER` of the one before.
    streak: u32,
    last_write: Option<Instant>,
}

/// What the watch thread does on a WAL write: `flag` is set and, unless a wake is already
/// pending, `Op::Wake` is queued; a write within `OWN_WRITE_US` of `own_commit_us` is ours and
/// only arms the watch again.
struct OnWrite {
    flag: Arc<AtomicBool>,
    own_commit_us: Arc<AtomicI64>,
    wake: SyncSender<Op>,
    paused: Arc<AtomicBool>,
}

impl OnWrite {
    /// Returns whether the watch should be armed again at once.
    fn fired(&self) -> bool {
        let ours = crate::event::now_us() - self.own_commit_us.load(Relaxed) < OWN_WRITE_US;
        if ours {
            // A foreign commit in that window is still found by the `tailInterval` poll.
            return !self.paused.load(Relaxed);
        }
        if !self.flag.swap(true, Relaxed) {
            let _ = self.wake.try_send(Op::Wake);
        }
        // The store thread arms it when it takes the flag.
        false
    }
}

impl WalWatch {
    /// Watches `wal`; None when the watch is unavailable (the store then polls).
    pub fn start(
        wal: PathBuf,
        flag: Arc<AtomicBool>,
        own_commit_us: Arc<AtomicI64>,
        wake: SyncSender<Op>,
    ) -> Option<WalWatch> {
        let paused = Arc::new(AtomicBool::new(false));
        let on_write = OnWrite {
            flag,
            own_commit_us,
            wake,
            paused: paused.clone(),
        };
        let inner = imp::Watch::start(wal, on_write)
            .map_err(|e| tracing::debug!("no file watch, polling only: {e}"))
            .ok()?;
        Some(WalWatch {
            inner,
            paused,
            streak: 0,
            last_write: None,
        })
    }

    /// Arms the watch for the next write (unless paused). Call before reading the log, so a
    /// commit during the read fires it.
    pub fn arm(&mut self) {
        if !self.paused.load(Relaxed) {
            self.inner.arm();
        }
    }

    /// Records one write transaction of ours.
    pub fn wrote(&mut self) {
        let now = Instant::now();
        let close = self
            .last_write
            .is_some_and(|t| now.duration_since(t) < WATCH_RESUME_AFTER);
        self.streak = if close { self.streak + 1 } else { 1 };
        self.last_write = Some(now);
        if self.streak >= WATCH_PAUSE_STREAK && !self.paused.swap(true, Relaxed) {
            tracing::trace!("WAL watch paused: this process writes back to back");
        }
    }

    /// Arms the watch again once our writes have stopped. Returns how long the loop may wait
    /// before it reads the log: while paused, `WATCH_PAUSED_POLL`; on arming, not at all (a
    /// commit made meanwhile fired nothing).
    pub fn idle(&mut self) -> Option<Duration> {
        if !self.paused.load(Relaxed) {
            return None;
        }
        if self
            .last_write
            .is_none_or(|t| t.elapsed() >= WATCH_RESUME_AFTER)
        {
            self.paused.store(false, Relaxed);
            self.streak = 0;
            self.inner.arm();
            tracing::trace!("WAL watch armed again");
            return Some(Duration::ZERO);
        }
        Some(WATCH_PAUSED_POLL)
    }
}

#[cfg(target_os = "linux")]
mod imp {
    use std::io::{self, Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::path::PathBuf;
    use std::thread::JoinHandle;

    use inotify::{EventMask, Inotify, WatchMask, Watches};

    use super::OnWrite;

    const MASK: WatchMask = WatchMask::MODIFY.union(WatchMask::ONESHOT);

    pub struct Watch {
        watches: Watches,
        wal: PathBuf,
        /// A byte written here stops the thread.
        stop: UnixStream,
        thread: Option<JoinHandle<()>>,
    }

    impl Watch {
        pub fn start(wal: PathBuf, on_write: OnWrite) -> io::Result<Watch> {
            let inotify = Inotify::init()?;
            let mut watches = inotify.watches();
            watches.add(&wal, MASK)?;
            let (stop, stopped) = UnixStream::pair()?;
            let thread = {
                let (watches, wal) = (watches.clone(), wal.clone());
                std::thread::Builder::new()
                    .name("usp-wal-watch".into())
                    .spawn(move || run(inotify, watches, wal, stopped, on_write))?
            };
            Ok(Watch {
                watches,
                wal,
                stop,
                thread: Some(thread),
            })
        }

        pub fn arm(&mut self) {
            // Adding a watch the file already has replaces its mask: no second watch.
            if let Err(e) = self.watches.add(&self.wal, MASK) {
                tracing::debug!("WAL watch not armed (the tailInterval poll remains): {e}");
            }
        }
    }

    impl Drop for Watch {
        fn drop(&mut self) {
            let _ = (&self.stop).write_all(&[1]);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn run(
        mut inotify: Inotify,
        mut watches: Watches,
        wal: PathBuf,
        mut stopped: UnixStream,
        on_write: OnWrite,
    ) {
        let mut buf = [0u8; 4096];
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: inotify.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stopped.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfd for the length given, and both
            // descriptors stay open for the call (owned by this function).
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::debug!("WAL watch stopped: {e}");
                return;
            }
            if fds[1].revents != 0 {
                let _ = stopped.read(&mut [0u8; 1]);
                return;
            }
            if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                // Polling it again would return at once, forever: leave it to `tailInterval`.
                tracing::debug!("WAL watch stopped: the inotify descriptor failed");
                return;
            }
            let mut written = false;
            loop {
                match inotify.read_events(&mut buf) {
                    Ok(events) => {
                        let mut any = false;
                        for e in events {
                            any = true;
                            // An overflowed queue may have lost a write: count it as one.
                            written |= e.mask.intersects(EventMask::MODIFY | EventMask::Q_OVERFLOW);
                        }
                        if !any {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::debug!("WAL watch stopped: {e}");
                        return;
                    }
                }
            }
            if written && on_write.fired() {
                if let Err(e) = watches.add(&wal, MASK) {
                    tracing::debug!("WAL watch not armed (the tailInterval poll remains): {e}");
                }
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::io;
    use std::path::PathBuf;

    use super::OnWrite;

    pub struct Watch;

    impl Watch {
        pub fn start(_wal: PathBuf, _on_write: OnWrite) -> io::Result<Watch> {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the WAL watch uses inotify (Linux)",
            ))
        }

        pub fn arm(&mut self) {}
    }
}
