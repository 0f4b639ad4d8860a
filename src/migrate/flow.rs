//! Flow control between QEMU's stream and the WAN link.
//!
//! QEMU paces its migration by how fast its own socket drains (docs/design.md, "QEMU's migration
//! stream"). pct must therefore never read ahead of the link by more than a little: the
//! sender's [`Outbox`] holds at most a few hundred KiB of frames, the TCP send buffer is
//! kept small, and every stage blocks when the next one is full, so QEMU's bandwidth and
//! downtime estimates describe what really crosses the WAN (after teleportation).
//!
//! - [`Outbox`]: the bounded queue of frames waiting for the link. Normal frames block the
//!   producer when it is full; urgent frames (fallback replies) never block and jump the
//!   queue, so a receiver waiting for original bytes is answered within one round trip.
//! - [`Window`]: the end-to-end window, in pages the destination QEMU has not been given
//!   yet: what the source QEMU waits on, whichever stage is slowest.
//! - [`TokenBucket`]: caps pct's own sending rate (`--bandwidth`), for tests without a
//!   shaped link.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// A frame already encoded for the wire (header and payload).
pub type Outgoing = Vec<u8>;

#[derive(Debug, Default)]
struct Queues {
    normal: VecDeque<Outgoing>,
    urgent: VecDeque<Outgoing>,
    normal_bytes: usize,
    closed: bool,
}

/// Bounded, two-priority queue of frames for one writer thread.
#[derive(Debug)]
pub struct Outbox {
    q: Mutex<Queues>,
    cv: Condvar,
    cap: usize,
}

/// The outbox was closed (the session is over or failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

