#!/usr/bin/env python3
"""Independent oracle: list the page-cache page frames of one filesystem with drgn.

    tools/drgn-pagecache.py CORE.elf VMLINUX DEVNAME

Walks super_blocks -> s_inodes -> i_mapping->i_pages with drgn's own helpers on a
QEMU `dump-guest-memory` ELF core and prints one line per cached page:
`ino index pfn`. Used by pct's tests to check pct's walk against drgn's.
"""
import sys

import drgn
from drgn.helpers.linux.list import list_for_each_entry
from drgn.helpers.linux.mm import page_to_pfn
from drgn.helpers.linux.xarray import xa_for_each, xa_is_value


def bdev_mapping(bdev):
    """The block device's page cache: bd_mapping since 6.10, its bd_inode's before."""
    try:
        return bdev.bd_mapping
    except AttributeError:
        return bdev.bd_inode.i_mapping


def main(core, vmlinux, dev):
    prog = drgn.Program()
    prog.set_core_dump(core)
    prog.load_debug_info([vmlinux])
    out = []
    for sb in list_for_each_entry("struct super_block", prog["super_blocks"].address_of_(), "s_list"):
        if sb.s_id.string_().decode() != dev:
            continue
        for inode in list_for_each_entry("struct inode", sb.s_inodes.address_of_(), "i_sb_list"):
            mapping = inode.i_mapping
            if not mapping or mapping.nrpages == 0:
                continue
            for index, entry in xa_for_each(mapping.i_pages.address_of_()):
                if xa_is_value(entry):
                    continue
                page = drgn.cast("struct page *", entry)
                out.append(f"{inode.i_ino.value_()} {index} {page_to_pfn(page).value_()}")
        for index, entry in xa_for_each(bdev_mapping(sb.s_bdev).i_pages.address_of_()):
            if not xa_is_value(entry):
                out.append(f"bdev {index} {page_to_pfn(drgn.cast('struct page *', entry)).value_()}")
    print("\n".join(out))


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
