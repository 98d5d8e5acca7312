//! `weft token issue`: signed tokens for a relay with `--auth-secret-file`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;

use crate::common::{CliError, CliResult, out};

#[derive(Subcommand)]
pub(crate) enum TokenCmd {
    /// Print a new token (HS256) signed with the relay's secret.
    Issue {
        /// The file holding the relay's secret (at least 32 bytes).
        #[arg(long)]
        secret_file: PathBuf,
        /// Who the token is for (shown in the relay's log).
        #[arg(long)]
        sub: String,
        /// Collections it may read, comma-separated; `*` for all.
        #[arg(long, default_value = "")]
        read: String,
        /// Collections it may write, comma-separated; `*` for all. Writing needs reading too.
        #[arg(long, default_value = "")]
        write: String,
        /// How long it is valid: a number with a unit, s, m, h or d (`90m`, `24h`, `30d`).
        #[arg(long, default_value = "24h", value_parser = parse_ttl)]
        ttl: Duration,
    },
}

/// `24h`, `90m`, `30d`, `45s`.
pub(crate) fn parse_ttl(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?}: expected a number with a unit, like 24h"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    n.checked_mul(seconds)
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?}: out of range"))
}

/// `weft token issue`.
pub(crate) fn token_cmd(cmd: TokenCmd) -> CliResult {
    use weft::net::auth::{TokenKey, parse_list};
    match cmd {
        TokenCmd::Issue {
            secret_file,
            sub,
            read,
            write,
            ttl,
        } => {
            let key =
                TokenKey::from_file(&secret_file).map_err(|e| CliError::Input(e.to_string()))?;
            let read = parse_list(&read).map_err(|e| CliError::Input(e.to_string()))?;
            let write = parse_list(&write).map_err(|e| CliError::Input(e.to_string()))?;
            // A token that allows nothing, or less than asked for, is a mistake: say so now
            // rather than when a client is refused.
            if read == weft::Scope::Collections(Vec::new()) {
                return Err(CliError::Usage(
                    "a token without --read allows nothing (writing needs reading too): pass \
                     --read with the collections it may read, `*` for all"
                        .into(),
                ));
            }
            let unreadable = match (&write, &read) {
                (_, weft::Scope::All) => Vec::new(),
                (weft::Scope::All, weft::Scope::Collections(_)) => vec!["*".to_owned()],
                (weft::Scope::Collections(w), weft::Scope::Collections(r)) => {
                    w.iter().filter(|c| !r.contains(c)).cloned().collect()
                }
            };
            if !unreadable.is_empty() {
                return Err(CliError::Usage(format!(
                    "--write {0}: a token can write only collections it can also read: add {0} to \
                     --read",
                    unreadable.join(",")
                )));
            }
            let token = key
                .issue(&sub, &read, &write, ttl)
                .map_err(|e| CliError::Io(e.to_string()))?;
            out(&token)
        }
    }
}
