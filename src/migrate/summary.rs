//! Statistics of one migration: built from the sender's and the receiver's reports, printed
//! as text for people and as JSON for programs (`pct-migrate --json`).

use super::freemap::ElisionReport;
use super::receiver::ReceiverReport;
use super::sender::SenderReport;
use super::switchover::SwitchoverReport;
use super::timeline::{Step, Timeline};
use serde::Serialize;
use std::fmt::Write;

/// Bytes on the wire, sender → receiver and back, by kind.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WireBytes {
    pub total: u64,
    /// Data frames: QEMU's stream other than teleported pages, compressed.
    pub data: u64,
    /// Reference frames without their hashes.
    pub references: u64,
    pub hashes: u64,
    /// Fallback requests and replies.
    pub fallback: u64,
    /// Hello, acks, end, report, complete.
    pub protocol: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Pages {
    /// Sent as references.
    pub teleported: u64,
    /// Restored from the destination's disk with a matching hash.
    pub verified: u64,
    /// Hash mismatch or read error: original bytes sent after all.
    pub fallen_back: u64,
    /// `ZERO` records (QEMU's own zero-page detection).
    pub zero: u64,
    /// `PAGE` records sent as data.
    pub sent: u64,
    /// `PAGE` records of pages free in the guest, sent as zero pages (free-page elision).
    pub elided: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Timing {
    /// From `migrate` to the receiver's confirmation that the destination loaded it all.
    pub total_s: f64,
    /// QEMU's own downtime figure (source side: stop to end of its stream).
    pub downtime_qemu_ms: Option<u64>,
    /// Source stopped (its QMP `STOP` event) to the destination guest resumed (its
    /// `RESUME` event), or, for a destination kept paused, to the destination QEMU had
    /// loaded everything (`MIGRATION completed`). Event times are the hosts' wall clocks.
    pub downtime_end_to_end_ms: Option<f64>,
    /// QEMU's `downtime-limit` on the source: the pause the operator allowed.
    pub downtime_limit_ms: Option<u64>,
    /// Taking the cache map.
    pub scan_s: Option<f64>,
    /// Of which: finding the free blocks in the `struct page` array (free-page elision).
    pub free_scan_ms: Option<f64>,
    /// Receiver: reading and hashing teleported pages.
    pub restore_s: Option<f64>,
}

/// Everything `pct-migrate` reports about one migration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub result: String,
    pub teleport: bool,
    /// Bytes of QEMU's stream (what stock QEMU would put on the link).
    pub stream_bytes: u64,
    /// Bytes of stream the receiver fed the destination QEMU, as it confirmed: QEMU's
    /// stream with elided free pages as zero pages and with the pages the switchover check
    /// re-sent.
    pub destination_stream_bytes: u64,
    pub wire: WireBytes,
    pub pages: Pages,
    /// Stream bytes in data frames / their bytes on the wire.
    pub compression_ratio: f64,
    /// (reference + hash bytes) per teleported page.
    pub reference_bytes_per_page: f64,
    /// Wire bytes / stream bytes.
    pub wire_ratio: f64,
    pub time: Timing,
    /// Cache map size when it was taken.
    pub map_pages: u64,
    /// For guest RAM that is anonymous memory of QEMU: the bytes of it pct copied in from
    /// `/proc/PID/mem` to take the cache map (what it held of the guest's RAM). `None` for
    /// a RAM file, which is mapped, not copied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ram_copied_bytes: Option<u64>,
    pub capabilities_disabled: Vec<String>,
    /// Receiver's restore rate from its disk image, MB/s.
    pub restore_mb_per_s: Option<f64>,
    /// The check of the stream against the stopped source's RAM (`None`: not run).
    pub switchover_check: Option<SwitchoverReport>,
    /// What free-page elision did (`None`: off).
    pub free_elision: Option<ElisionReport>,
    /// The switchover, step by step, on both ends (the caller adds the source's `STOP`).
    pub timeline: Timeline,
    /// The downtime's steps, longest first ([`Timeline::steps`]).
    pub downtime_steps: Vec<Step>,
}

