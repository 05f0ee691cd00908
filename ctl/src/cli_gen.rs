//! Shell completions and man pages, generated from the clap definitions of both binaries, so
//! they never drift from `--help`.
//!
//! `nbdcryptctl completions SHELL [--for nbdcryptd]` prints a completion script;
//! `nbdcryptctl man DIR` writes nbdcryptctl.1, one nbdcryptctl-SUBCOMMAND.1 per subcommand and
//! nbdcryptd.8. Packaging (and the production guide) install them:
//!
//! ```text
//! nbdcryptctl completions bash > /usr/share/bash-completion/completions/nbdcryptctl
//! nbdcryptctl completions bash --for nbdcryptd > /usr/share/bash-completion/completions/nbdcryptd
//! nbdcryptctl completions zsh > /usr/share/zsh/vendor-completions/_nbdcryptctl
//! nbdcryptctl completions fish > /usr/share/fish/vendor_completions.d/nbdcryptctl.fish
//! nbdcryptctl man /usr/share/man/man1 && mv /usr/share/man/man1/nbdcryptd.8 /usr/share/man/man8/
//! ```

use std::path::PathBuf;

use clap::{Args, CommandFactory, ValueEnum};
use clap_complete::Shell;

use crate::exit::Failure;

pub const COMPLETIONS_EXAMPLES: &str = "\
Examples:
  nbdcryptctl completions bash > /usr/share/bash-completion/completions/nbdcryptctl
  nbdcryptctl completions bash --for nbdcryptd > /usr/share/bash-completion/completions/nbdcryptd
  nbdcryptctl completions zsh > /usr/share/zsh/vendor-completions/_nbdcryptctl
  nbdcryptctl completions fish > ~/.config/fish/completions/nbdcryptctl.fish
  source <(nbdcryptctl completions bash)      # this shell only";

pub const MAN_EXAMPLES: &str = "\
Examples:
  nbdcryptctl man /usr/local/share/man/man1    # nbdcryptctl*.1 and nbdcryptd.8
  nbdcryptctl man /tmp/m && man -l /tmp/m/nbdcryptctl-unlock.1";

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    Nbdcryptctl,
    Nbdcryptd,
}

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// bash, zsh, fish (also elvish, powershell).
    #[arg(value_name = "SHELL")]
    pub shell: Shell,

    /// Which program the script completes.
    #[arg(long = "for", value_name = "PROGRAM", default_value = "nbdcryptctl")]
    pub program: Program,
}

#[derive(Args, Debug)]
pub struct ManArgs {
    /// Directory to write the pages into (created if missing).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

fn command(p: Program) -> clap::Command {
    match p {
        Program::Nbdcryptctl => crate::Cli::command(),
        Program::Nbdcryptd => nbdcrypt::config::Args::command(),
    }
}

pub fn completions(a: CompletionsArgs) -> Result<(), Failure> {
    let mut cmd = command(a.program);
    let name = cmd.get_name().to_owned();
    clap_complete::generate(a.shell, &mut cmd, name, &mut std::io::stdout());
    Ok(())
}

pub fn man(a: ManArgs) -> Result<(), Failure> {
    let fail = |e: std::io::Error| {
        Failure::error(format!(
            "cannot write man pages to {}: {e}",
            a.dir.display()
        ))
    };
    std::fs::create_dir_all(&a.dir).map_err(fail)?;
    clap_mangen::generate_to(command(Program::Nbdcryptctl), &a.dir).map_err(fail)?;
    let d = clap_mangen::Man::new(command(Program::Nbdcryptd)).section("8");
    d.generate_to(&a.dir).map_err(fail)?;
    let n = std::fs::read_dir(&a.dir).map_err(fail)?.count();
    eprintln!("wrote man pages to {} ({n} files)", a.dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbdcrypt::seal::registry::PROVIDERS;

    /// `enroll`'s line in `nbdcryptctl --help` names every key provider the registry has, so
    /// adding one without saying so fails here.
    #[test]
    fn enroll_one_line_help_names_every_provider() {
        let cmd = command(Program::Nbdcryptctl);
        let enroll = cmd.find_subcommand("enroll").expect("enroll subcommand");
        let about = enroll
            .get_about()
            .expect("enroll has a one-line help")
            .to_string();
        for p in PROVIDERS {
            assert!(
                about.contains(p.label()),
                "enroll's one-line help {about:?} does not name {:?}",
                p.label()
            );
        }
    }

    /// Every command that reports takes `--json`.
    #[test]
    fn reporting_commands_take_json() {
        let cmd = command(Program::Nbdcryptctl);
        for name in [
            "status",
            "dump",
            "test-key",
            "test-token",
            "policy",
            "bench",
        ] {
            let sub = cmd
                .find_subcommand(name)
                .unwrap_or_else(|| panic!("no subcommand {name}"));
            assert!(
                sub.get_arguments().any(|a| a.get_long() == Some("json")),
                "{name} has no --json"
            );
        }
    }
}
