//! The command line every broker connector shares: `--config FILE`, and the `replay`
//! subcommand. Each binary parses it with its own name and description:
//!
//! ```no_run
//! use connector_sdk::cli::{ConnectorArgs, ConnectorCommand};
//! let args = ConnectorArgs::parse_for("spool-connector", "Delivers spooled files to functions");
//! if let Some(ConnectorCommand::Replay(_)) = args.command { /* replay */ }
//! ```

use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches};

use crate::replay::ReplayArgs;

/// `<connector> [--config FILE] [replay ...]`.
#[derive(Debug, clap::Parser)]
#[command(version)]
pub struct ConnectorArgs {
    /// TOML configuration file.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Without a subcommand: run the connector.
    #[command(subcommand)]
    pub command: Option<ConnectorCommand>,
}

/// The subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ConnectorCommand {
    /// Deliver the dead letters again (to the function named in each), removing each from
    /// the dead-letter destination once delivered.
    Replay(ReplayArgs),
}

impl ConnectorArgs {
    /// Parses the process's arguments for the binary `name`, described as `about` in
    /// `--help`; exits with clap's message on an error.
    pub fn parse_for(name: &'static str, about: &'static str) -> Self {
        let matches = Self::command().name(name).about(about).get_matches();
        Self::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_and_replay() {
        let m = ConnectorArgs::command()
            .name("x")
            .try_get_matches_from(["x", "replay", "--config", "c.toml", "--limit", "2"])
            .unwrap();
        let args = ConnectorArgs::from_arg_matches(&m).unwrap();
        assert_eq!(args.config.as_deref(), Some(std::path::Path::new("c.toml")));
        assert!(matches!(args.command, Some(ConnectorCommand::Replay(r)) if r.limit == Some(2)));
    }
}
