//! Write the seed corpus of every fuzz target to `fuzz/corpus/<target>/`.
//! Usage: `cargo run --release -p spiel --example fuzz_seeds [ASSET_HOME]`.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    let home = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(spiel::formats::assets::home);
    for target in spiel::testkit::fuzzing::Target::ALL {
        let dir = root.join(target.name());
        std::fs::create_dir_all(&dir)?;
        let seeds = spiel::testkit::fuzzing::seeds(target, &home)?;
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(name), bytes)?;
        }
        println!("{:<20} {} seeds", target.name(), seeds.len());
    }
    Ok(())
}
