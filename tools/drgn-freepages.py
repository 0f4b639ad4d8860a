#!/usr/bin/env python3
"""Independent oracle: list the page frames free in the buddy allocator, with drgn.

    tools/drgn-freepages.py CORE.elf VMLINUX

Walks every online node's zones, and each zone's free_area[order].free_list[migratetype]
lists (the allocator's own lists, not the page_type flags pct reads), on a QEMU
`dump-guest-memory` ELF core. Prints one line per free block: `pfn order`. Used by pct's
tests to check pct's `PageBuddy` scan of the struct page array against the free lists.
"""
import sys

import drgn
from drgn.helpers.linux.list import list_for_each_entry
from drgn.helpers.linux.mm import page_to_pfn


def pgdats(prog):
    try:
        nodes = prog["node_data"]
    except KeyError:  # a kernel without CONFIG_NUMA
        yield prog["contig_page_data"]
        return
    for i in range(len(nodes)):
        if nodes[i]:
            yield nodes[i][0]


def main(core, vmlinux):
    prog = drgn.Program()
    prog.set_core_dump(core)
    prog.load_debug_info([vmlinux])
    # The list linkage of a free page: `buddy_list` since 5.19, `lru` before.
    link = "buddy_list" if prog.type("struct page").has_member("buddy_list") else "lru"
    out = []
    for pgdat in pgdats(prog):
        for z in range(pgdat.nr_zones.value_()):
            zone = pgdat.node_zones[z]
            for order in range(len(zone.free_area)):
                area = zone.free_area[order]
                for mt in range(len(area.free_list)):
                    head = area.free_list[mt].address_of_()
                    for page in list_for_each_entry("struct page", head, link):
                        out.append(f"{page_to_pfn(page).value_()} {order}")
    print("\n".join(out))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
