//! Flags over the configuration file: the one place that decides which
//! value a command's setting takes, and remembers why.
//!
//! Precedence, lowest first: the flag's default, the file's top level (or
//! its `migrate:` section), the section of the host the command talks to,
//! a flag given on the command line. `xenmig config` prints the same
//! decision this module makes for a real run.
//!
//! Which command takes which setting ([`configure`]):
//!
//! | command | settings from the file |
//! |---|---|
//! | `copy` | ssh, remote_xenmig, compress, hash, block_size, bwlimit, idle_timeout, references (host section: of the remote end), source_references (top level only) |
//! | `migrate` | the same (host section: HOST's; source_references top level only), and `migrate:` |
//! | `serve` | compress, hash, block_size, idle_timeout; bwlimit and source_references as `--source`, references as `--target` (top level only: it does not know its peer) |
//! | `hash`, `index` | hash, block_size |
//! | `similarity` | hash, block_size, references |
//!
//! Each of these also takes `log_format` (the global `--log-format`),
//! decided before stderr is set up. The others take nothing from the file
//! and do not read it.

use std::fmt::Display;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::ArgMatches;

use xenmig::config::{At, Config, HostSettings, LogFormat};
use xenmig::wire::rate::Rate;

use super::migrate::MigrateArgs;
use super::{Command, CopyArgs, HashArgs};

/// Where a setting's value came from.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Origin {
    Default,
    File { path: PathBuf, line: u64 },
    Host { host: String, path: PathBuf, line: u64 },
    Flag,
}

impl Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::File { path, line } => write!(f, "{}:{line}", path.display()),
            Origin::Host { host, path, line } => write!(f, "host section {host}, {}:{line}", path.display()),
            Origin::Flag => f.write_str("flag"),
        }
    }
}

/// One decided setting, for `xenmig config`.
pub(crate) struct Row {
    pub key: &'static str,
    pub value: String,
    pub origin: Origin,
}

/// Applies the configuration to one command's parsed flags.
struct Resolver<'a> {
    matches: &'a ArgMatches,
    path: PathBuf,
    host: Option<(&'a str, &'a HostSettings)>,
    rows: Vec<Row>,
}

impl<'a> Resolver<'a> {
    fn new(matches: &'a ArgMatches, cfg: &'a Config, host: Option<&'a str>) -> Self {
        let host = host.and_then(|h| cfg.host(h).map(|s| (xenmig::config::host_name(h), s)));
        let path = cfg.path.clone().unwrap_or_default();
        Resolver { matches, path, host, rows: Vec::new() }
    }

    /// The section of the host the command talks to, if the file has one.
    fn section(&self) -> Option<&'a HostSettings> {
        self.host.map(|(_, h)| h)
    }

    /// Decide `key`: a flag given on the command line (clap argument `id`)
    /// wins, then the host section, then the file; otherwise `current`
    /// keeps the flag's default.
    fn pick<T: Clone>(
        &mut self,
        key: &'static str,
        id: &str,
        current: &mut T,
        from_host: Option<&At<T>>,
        from_file: Option<&At<T>>,
        show: impl Fn(&T) -> String,
    ) {
        let origin = if self.matches.value_source(id) == Some(ValueSource::CommandLine) {
            Origin::Flag
        } else if let (Some(at), Some((name, _))) = (from_host, self.host) {
            *current = at.value.clone();
            Origin::Host { host: name.to_string(), path: self.path.clone(), line: at.line }
        } else if let Some(at) = from_file {
            *current = at.value.clone();
            Origin::File { path: self.path.clone(), line: at.line }
        } else {
            Origin::Default
        };
        self.rows.push(Row { key, value: show(current), origin });
    }
}

fn text(s: &str) -> String {
    s.to_string()
}

fn shown<T: Display>(v: &T) -> String {
    v.to_string()
}

/// Where a command's references are used: on this host (for the image
/// named, which a pattern never matches), or on another host.
#[derive(Clone, Debug)]
pub(crate) enum RefsAt {
    Here(Option<PathBuf>),
    Host(String),
}

