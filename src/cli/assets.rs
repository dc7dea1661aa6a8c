//! `xenmig assets DIR` (hidden): man pages and shell completions, generated
//! from the clap definitions, so they can never drift from the flags.
//! scripts/package.sh runs it for the .deb.
//!
//! Writes `DIR/man/xenmig.1`, one `DIR/man/xenmig-COMMAND.1` per visible
//! subcommand, and `DIR/completions/{xenmig.bash,_xenmig,xenmig.fish}`.

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
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, "xenmig", &completions)
            .with_context(|| format!("writing {shell} completions to {}", completions.display()))?;
    }
    Ok(0)
}

fn write_man(cmd: &clap::Command, path: &Path) -> anyhow::Result<()> {
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut out)?;
    fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}
