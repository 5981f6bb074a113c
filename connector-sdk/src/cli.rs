//! The command line every connector binary shares: `--config FILE`, and the `replay`
//! subcommand of [`crate::replay`].

use std::path::PathBuf;

use crate::replay::ReplayArgs;

/// `<connector> [--config FILE] [replay ...]`.
#[derive(Debug, clap::Parser)]
pub struct ConnectorArgs {
    /// TOML configuration file.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Without a subcommand: run the connector.
    #[command(subcommand)]
    pub command: Option<ConnectorCommand>,
}

/// What to do instead of running the connector.
#[derive(Debug, clap::Subcommand)]
pub enum ConnectorCommand {
    /// Deliver the dead letters again (to the function named in each), removing each from
    /// the dead-letter destination once delivered.
    Replay(ReplayArgs),
}

impl ConnectorArgs {
    /// Parses the process's arguments (exiting with clap's message on an error); `about` is
    /// the binary's one line for `--help`.
    pub fn parse(about: &'static str) -> Self {
        use clap::{CommandFactory, FromArgMatches};
        let matches = Self::command().about(about).get_matches();
        Self::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn config_and_replay() {
        let a =
            ConnectorArgs::try_parse_from(["c", "replay", "--config", "x.toml", "--limit", "2"])
                .unwrap();
        assert_eq!(a.config.unwrap().to_str(), Some("x.toml"));
        let Some(ConnectorCommand::Replay(r)) = a.command else {
            panic!("no replay");
        };
        assert_eq!(r.limit, Some(2));
        assert!(
            ConnectorArgs::try_parse_from(["c"])
                .unwrap()
                .command
                .is_none()
        );
    }
}