impl Summary {
    pub fn new(s: &SenderReport, teleport: bool) -> Summary {
        let w = &s.wire;
        let rx: Option<ReceiverReport> = s
            .receiver
            .report
            .as_ref()
            .and_then(|v| serde_json::from_value(v.clone()).ok());
        let fallen_back = rx.as_ref().map_or(s.fallback_pages, |r| r.fallback_pages);
        let wire = WireBytes {
            total: w.wire_total(),
            data: w.passthrough_wire,
            references: w.ref_wire - w.ref_hash_bytes,
            hashes: w.ref_hash_bytes,
            fallback: w.fallback_wire,
            protocol: w.control_wire,
        };
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let restore_s = rx.as_ref().map(|r| r.restore_seconds);
        let elided = s.elision.as_ref().map_or(0, |e| e.pages_elided);
        Summary {
            result: "completed".into(),
            teleport,
            stream_bytes: s.stream.total_bytes,
            destination_stream_bytes: s.receiver.stream_bytes,
            compression_ratio: ratio(w.passthrough_raw, w.passthrough_wire),
            reference_bytes_per_page: ratio(w.ref_wire, s.ref_pages),
            wire_ratio: ratio(wire.total, s.stream.total_bytes),
            wire,
            pages: Pages {
                teleported: s.ref_pages,
                verified: s.ref_pages - fallen_back.min(s.ref_pages),
                fallen_back,
                zero: s.stream.zero_pages,
                sent: s.stream.pages - s.ref_pages - elided,
                elided,
            },
            time: Timing {
                restore_s,
                ..Timing::default()
            },
            map_pages: s.map_pages,
            switchover_check: s.switchover.clone(),
            free_elision: s.elision.clone(),
            timeline: Timeline {
                sender: s.marks.clone(),
                receiver: rx.as_ref().map(|r| r.marks.clone()).unwrap_or_default(),
                loaded: rx.as_ref().and_then(|r| r.loaded_at_unix_ms),
                resumed: rx.as_ref().and_then(|r| r.resumed_at_unix_ms),
                ..Timeline::default()
            },
            restore_mb_per_s: rx
                .as_ref()
                .filter(|r| r.restore_seconds > 0.0)
                .map(|r| r.ref_pages as f64 * 4096.0 / r.restore_seconds / 1e6),
            ..Summary::default()
        }
    }

    /// Adds the source's `STOP` (Unix ms) to the timeline, and the steps it gives.
    pub fn stopped_at(&mut self, stop: Option<f64>) {
        self.timeline.stop = stop;
        self.downtime_steps = self.timeline.steps();
    }