impl Outbox {
    /// An outbox holding at most `cap` bytes of normal frames (one frame is always
    /// accepted when the queue is empty, whatever its size).
    pub fn new(cap: usize) -> Outbox {
        Outbox {
            q: Mutex::new(Queues::default()),
            cv: Condvar::new(),
            cap,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queues> {
        self.q.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a normal frame; blocks while the queue is full.
    pub fn push(&self, o: Outgoing) -> Result<(), Closed> {
        let mut q = self.lock();
        while !q.closed && q.normal_bytes > 0 && q.normal_bytes + o.len() > self.cap {
            q = self.cv.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        if q.closed {
            return Err(Closed);
        }
        q.normal_bytes += o.len();
        q.normal.push_back(o);
        self.cv.notify_all();
        Ok(())
    }

    /// Queues an urgent frame ahead of all normal ones; never blocks.
    pub fn push_urgent(&self, o: Outgoing) -> Result<(), Closed> {
        let mut q = self.lock();
        if q.closed {
            return Err(Closed);
        }
        q.urgent.push_back(o);
        self.cv.notify_all();
        Ok(())
    }

    /// Bytes of frames waiting, urgent ones included.
    pub fn queued_bytes(&self) -> usize {
        let q = self.lock();
        q.normal_bytes + q.urgent.iter().map(Vec::len).sum::<usize>()
    }

    /// The next frame to send (urgent first); `None` once closed and drained.
    pub fn pop(&self) -> Option<Outgoing> {
        let mut q = self.lock();
        loop {
            if let Some(o) = q.urgent.pop_front() {
                return Some(o);
            }
            if let Some(o) = q.normal.pop_front() {
                q.normal_bytes -= o.len();
                self.cv.notify_all();
                return Some(o);
            }
            if q.closed {
                return None;
            }
            q = self.cv.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// No more frames: the writer drains what is queued, then stops.
    pub fn close(&self) {
        self.lock().closed = true;
        self.cv.notify_all();
    }

    /// Closes and drops everything queued (on failure).
    pub fn abort(&self) {
        let mut q = self.lock();
        q.closed = true;
        q.normal.clear();
        q.urgent.clear();
        q.normal_bytes = 0;
        self.cv.notify_all();
    }
}

/// The end-to-end window: stream frames sent but not yet given to the destination QEMU
/// (the receiver's [`Ack`](super::wire::Frame::Ack)s say how far it got), weighed by what
/// they cost the destination, in pages. The encoder waits while the window is full, so the
/// source QEMU feels the slowest stage wherever it is, the destination included, and what
/// is queued at switchover is bounded by the window, not by the buffers in between.
///
/// Pages, not bytes: a destination QEMU spends about the same time on a `ZERO` record
/// (9 bytes in the stream, a page to fault in and compare) as on a `PAGE` record
/// (4 KiB), so a stretch of zero pages that is a few hundred KB of stream can be a
/// second of the destination's time.
#[derive(Debug)]
pub struct Window {
    state: Mutex<WindowState>,
    cv: Condvar,
    cap: u64,
    /// `state.outstanding`, readable without the lock: the encoder looks at it for every
    /// record of QEMU's stream ([`Window::full_with`]).
    outstanding: AtomicU64,
}

#[derive(Debug, Default)]
struct WindowState {
    /// Cost of each frame sent and not yet acked, oldest first.
    costs: VecDeque<u64>,
    /// Frames acked so far (the frame number of `costs[0]`).
    acked: u64,
    outstanding: u64,
    /// Largest `outstanding` seen.
    peak: u64,
    closed: bool,
}

impl Window {
    /// A window of `cap` pages (one frame is always let through when it is empty).
    pub fn new(cap: u64) -> Window {
        Window {
            state: Mutex::default(),
            cv: Condvar::new(),
            cap,
            outstanding: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WindowState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A stream frame costing `cost` pages was sent.
    pub fn sent(&self, cost: u64) {
        let mut w = self.lock();
        w.costs.push_back(cost);
        w.outstanding += cost;
        w.peak = w.peak.max(w.outstanding);
        self.outstanding.store(w.outstanding, Ordering::Relaxed);
    }

    /// The receiver has given frames `0..frames` to the destination QEMU.
    pub fn acked(&self, frames: u64) {
        let mut w = self.lock();
        while w.acked < frames {
            let Some(c) = w.costs.pop_front() else { break };
            w.outstanding -= c;
            w.acked += 1;
        }
        self.outstanding.store(w.outstanding, Ordering::Relaxed);
        self.cv.notify_all();
    }

    /// Waits until fewer than `cap` pages are outstanding; `Ok(false)` if no ack came for
    /// `stall` meanwhile.
    pub fn wait_open(&self, stall: Duration) -> Result<bool, Closed> {
        let mut w = self.lock();
        while !w.closed && w.outstanding >= self.cap {
            let (g, t) = self
                .cv
                .wait_timeout(w, stall)
                .unwrap_or_else(|p| p.into_inner());
            w = g;
            if t.timed_out() && w.outstanding >= self.cap {
                return Ok(false);
            }
        }
        if w.closed {
            return Err(Closed);
        }
        Ok(true)
    }

    /// Whether `more` pages on top of what is outstanding would overfill the window.
    pub fn full_with(&self, more: u64) -> bool {
        // Only the encoder sends, so the value can only be lower than when it was read (an
        // ack came since): at worst the encoder flushes a little early.
        self.outstanding.load(Ordering::Relaxed) + more >= self.cap
    }

    /// Pages outstanding now, and at most so far.
    pub fn outstanding(&self) -> (u64, u64) {
        let w = self.lock();
        (w.outstanding, w.peak)
    }

    /// Wakes and fails every waiter (the session failed).
    pub fn close(&self) {
        self.lock().closed = true;
        self.cv.notify_all();
    }
}

/// Token bucket: `rate` bytes per second, bursts of at most `burst` bytes. Senders on
/// several threads may share one (an evacuation's VMs do): their sum is then capped, and
/// they are served in the order they asked, each taking its bytes as a debt that it sleeps
/// off after those before it.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<Tokens>,
}

#[derive(Debug)]
struct Tokens {
    /// Negative: bytes taken ahead of time, to be paid back at `rate`.
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate_bytes_per_s: u64) -> TokenBucket {
        let rate = rate_bytes_per_s.max(1) as f64;
        // 20 ms worth of tokens, at least one large frame's header.
        let burst = (rate / 50.0).max(16.0 * 1024.0);
        TokenBucket {
            rate,
            burst,
            state: Mutex::new(Tokens {
                tokens: burst,
                last: Instant::now(),
            }),
        }
    }

    /// Waits until `n` bytes may be sent, and takes them.
    pub fn take(&self, n: usize) {
        let wait = {
            let mut t = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            t.tokens =
                (t.tokens + now.duration_since(t.last).as_secs_f64() * self.rate).min(self.burst);
            t.last = now;
            t.tokens -= n as f64;
            (t.tokens < 0.0).then(|| Duration::from_secs_f64(-t.tokens / self.rate))
        };
        if let Some(wait) = wait {
            std::thread::sleep(wait);
        }
    }
}

/// Parses a rate: `50mbit`, `50Mbit/s`, `6.25MB/s`, `800k` (bytes), `1000000` (bytes/s).
/// Decimal prefixes (k = 1000). Returns bytes per second.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let body = lower.strip_suffix("/s").unwrap_or(&lower);
    let split = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (num, unit) = body.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("bad rate `{s}`: expected a number with a unit, e.g. 50mbit"))?;
    let (mult, bits) = match unit.trim() {
        "" | "b" => (1.0, false),
        "k" | "kb" => (1e3, false),
        "m" | "mb" => (1e6, false),
        "g" | "gb" => (1e9, false),
        "bit" | "bps" => (1.0, true),
        "kbit" | "kbps" => (1e3, true),
        "mbit" | "mbps" => (1e6, true),
        "gbit" | "gbps" => (1e9, true),
        other => return Err(format!("bad rate `{s}`: unknown unit `{other}`")),
    };
    let bytes = v * mult / if bits { 8.0 } else { 1.0 };
    if !(bytes >= 1.0 && bytes.is_finite()) {
        return Err(format!("bad rate `{s}`: must be at least 1 byte/s"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("50mbit").unwrap(), 6_250_000);
        assert_eq!(parse_rate("50Mbit/s").unwrap(), 6_250_000);
        assert_eq!(parse_rate("6.25MB/s").unwrap(), 6_250_000);
        assert_eq!(parse_rate("1000").unwrap(), 1000);
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("0").is_err());
    }

    /// Four senders sharing one bucket get the bucket's rate between them, not each, and
    /// in about equal shares.
    #[test]
    fn a_shared_bucket_caps_the_sum_and_shares_it() {
        const RATE: u64 = 4_000_000;
        let bucket = TokenBucket::new(RATE);
        let start = Instant::now();
        let run = Duration::from_millis(1500);
        let taken: Vec<u64> = std::thread::scope(|s| {
            let senders: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        let mut n = 0u64;
                        while start.elapsed() < run {
                            bucket.take(16 * 1024);
                            n += 16 * 1024;
                        }
                        n
                    })
                })
                .collect();
            senders
                .into_iter()
                .map(|t| t.join().expect("sender"))
                .collect()
        });
        let secs = start.elapsed().as_secs_f64();
        let sum: u64 = taken.iter().sum();
        let rate = sum as f64 / secs;
        // The first burst and each sender's last frame come on top of the rate.
        let allowance = (bucket.burst + 4.0 * 16.0 * 1024.0) / secs;
        assert!(
            rate <= RATE as f64 + allowance,
            "{rate:.0} B/s from {taken:?}"
        );
        assert!(rate >= 0.8 * RATE as f64, "{rate:.0} B/s from {taken:?}");
        let (min, max) = (taken.iter().min(), taken.iter().max());
        let fair = *min.expect("four") as f64 / *max.expect("four") as f64;
        assert!(fair >= 0.5, "shares {taken:?}");
    }

