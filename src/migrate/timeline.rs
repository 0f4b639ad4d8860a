//! The switchover timeline: what happened between the source guest's `STOP` and the
//! destination guest's `RESUME`, with a wall-clock time (Unix ms) for each step, so that a
//! long downtime can be pinned on one of them.
//!
//! The sender marks what it sees ([`SenderMarks`]: the `ram` section's END part beginning,
//! its EOS, the switchover check, the `End` frame queued and written), the receiver what it
//! sees ([`ReceiverMarks`]: `End` read, the last run verified, the last byte given to the
//! destination QEMU, which travel back in its report), and QEMU on each end says when it
//! stopped, finished loading and resumed. [`Timeline`] puts them in order. The two ends
//! use their own hosts' clocks.

use serde::{Deserialize, Serialize};
use std::fmt::Write;
use std::time::SystemTime;

/// Now, in Unix milliseconds (this host's clock).
pub fn now_unix_ms() -> f64 {
    unix_ms(SystemTime::now())
}

/// `t` in Unix milliseconds (0 for a time before 1970).
pub fn unix_ms(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// What the sender saw of the switchover (Unix ms, the source host's clock).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SenderMarks {
    /// The `ram` section's END part began: QEMU had stopped the guest and was sending its
    /// last dirty pages.
    pub ram_end: Option<f64>,
    /// The END part's EOS: all of the guest's RAM was out of QEMU.
    pub eos: Option<f64>,
    /// The switchover check finished (it starts at the EOS).
    pub checked: Option<f64>,
    /// The `End` frame was queued (QEMU had closed its stream).
    pub end_queued: Option<f64>,
    /// The last frame was handed to TCP.
    pub last_written: Option<f64>,
    /// pct's own backlog when the END part began: frames queued for the link plus bytes the
    /// kernel had not yet seen acknowledged.
    pub backlog_bytes: Option<u64>,
    /// Pages of stream sent but not yet given to the destination QEMU then (the
    /// end-to-end window's fill).
    #[serde(default)]
    pub backlog_pages: Option<u64>,
    /// The window's largest fill over the migration.
    #[serde(default)]
    pub peak_window_pages: Option<u64>,
    /// QEMU stream bytes from the END part's start to the stream's end.
    pub final_stream_bytes: Option<u64>,
    /// Bytes on the link (sender to receiver) from the END part's start to the end.
    pub final_wire_bytes: Option<u64>,
    /// Fallback and per-page hash requests the receiver sent after the END part began:
    /// each is a round trip inside the downtime.
    pub final_requests: u64,
}

/// What the receiver saw of the switchover (Unix ms, the destination host's clock).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReceiverMarks {
    /// The `End` frame was read off the link.
    pub end_read: Option<f64>,
    /// The last reference run was read from disk and hashed.
    pub last_verified: Option<f64>,
    /// The last byte of the stream was written to the destination QEMU.
    pub last_emitted: Option<f64>,
}

/// One mark on the timeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Mark {
    pub what: &'static str,
    /// Milliseconds after the source's `STOP`.
    pub after_stop_ms: f64,
}

/// The time between two consecutive marks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    pub from: &'static str,
    pub to: &'static str,
    pub ms: f64,
}

/// The whole switchover, both ends.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Timeline {
    /// The source QEMU's `STOP` event.
    pub stop: Option<f64>,
    pub sender: SenderMarks,
    pub receiver: ReceiverMarks,
    /// The destination QEMU's `MIGRATION completed` event.
    pub loaded: Option<f64>,
    /// The destination QEMU's `RESUME` event (none if it was kept paused).
    pub resumed: Option<f64>,
}

impl Timeline {
    /// Every mark known, in time order, relative to the `STOP` (empty without one).
    pub fn marks(&self) -> Vec<Mark> {
        let Some(stop) = self.stop else {
            return Vec::new();
        };
        let (s, r) = (&self.sender, &self.receiver);
        let all = [
            ("END part", s.ram_end),
            ("EOS", s.eos),
            ("checked", s.checked),
            ("End queued", s.end_queued),
            ("written", s.last_written),
            ("End read", r.end_read),
            ("verified", r.last_verified),
            ("emitted", r.last_emitted),
            ("loaded", self.loaded),
            ("resumed", self.resumed),
        ];
        let mut m: Vec<Mark> = all
            .into_iter()
            .filter_map(|(what, t)| {
                t.map(|t| Mark {
                    what,
                    after_stop_ms: t - stop,
                })
            })
            .collect();
        // Stable: marks at the same millisecond keep the pipeline's order.
        m.sort_by(|a, b| a.after_stop_ms.total_cmp(&b.after_stop_ms));
        m
    }

    /// The steps between consecutive marks (from the `STOP`), longest first.
    pub fn steps(&self) -> Vec<Step> {
        let mut prev = ("STOP", 0.0);
        let mut out: Vec<Step> = self
            .marks()
            .into_iter()
            .map(|m| {
                let step = Step {
                    from: prev.0,
                    to: m.what,
                    ms: m.after_stop_ms - prev.1,
                };
                prev = (m.what, m.after_stop_ms);
                step
            })
            .collect();
        out.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        out
    }

    /// The marks as one line: `END part +12, EOS +640, …` (empty without a `STOP`).
    pub fn to_line(&self) -> String {
        let mut t = String::new();
        for (i, m) in self.marks().iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            let _ = write!(t, "{sep}{} +{:.0}", m.what, m.after_stop_ms);
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeline() -> Timeline {
        Timeline {
            stop: Some(1000.0),
            sender: SenderMarks {
                ram_end: Some(1010.0),
                eos: Some(1600.0),
                checked: Some(1800.0),
                end_queued: Some(1805.0),
                last_written: Some(1900.0),
                ..SenderMarks::default()
            },
            receiver: ReceiverMarks {
                end_read: Some(1930.0),
                last_verified: Some(1700.0),
                last_emitted: Some(1935.0),
            },
            // The destination had everything (the EOF marker) before pct's `End`.
            loaded: Some(1920.0),
            resumed: Some(1950.0),
        }
    }

    #[test]
    fn marks_are_in_time_order_from_the_stop() {
        let line = timeline().to_line();
        assert_eq!(
            line,
            "END part +10, EOS +600, verified +700, checked +800, End queued +805, \
             written +900, loaded +920, End read +930, emitted +935, resumed +950"
        );
    }

    #[test]
    fn steps_add_up_to_the_downtime_longest_first() {
        let steps = timeline().steps();
        let first = &steps[0];
        assert_eq!((first.from, first.to, first.ms), ("END part", "EOS", 590.0));
        let total: f64 = steps.iter().map(|s| s.ms).sum();
        assert_eq!(total, 950.0);
    }

    #[test]
    fn no_stop_no_timeline() {
        let t = Timeline {
            stop: None,
            ..timeline()
        };
        assert!(t.marks().is_empty() && t.to_line().is_empty());
    }

    #[test]
    fn receiver_marks_read_from_an_older_report_are_absent() {
        let m: ReceiverMarks = serde_json::from_str("{}").expect("defaults");
        assert_eq!(m, ReceiverMarks::default());
    }
}
