#!/usr/bin/env python3
"""Tables and plots of a tools/bench-paper.sh run.

    python3 tools/bench-paper-report.py DIR

Reads DIR/runs.jsonl (one line per migration) and, when there, DIR/readrate.log and
DIR/readrate.marks; writes DIR/tables.md and, with matplotlib, DIR/total-time.png,
DIR/bytes.png and DIR/read-throughput.png. Each table cell is the median over the runs,
the spread (min–max) and the ratio of the medians to stock QEMU's in the same cell.
"""
import json
import os
import statistics
import sys

CONFIGS = ["stock", "drop", "raw", "pct", "pct-free"]
LABELS = {
    "stock": "stock QEMU",
    "drop": "stock after drop_caches",
    "raw": "pct, no teleport/zstd",
    "pct": "pct",
    "pct-free": "pct + free-page elision",
}
WORKLOADS = ["apache", "db", "idle", "aged"]


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def cells_of(runs):
    keys = {(r["workload"], r["mbit"]) for r in runs}
    return sorted(keys, key=lambda k: (WORKLOADS.index(k[0]), k[1]))


def values(runs, cell, config, key):
    return [
        r[key]
        for r in runs
        if (r["workload"], r["mbit"]) == cell and r["config"] == config and r.get(key) is not None
    ]


def table(runs, key, title, fmt, unit):
    configs = [c for c in CONFIGS if any(r["config"] == c for r in runs)]
    lines = [f"### {title}", "", "median (min–max) and ratio of medians to stock QEMU; " + unit, ""]
    lines.append("| workload | link | " + " | ".join(LABELS[c] for c in configs) + " |")
    lines.append("|---|---:|" + "---:|" * len(configs))
    for cell in cells_of(runs):
        stock = values(runs, cell, "stock", key)
        base = statistics.median(stock) if stock else None
        row = [cell[0], f"{cell[1]} Mbit/s"]
        for c in configs:
            v = values(runs, cell, c, key)
            stuck = [
                r
                for r in runs
                if (r["workload"], r["mbit"]) == cell and r["config"] == c and r.get("converged") is False
            ]
            late = f" ({len(stuck)} more did not converge in {stuck[0]['timeout_s']} s)" if stuck else ""
            if not v:
                row.append("did not converge" + late if stuck else "–")
                continue
            m = statistics.median(v)
            s = f"{fmt(m)} ({fmt(min(v))}–{fmt(max(v))})"
            if base and c != "stock":
                s += f" **{m / base:.3f}×**"
            row.append(s + late)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def ratio(runs, cell, config, key):
    v, s = values(runs, cell, config, key), values(runs, cell, "stock", key)
    if not v or not s:
        return None
    return statistics.median(v) / statistics.median(s)


def goals(runs):
    """The issue's goals, each MET or NOT MET on these runs (or not measured)."""
    checks = [
        (("aged", 50), "pct-free", "wire_bytes", 0.10, "aged guest, bytes on the link"),
        (("apache", 50), "pct-free", "wire_bytes", 0.06, "apache guest, bytes on the link"),
        (("apache", 50), "pct-free", "total_s", 0.08, "apache guest, total time"),
        (("db", 50), "pct-free", "wire_bytes", 1.0, "db guest, bytes on the link"),
        (("db", 50), "pct-free", "total_s", 1.0, "db guest, total time"),
        (("idle", 50), "pct-free", "wire_bytes", 1.0, "idle guest, bytes on the link"),
        (("idle", 50), "pct-free", "total_s", 1.0, "idle guest, total time"),
    ]
    lines = ["### Goals (pct with free-page elision against stock QEMU, 50 Mbit/s)", ""]
    lines.append("| goal | ratio | goal | result |")
    lines.append("|---|---:|---:|---|")
    for cell, config, key, goal, what in checks:
        r = ratio(runs, cell, config, key)
        if r is None:
            lines.append(f"| {what} | not measured | {'≤' if goal < 1 else '<'} {goal:.2f}× | – |")
        else:
            verdict = "met" if (r <= goal if goal < 1 else r < goal) else "**NOT MET**"
            lines.append(f"| {what} | {r:.3f}× | {'≤' if goal < 1 else '<'} {goal:.2f}× | {verdict} |")
    return "\n".join(lines) + "\n"


def pages_table(runs):
    lines = ["### Pages teleported, elided and fallen back (median over runs)", ""]
    lines.append("| workload | link | configuration | teleported | elided | fallen back | restore s |")
    lines.append("|---|---:|---|---:|---:|---:|---:|")
    for cell in cells_of(runs):
        for c in ("pct", "pct-free"):
            t = values(runs, cell, c, "teleported")
            if not t:
                continue
            med = lambda k: statistics.median(values(runs, cell, c, k))
            lines.append(
                f"| {cell[0]} | {cell[1]} Mbit/s | {LABELS[c]} | {med('teleported'):.0f} | "
                f"{med('elided'):.0f} | {med('fallen_back'):.0f} | {med('restore_s'):.2f} |"
            )
    return "\n".join(lines) + "\n"


def readrate(d):
    log, marks = os.path.join(d, "readrate.log"), os.path.join(d, "readrate.marks")
    if not (os.path.exists(log) and os.path.exists(marks)):
        return None
    m = {}
    with open(marks) as f:
        for line in f:
            k, t = line.split()
            m[k] = float(t)
    pts = []
    with open(log) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 4 and parts[1] == "PCT-READRATE":
                pts.append((float(parts[0]) - m["start"], float(parts[3])))
    pts.sort()
    return m, pts


