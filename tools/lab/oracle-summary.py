#!/usr/bin/env python3
"""Summarise a lab guest's own page-cache report (pct-oracle output on oracle.img).

    tools/lab/oracle-summary.py RUNDIR/oracle.img

The figures are the guest's truth that pct's introspection is measured against.
"""
import sys

UPTODATE, DIRTY, WRITEBACK, LOCKED, ANON, SWAPBACKED = 1 << 3, 1 << 4, 1 << 8, 1 << 0, 1 << 12, 1 << 14


def main(path):
    raw = open(path, "rb").read()
    text = raw[: raw.index(b"\0")].decode("utf-8", "replace")
    files = pages = clean = dirty = shmem = 0
    per_file = []
    cur = None
    for line in text.splitlines()[1:]:
        kind, _, rest = line.partition(" ")
        if kind == "F":
            files += 1
            cur = [rest.split(" ", 3)[3], 0]
            per_file.append(cur)
        elif kind == "P":
            flags = int(rest.split()[2], 16)
            pages += 1
            if flags & SWAPBACKED:
                shmem += 1
            elif flags & (DIRTY | WRITEBACK):
                dirty += 1
            elif flags & UPTODATE and not flags & (LOCKED | ANON):
                clean += 1
                cur[1] += 1
    mib = lambda n: n * 4096 / 2**20
    print(f"guest's own view: {files} files, {pages} resident page-cache pages ({mib(pages):.1f} MiB)")
    print(f"  clean, disk-backed: {clean} pages ({mib(clean):.1f} MiB)")
    print(f"  dirty or writeback: {dirty} pages ({mib(dirty):.1f} MiB)")
    print(f"  tmpfs/shmem:        {shmem} pages ({mib(shmem):.1f} MiB)")
    for name, n in sorted(per_file, key=lambda f: -f[1])[:5]:
        safe = "".join(c if c.isprintable() else "?" for c in name)
        print(f"  {mib(n):8.2f} MiB clean  {safe}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