    #[test]
    fn the_window_counts_pages_until_acked() {
        let w = Window::new(100);
        w.sent(60);
        let long = Duration::from_secs(10);
        assert_eq!(w.wait_open(long), Ok(true), "60 of 100 pages: open");
        w.sent(1);
        w.sent(50);
        assert_eq!(w.outstanding(), (111, 111));
        assert!(w.full_with(0));
        w.acked(1);
        assert_eq!(w.outstanding(), (51, 111));
        assert!(!w.full_with(48) && w.full_with(49));
        w.acked(3); // more than was sent: counts what there is
        assert_eq!(w.outstanding().0, 0);
        w.sent(200);
        let waiter = std::thread::scope(|s| {
            let t = s.spawn(|| w.wait_open(long));
            std::thread::sleep(Duration::from_millis(20));
            w.acked(4);
            t.join().expect("waiter")
        });
        assert_eq!(waiter, Ok(true), "an ack opens the window");
        w.sent(200);
        assert_eq!(
            w.wait_open(Duration::from_millis(10)),
            Ok(false),
            "no ack: stalled"
        );
        w.close();
        assert_eq!(w.wait_open(long), Err(Closed));
    }

    #[test]
    fn urgent_frames_jump_the_queue() {
        let o = Outbox::new(10);
        let f = |n: usize| -> Outgoing { vec![0; n] };
        o.push(f(8)).unwrap();
        o.push_urgent(f(3)).unwrap();
        assert_eq!(o.pop().unwrap().len(), 3);
        assert_eq!(o.pop().unwrap().len(), 8);
        o.close();
        assert!(o.pop().is_none());
        assert_eq!(o.push(f(1)), Err(Closed));
    }
}
