//! `spiel inspect`: describe an adapter directory.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

/// `spiel inspect` arguments.
#[derive(Args)]
pub struct InspectArgs {
    /// The adapter directory.
    adapter: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl InspectArgs {
    /// Run the command.
    pub fn run(self) -> Result<()> {
        let InspectArgs { adapter, json } = self;
        let report = spiel::tasks::inspect::inspect(&adapter)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", report.render());
        }
        Ok(())
    }
}