/// A reference list for `xenmig config`: each pattern with what it
/// matches now, or, on another host, where it will be expanded.
fn references(v: &[PathBuf], at: &RefsAt) -> String {
    use xenmig::copy::refglob;
    if v.is_empty() {
        return "(none)".into();
    }
    let entry = |p: &PathBuf| {
        let shown = p.display();
        if !refglob::is_pattern(p) {
            return shown.to_string();
        }
        match at {
            RefsAt::Host(h) => format!("{shown} (a pattern, expanded on {h})"),
            RefsAt::Here(image) => match refglob::expand_entry(p, image.as_deref()) {
                Ok(m) if m.is_empty() => format!("{shown} (matches nothing)"),
                Ok(m) => {
                    format!("{shown} = [{}]", m.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))
                }
                Err(e) => format!("{shown} ({e})"),
            },
        }
    };
    v.iter().map(entry).collect::<Vec<_>>().join(", ")
}

/// The host a copy talks to: that of its remote end, if any.
pub(crate) fn copy_host(a: &CopyArgs) -> Option<String> {
    use xenmig::wire::transport::Location;
    [&a.src, &a.dst].into_iter().find_map(|s| match Location::parse(s) {
        Location::Remote { host, .. } => Some(host),
        Location::Local(_) => None,
    })
}

/// Where a copy's references are used: on DST's side.
fn copy_refs_at(a: &CopyArgs) -> RefsAt {
    use xenmig::wire::transport::Location;
    match Location::parse(&a.dst) {
        Location::Remote { host, .. } => RefsAt::Host(host),
        Location::Local(p) => RefsAt::Here(Some(p)),
    }
}

/// The settings `copy` and `migrate` share, as their flags hold them.
struct Shared<'s> {
    ssh: &'s mut String,
    remote_xenmig: &'s mut String,
    compress: &'s mut xenmig::wire::compress::Choice,
    hash: &'s mut super::HashArgs,
    bwlimit: &'s mut Rate,
    idle: &'s mut super::IdleArgs,
    references: &'s mut Vec<PathBuf>,
    refs_at: RefsAt,
}

/// Fill the shared settings from the host section and the file, where no
/// flag set them.
fn apply_shared(r: &mut Resolver<'_>, cfg: &Config, a: Shared<'_>) {
    let g = &cfg.general;
    let h = r.section();
    r.pick("ssh", "ssh", a.ssh, h.and_then(|h| h.ssh.as_ref()), g.ssh.as_ref(), |s| text(s));
    r.pick(
        "remote_xenmig",
        "remote_xenmig",
        a.remote_xenmig,
        h.and_then(|h| h.remote_xenmig.as_ref()),
        g.remote_xenmig.as_ref(),
        |s| text(s),
    );
    r.pick("compress", "compress", a.compress, None, g.compress.as_ref(), shown);
    apply_hash(r, cfg, a.hash);
    r.pick("bwlimit", "bwlimit", a.bwlimit, h.and_then(|h| h.bwlimit.as_ref()), g.bwlimit.as_ref(), shown::<Rate>);
    r.pick("idle_timeout", "idle_timeout", &mut a.idle.idle_timeout, None, g.idle_timeout.as_ref(), shown);
    apply_references(r, cfg, a.references, &a.refs_at);
}

/// The digest and the block size (`--hash`, `--block-size`).
fn apply_hash(r: &mut Resolver<'_>, cfg: &Config, a: &mut HashArgs) {
    let g = &cfg.general;
    r.pick("hash", "algo", &mut a.algo, None, g.hash.as_ref(), shown);
    r.pick("block_size", "block_size", &mut a.block_size, None, g.block_size.as_ref(), shown);
}

/// The references (`-r`), used at `at`.
fn apply_references(r: &mut Resolver<'_>, cfg: &Config, refs: &mut Vec<PathBuf>, at: &RefsAt) {
    let h = r.section();
    r.pick(
        "references",
        "references",
        refs,
        h.and_then(|h| h.references.as_ref()),
        cfg.general.references.as_ref(),
        |v| references(v, at),
    );
}