def readrate_summary(rr):
    m, pts = rr
    t0 = m["start"]
    window = lambda a, b: [v for t, v in pts if a <= t < b]
    rows = [
        ("before any migration", 5, m["pct-begin"] - t0),
        ("during pct", m["pct-begin"] - t0, m["pct-end"] - t0),
        ("10 s after pct", m["pct-end"] - t0, m["pct-end"] - t0 + 10),
        ("during drop_caches + stock", m["drop-begin"] - t0, m["drop-end"] - t0),
        ("10 s after drop_caches + stock", m["drop-end"] - t0, m["drop-end"] - t0 + 10),
    ]
    lines = ["### The guest's file-read throughput (MB/s, median of the 1 s samples)", ""]
    lines.append("| phase | seconds | median MB/s | min MB/s |")
    lines.append("|---|---:|---:|---:|")
    for name, a, b in rows:
        v = window(a, b)
        if v:
            lines.append(f"| {name} | {b - a:.0f} | {statistics.median(v):.0f} | {min(v):.0f} |")
    return "\n".join(lines) + "\n"


def plots(d, runs, rr):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return []
    written = []
    cells = cells_of(runs)
    configs = [c for c in CONFIGS if any(r["config"] == c for r in runs)]
    colors = dict(zip(CONFIGS, ["#555555", "#999999", "#d08c2c", "#3a78b5", "#2a9d5c"]))
    for key, name, ylabel, scale in (
        ("total_s", "total-time.png", "total migration time (s)", 1),
        ("wire_bytes", "bytes.png", "bytes on the link (MB)", 1e-6),
    ):
        fig, axes = plt.subplots(1, len(cells), figsize=(3.2 * len(cells), 4), squeeze=False)
        for ax, cell in zip(axes[0], cells):
            for i, c in enumerate(configs):
                v = values(runs, cell, c, key)
                if not v:
                    continue
                med = statistics.median(v) * scale
                lo, hi = min(v) * scale, max(v) * scale
                ax.bar(i, med, color=colors[c], yerr=[[med - lo], [hi - med]], capsize=3)
                if key == "total_s":
                    rs = values(runs, cell, c, "restore_s")
                    if rs and statistics.median(rs) > 0:
                        ax.bar(i, statistics.median(rs), color="none", edgecolor="black", hatch="//")
                ax.text(i, hi, f"{med:.0f}" if med >= 10 else f"{med:.1f}", ha="center", va="bottom", fontsize=7)
            ax.set_title(f"{cell[0]}, {cell[1]} Mbit/s", fontsize=9)
            ax.set_xticks(range(len(configs)))
            ax.set_xticklabels([LABELS[c] for c in configs], rotation=60, ha="right", fontsize=7)
        axes[0][0].set_ylabel(ylabel + (" (hatched: restore)" if key == "total_s" else ""))
        fig.tight_layout()
        fig.savefig(os.path.join(d, name), dpi=110)
        plt.close(fig)
        written.append(name)
    if rr:
        m, pts = rr
        t0 = m["start"]
        fig, ax = plt.subplots(figsize=(9, 3.6))
        ax.plot([t for t, _ in pts], [v for _, v in pts], color="#3a78b5", lw=1.2, marker=".", ms=3)
        ax.axvspan(m["pct-begin"] - t0, m["pct-end"] - t0, color="#2a9d5c", alpha=0.25, label="pct migration")
        ax.axvspan(m["drop-begin"] - t0, m["drop-end"] - t0, color="#999999", alpha=0.35,
                   label="drop_caches + stock QEMU migration")
        ax.set_xlabel("time (s)")
        ax.set_ylabel("guest file reads (MB/s)")
        ax.set_title("apache guest reading its 300 MB file set in a loop, 50 Mbit/s link")
        ax.legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(d, "read-throughput.png"), dpi=110)
        plt.close(fig)
        written.append("read-throughput.png")
    return written


def main():
    d = sys.argv[1]
    runs = load(os.path.join(d, "runs.jsonl"))
    rr = readrate(d)
    parts = ["# pct against stock QEMU: the paper's evaluation on lab guests", ""]
    for name in ("machine.txt", "command.txt"):
        p = os.path.join(d, name)
        if os.path.exists(p):
            parts.append("```\n" + open(p).read().strip() + "\n```\n")
    if runs:
        parts.append(goals(runs))
        parts.append(table(runs, "wire_bytes", "Bytes on the link", lambda v: f"{v / 1e6:.1f}", "MB"))
        parts.append(table(runs, "total_s", "Total migration time", lambda v: f"{v:.1f}", "seconds"))
        parts.append(table(runs, "downtime_ms", "Downtime (source STOP to destination RESUME)",
                           lambda v: f"{v:.0f}", "ms"))
        parts.append(pages_table(runs))
    if rr:
        parts.append(readrate_summary(rr))
    written = plots(d, runs, rr)
    parts += [f"![{w}]({w})\n" for w in written]
    with open(os.path.join(d, "tables.md"), "w") as f:
        f.write("\n".join(parts))
    print(open(os.path.join(d, "tables.md")).read())


if __name__ == "__main__":
    main()
