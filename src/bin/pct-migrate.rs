//! `pct-migrate`: live migration of a stock QEMU VM with page-cache teleportation.

use clap::Parser;

#[derive(Parser)]
#[command(name = "pct-migrate", version, about = "Live migration with page-cache teleportation")]
enum Cmd {}

fn main() {
    let _ = Cmd::parse();
}