/// `--source-reference` (top level only: paths on the source's host).
fn apply_source_references(r: &mut Resolver<'_>, cfg: &Config, refs: &mut Vec<PathBuf>) {
    let show = |v: &Vec<PathBuf>| {
        if v.is_empty() {
            "(none)".to_string()
        } else {
            v.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        }
    };
    r.pick("source_references", "source_references", refs, None, cfg.general.source_references.as_ref(), show);
}

/// `--log-format` (a global flag, seen in every command's matches).
fn apply_log_format(r: &mut Resolver<'_>, cfg: &Config, format: &mut LogFormat) {
    r.pick("log_format", "log_format", format, None, cfg.general.log_format.as_ref(), shown);
}

/// Fill `cmd`'s settings, and the log format, from the configuration
/// `cfg()` reads, where no flag set them, and say what was decided and
/// why. None, and nothing read: the command takes no setting from the
/// file.
pub(crate) fn configure(
    cmd: &mut Command,
    log_format: &mut LogFormat,
    m: &ArgMatches,
    cfg: impl FnOnce() -> anyhow::Result<Config>,
) -> anyhow::Result<Option<Vec<Row>>> {
    let rows = match cmd {
        Command::Copy(a) => apply_copy(a, log_format, m, &cfg()?),
        Command::Migrate(a) => apply_migrate(a, log_format, m, &cfg()?),
        Command::Serve { source, target, hash, compress, references, source_references, idle, bwlimit, .. } => {
            let cfg = cfg()?;
            // No host section: serve does not know which host started it.
            let mut r = Resolver::new(m, &cfg, None);
            let g = &cfg.general;
            r.pick("compress", "compress", compress, None, g.compress.as_ref(), shown);
            apply_hash(&mut r, &cfg, hash);
            r.pick("idle_timeout", "idle_timeout", &mut idle.idle_timeout, None, g.idle_timeout.as_ref(), shown);
            // The limit is the sending end's, the references the target's.
            if source.is_some() {
                r.pick("bwlimit", "bwlimit", bwlimit, None, g.bwlimit.as_ref(), shown::<Rate>);
                apply_source_references(&mut r, &cfg, source_references);
            } else {
                apply_references(&mut r, &cfg, references, &RefsAt::Here(target.clone()));
            }
            apply_log_format(&mut r, &cfg, log_format);
            r.rows
        }
        Command::Hash { hash, .. } | Command::Index { hash, .. } => {
            let cfg = cfg()?;
            let mut r = Resolver::new(m, &cfg, None);
            apply_hash(&mut r, &cfg, hash);
            apply_log_format(&mut r, &cfg, log_format);
            r.rows
        }
        Command::Similarity { image, references, hash, .. } => {
            let cfg = cfg()?;
            let mut r = Resolver::new(m, &cfg, None);
            apply_hash(&mut r, &cfg, hash);
            apply_references(&mut r, &cfg, references, &RefsAt::Here(Some(image.clone())));
            apply_log_format(&mut r, &cfg, log_format);
            r.rows
        }
        _ => return Ok(None),
    };
    Ok(Some(rows))
}

/// Settings of `copy` from the configuration, where no flag set them.
fn apply_copy(a: &mut CopyArgs, log_format: &mut LogFormat, m: &ArgMatches, cfg: &Config) -> Vec<Row> {
    let host = copy_host(a);
    let refs_at = copy_refs_at(a);
    let mut r = Resolver::new(m, cfg, host.as_deref());
    apply_shared(
        &mut r,
        cfg,
        Shared {
            ssh: &mut a.ssh,
            remote_xenmig: &mut a.remote_xenmig,
            compress: &mut a.compress,
            hash: &mut a.hash,
            bwlimit: &mut a.bwlimit,
            idle: &mut a.idle,
            references: &mut a.references,
            refs_at,
        },
    );
    apply_source_references(&mut r, cfg, &mut a.source_references);
    apply_log_format(&mut r, cfg, log_format);
    r.rows
}

