//! `xenmig assets DIR` (hidden): man pages and shell completions, generated
//! from the clap definitions, so they can never drift from the flags.
//! scripts/package.sh runs it for the .deb.
//!
//! Writes `DIR/man/xenmig.1`, one `DIR/man/xenmig-COMMAND.1` per visible
//! subcommand, and `DIR/completions/{xenmig.bash,_xenmig,xenmig.fish}`.
//! Hidden commands and flags (this generator, migrate's helpers,
//! `serve --allow-open-by`) are in neither: clap_complete's generators
//! offer everything they are given, so they get a copy of the definitions
//! with the hidden parts left out.

use std::fs;
use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;

pub fn generate(dir: &Path) -> anyhow::Result<i32> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man, &completions] {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut cmd = super::Cli::command();
    cmd.build();
    write_man(&cmd, &man.join("xenmig.1"))?;
    // `help` is clap's own; it needs no page.
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        let name = format!("xenmig-{}", sub.get_name());
        // The page's NAME and SYNOPSIS say `xenmig-copy`, as git's do.
        let page =
            sub.clone().name(name.clone()).display_name(name.clone()).bin_name(format!("xenmig {}", sub.get_name()));
        write_man(&page, &man.join(format!("{name}.1")))?;
    }
    let mut visible = without_hidden(&super::Cli::command());
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut visible, "xenmig", &completions)
            .with_context(|| format!("writing {shell} completions to {}", completions.display()))?;
    }
    Ok(0)
}

fn write_man(cmd: &clap::Command, path: &Path) -> anyhow::Result<()> {
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut out)?;
    fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

/// `cmd` (not yet built) without its hidden subcommands and flags, for the
/// completion generators. Only what they read is carried over: names,
/// descriptions, the version, flags and subcommands. clap adds `--help`,
/// `--version` and the `help` subcommand again when the copy is built, so
/// `help` lists only the visible commands too.
fn without_hidden(cmd: &clap::Command) -> clap::Command {
    let mut out = clap::Command::new(cmd.get_name().to_string())
        .subcommand_required(cmd.is_subcommand_required_set())
        .args(cmd.get_arguments().filter(|a| !a.is_hide_set()).cloned())
        .subcommands(cmd.get_subcommands().filter(|s| !s.is_hide_set()).map(without_hidden));
    if let Some(a) = cmd.get_about() {
        out = out.about(a.clone());
    }
    if let Some(a) = cmd.get_long_about() {
        out = out.long_about(a.clone());
    }
    if let Some(v) = cmd.get_version() {
        out = out.version(v.to_string());
    }
    out
}