    pub fn to_text(&self) -> String {
        let mut t = String::new();
        let mb = |b: u64| b as f64 / 1e6;
        let _ = writeln!(t, "migration {}", self.result);
        let _ = writeln!(
            t,
            "  QEMU stream      {:>10.1} MB   (what stock QEMU sends)",
            mb(self.stream_bytes)
        );
        let _ = writeln!(
            t,
            "  on the wire      {:>10.1} MB   ({:.3} x the stream)",
            mb(self.wire.total),
            self.wire_ratio
        );
        let w = &self.wire;
        let _ = writeln!(
            t,
            "    data {:.1} MB (compressed {:.2}:1), references {:.2} MB, hashes {:.2} MB, fallback {:.2} MB, protocol {:.3} MB",
            mb(w.data),
            self.compression_ratio,
            mb(w.references),
            mb(w.hashes),
            mb(w.fallback),
            mb(w.protocol)
        );
        let p = &self.pages;
        let _ = writeln!(
            t,
            "  pages            teleported {} (verified {}, fallen back {}), sent {}, zero {}",
            p.teleported, p.verified, p.fallen_back, p.sent, p.zero
        );
        if p.teleported > 0 {
            let _ = writeln!(
                t,
                "  reference cost   {:.2} bytes per teleported page (hashes included)",
                self.reference_bytes_per_page
            );
        }
        let tm = &self.time;
        let _ = write!(t, "  total time       {:>10.2} s", tm.total_s);
        if let Some(d) = tm.downtime_end_to_end_ms {
            let _ = write!(t, "   downtime {d:.0} ms end to end");
        }
        if let Some(d) = tm.downtime_qemu_ms {
            let _ = write!(t, " ({d} ms by QEMU)");
        }
        let _ = writeln!(t);
        if let Some(d) = tm.downtime_end_to_end_ms {
            let line = self.timeline.to_line();
            if !line.is_empty() {
                let _ = writeln!(t, "  downtime {d:.0} ms: {line}");
            }
            if let Some(limit) = tm.downtime_limit_ms.filter(|&l| d > l as f64) {
                let longest = self.downtime_steps.first().map_or(String::new(), |s| {
                    format!("; the longest step: {}→{} {:.0} ms", s.from, s.to, s.ms)
                });
                let _ = writeln!(
                    t,
                    "  warning: the guest was paused {:.0} ms longer than QEMU's downtime-limit of {limit} ms{longest}",
                    d - limit as f64
                );
            }
            let s = &self.timeline.sender;
            if let (Some(st), Some(w)) = (s.final_stream_bytes, s.final_wire_bytes) {
                let _ = writeln!(
                    t,
                    "    after the stop: {:.2} MB of QEMU stream, {:.2} MB on the wire; backlog then {:.2} MB on the link, {} pages short of the destination; {} round trips",
                    mb(st),
                    mb(w),
                    mb(s.backlog_bytes.unwrap_or(0)),
                    s.backlog_pages.unwrap_or(0),
                    s.final_requests
                );
            }
        }
        if let Some(s) = tm.scan_s {
            let _ = write!(
                t,
                "  cache map        {} pages, taken in {:.2} s",
                self.map_pages, s
            );
            if let Some(f) = tm.free_scan_ms {
                let _ = write!(t, " (free blocks {f:.0} ms)");
            }
            if let Some(c) = self.ram_copied_bytes {
                let _ = write!(t, "; {:.1} MB of guest RAM read into pct", mb(c));
            }
            let _ = writeln!(t);
        }
        if let (Some(s), Some(r)) = (tm.restore_s, self.restore_mb_per_s) {
            let _ = writeln!(
                t,
                "  restore          {s:.2} s at the receiver ({r:.0} MB/s)"
            );
        }
        if let Some(c) = &self.switchover_check {
            let _ = writeln!(
                t,
                "  switchover check {} pages compared with the stopped guest in {:.0} ms, {} re-sent (missed by QEMU's dirty tracking); hashed {} ({})",
                c.pages_checked,
                c.time.as_secs_f64() * 1e3,
                c.pages_resent,
                c.pages_hashed,
                match c.scope.as_str() {
                    "touched" => format!(
                        "those QEMU touched since a baseline {:.0} ms long, taken live",
                        c.baseline_time.as_secs_f64() * 1e3
                    ),
                    why => why.to_owned(),
                }
            );
        }
        if let Some(e) = &self.free_elision {
            let _ = writeln!(
                t,
                "  free pages       {} free when the map was taken, {} elided (sent as zero pages), {} of them sent again by QEMU, {} re-sent at the switchover (no longer free), {} left zero; re-check {:.1} ms; {} not elided (poisoned)",
                e.free_at_map,
                e.pages_elided,
                e.pages_sent_again,
                e.pages_resent,
                e.pages_left_zero,
                e.recheck_time.as_secs_f64() * 1e3,
                e.pages_poisoned
            );
        }
        if !self.capabilities_disabled.is_empty() {
            let _ = writeln!(
                t,
                "  switched off     {}",
                self.capabilities_disabled.join(", ")
            );
        }
        t
    }
}