/// Settings of `migrate` from the configuration, where no flag set them.
fn apply_migrate(a: &mut MigrateArgs, log_format: &mut LogFormat, m: &ArgMatches, cfg: &Config) -> Vec<Row> {
    let host = a.host.clone();
    let mg = &cfg.migrate;
    let mut r = Resolver::new(m, cfg, host.as_deref());
    let h = r.section();
    apply_shared(
        &mut r,
        cfg,
        Shared {
            ssh: &mut a.ssh,
            remote_xenmig: &mut a.remote_xenmig,
            compress: &mut a.compress,
            hash: &mut a.hash,
            bwlimit: &mut a.bwlimit,
            idle: &mut a.idle,
            references: &mut a.references,
            refs_at: RefsAt::Host(host.clone().unwrap_or_else(|| "HOST".into())),
        },
    );
    // The target VG is optional (None: the source's VG name); the file's
    // value is wrapped to fit.
    let wrap = |at: Option<&At<String>>| at.map(|a| At { value: Some(a.value.clone()), line: a.line });
    let (host_vg, file_vg) = (h.and_then(|h| wrap(h.target_vg.as_ref())), wrap(mg.target_vg.as_ref()));
    r.pick("migrate.target_vg", "target_vg", &mut a.target_vg, host_vg.as_ref(), file_vg.as_ref(), |v| {
        v.clone().unwrap_or_else(|| "(the source's VG name)".into())
    });
    r.pick("migrate.max_passes", "max_passes", &mut a.max_passes, None, mg.max_passes.as_ref(), shown);
    r.pick(
        "migrate.converge_blocks",
        "converge_blocks",
        &mut a.converge_blocks,
        None,
        mg.converge_blocks.as_ref(),
        shown,
    );
    r.pick("migrate.rescan", "rescan", &mut a.rescan, None, mg.rescan.as_ref(), |v| v.name().to_string());
    apply_source_references(&mut r, cfg, &mut a.source_references);
    apply_log_format(&mut r, cfg, log_format);
    r.rows
}

/// The configuration a command reads (`--config`, `$XENMIG_CONFIG`, or
/// the default path).
pub(crate) fn load(flag: Option<&Path>) -> anyhow::Result<Config> {
    Ok(xenmig::config::load(flag)?)
}

/// `xenmig config`: the decision for a command line, printed.
pub(crate) fn show(host: Option<String>, command: Vec<String>, flag: Option<&Path>) -> anyhow::Result<i32> {
    use clap::{CommandFactory, FromArgMatches};
    let cfg = load(flag)?;
    // Without a command line: a migrate to HOST with no flags.
    let words: Vec<String> = if command.is_empty() {
        vec!["migrate".into(), "DOMAIN".into(), host.unwrap_or_else(|| "HOST".into())]
    } else {
        command
    };
    let all = super::Cli::command().try_get_matches_from(std::iter::once("xenmig".to_string()).chain(words))?;
    let cli = super::Cli::from_arg_matches(&all)?;
    let m = all.subcommand().map(|(_, m)| m).expect("clap: a subcommand is required");
    // A --config inside the command line is the one that command would read.
    let cfg = match cli.config_file.as_deref() {
        Some(p) => load(Some(p))?,
        None => cfg,
    };
    let mut command = cli.command;
    let name = all.subcommand_name().unwrap_or_default().to_string();
    let mut format = cli.log_format;
    let Some(rows) = configure(&mut command, &mut format, m, || Ok(cfg.clone()))? else {
        anyhow::bail!("config: `{name}` takes no setting from the configuration");
    };
    // Written, not printed: `xenmig config | head` must not panic on a
    // closed pipe.
    let mut text = match &cfg.path {
        Some(p) => format!("# configuration file: {}\n", p.display()),
        None => "# no configuration file\n".to_string(),
    };
    let width = rows.iter().map(|r| r.key.len()).max().unwrap_or(0);
    let vwidth = rows.iter().map(|r| r.value.len()).max().unwrap_or(0).min(40);
    for r in rows {
        text += &format!("{:<width$}  {:<vwidth$}  {}\n", r.key, r.value, r.origin);
    }
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
    Ok(0)
}
