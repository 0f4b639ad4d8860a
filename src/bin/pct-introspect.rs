//! `pct-introspect`: build kernel profiles and inspect a guest's page cache from outside.

use clap::Parser;

#[derive(Parser)]
#[command(name = "pct-introspect", version, about = "Agentless page-cache introspection of Linux guests")]
enum Cmd {}

fn main() {
    let _ = Cmd::parse();
}
