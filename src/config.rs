//! The site configuration, `/etc/xenmig/xenmig.yaml`: defaults for the
//! commands (which command takes which setting: `src/cli/settings.rs`),
//! and per-host sections.
//!
//! This module reads and checks the file; it does not know the command
//! line. Every value keeps the line it was written on, so that `xenmig
//! config` can say where a setting came from and every error names the
//! file, the line and the key (`hosts.host2.bwlimit`). Unknown keys and
//! values of the wrong type are errors, never ignored: a misspelt
//! `bwlimt:` must not silently leave a production link unlimited.
//!
//! ```yaml
//! ssh: ssh -o BatchMode=yes     # copy -s / migrate -s
//! remote_xenmig: xenmig
//! compress: auto
//! hash: blake3
//! block_size: 4096
//! bwlimit: 50M                  # bytes per second (K, M, G as rsync); 0: none
//! idle_timeout: 120
//! log_format: json              # --log-format: text or json (stderr)
//! references: [/dev/vg0/debian12, '/srv/templates/*.xmi']   # patterns: copy::refglob
//! source_references: [/var/lib/xenmig/templates.xmi]   # copy/migrate --source-reference (SRC's host: images, patterns, catalogs)
//! migrate:
//!   target_vg: vg0
//!   max_passes: 6
//!   converge_blocks: 256
//!   rescan: fast
//! hosts:
//!   host2:                      # matched against HOST (user@ stripped)
//!     ssh: ssh -p 2222
//!     target_vg: vg1
//!     bwlimit: 10M
//! ```
//!
//! xenmig runs as root and `ssh` here is a command it runs: a file that
//! others can write, or that belongs to another user, is refused.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_saphyr::Spanned;

use crate::blocks::digest::Algorithm;
use crate::blocks::layout::check_block_size;
use crate::copy::source::Rescan;
use crate::wire::compress::Choice;
use crate::wire::rate::Rate;

/// Where the configuration is read from when neither `--config` nor
/// [`CONFIG_ENV`] names a file.
pub const DEFAULT_PATH: &str = "/etc/xenmig/xenmig.yaml";
/// Environment variable naming the configuration file (tests point it at
/// their own file; an empty value means no configuration file).
pub const CONFIG_ENV: &str = "XENMIG_CONFIG";
/// A configuration file larger than this is refused (it is a few lines).
const MAX_SIZE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path}: writable by group or others (mode {mode:o}); xenmig runs commands from it as root")]
    Unsafe { path: PathBuf, mode: u32 },
    #[error(
        "config {path}: owned by uid {uid}, neither root nor the user running xenmig; xenmig runs commands from it"
    )]
    Owner { path: PathBuf, uid: u32 },
    #[error("config {path}: larger than {MAX_SIZE} bytes")]
    TooLarge { path: PathBuf },
    #[error("config {path}:{line}: {key}: {message}")]
    Invalid { path: PathBuf, line: u64, key: String, message: String },
    #[error("config {path}:{line}: {message}")]
    Syntax { path: PathBuf, line: u64, message: String },
}

/// What xenmig writes on stderr (`--log-format`, `log_format:`): lines
/// for people, or one JSON object per line for log collectors. The CLI
/// does the writing; the type is here because the file names it too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl LogFormat {
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("unknown log format '{s}' (text, json)")),
        }
    }
}

/// A value from the file and the line it is on.
#[derive(Clone, Debug, PartialEq)]
pub struct At<T> {
    pub value: T,
    pub line: u64,
}

/// Settings that may appear at the top level and, for some, in a host
/// section.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Settings {
    pub ssh: Option<At<String>>,
    pub remote_xenmig: Option<At<String>>,
    pub compress: Option<At<Choice>>,
    pub hash: Option<At<Algorithm>>,
    pub block_size: Option<At<u32>>,
    pub bwlimit: Option<At<Rate>>,
    pub idle_timeout: Option<At<u64>>,
    pub references: Option<At<Vec<PathBuf>>>,
    /// `copy` and `migrate --source-reference`: images the source's host holds that the
    /// target's may hold too (plain paths, no patterns).
    pub source_references: Option<At<Vec<PathBuf>>>,
    pub log_format: Option<At<LogFormat>>,
}

/// Defaults of `migrate` only.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MigrateSettings {
    pub target_vg: Option<At<String>>,
    pub max_passes: Option<At<u32>>,
    pub converge_blocks: Option<At<u64>>,
    pub rescan: Option<At<Rescan>>,
}

/// One host's section: what differs for that host.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostSettings {
    pub ssh: Option<At<String>>,
    pub remote_xenmig: Option<At<String>>,
    pub bwlimit: Option<At<Rate>>,
    pub target_vg: Option<At<String>>,
    pub references: Option<At<Vec<PathBuf>>>,
}

/// The whole file, checked.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Config {
    /// The file read; None when there was none.
    pub path: Option<PathBuf>,
    pub general: Settings,
    pub migrate: MigrateSettings,
    pub hosts: BTreeMap<String, HostSettings>,
}

impl Config {
    /// The section of `host` (`user@` and a `:path` are not part of it).
    pub fn host(&self, host: &str) -> Option<&HostSettings> {
        self.hosts.get(host_name(host))
    }
}

/// The host part of `[user@]host`.
pub fn host_name(host: &str) -> &str {
    host.rsplit_once('@').map_or(host, |(_, h)| h)
}

/// Which file to read: `--config` first, then [`CONFIG_ENV`], then
/// [`DEFAULT_PATH`]. The bool says whether the file must exist (it must
/// when named; the default may be absent).
pub fn locate(flag: Option<&Path>) -> Option<(PathBuf, bool)> {
    if let Some(p) = flag {
        return Some((p.to_path_buf(), true));
    }
    match std::env::var_os(CONFIG_ENV) {
        Some(v) if v.is_empty() => None,
        Some(v) => Some((PathBuf::from(v), true)),
        None => Some((PathBuf::from(DEFAULT_PATH), false)),
    }
}

/// Read the configuration `locate` names (an empty one when there is none).
pub fn load(flag: Option<&Path>) -> Result<Config, ConfigError> {
    match locate(flag) {
        None => Ok(Config::default()),
        Some((path, required)) => match File::open(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(Config::default()),
            Err(source) => Err(ConfigError::Read { path, source }),
            Ok(f) => read(f, &path),
        },
    }
}

fn read(f: File, path: &Path) -> Result<Config, ConfigError> {
    let read_err = |source| ConfigError::Read { path: path.to_path_buf(), source };
    let meta = f.metadata().map_err(read_err)?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(ConfigError::Unsafe { path: path.to_path_buf(), mode });
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(ConfigError::Owner { path: path.to_path_buf(), uid: meta.uid() });
    }
    if meta.len() > MAX_SIZE {
        return Err(ConfigError::TooLarge { path: path.to_path_buf() });
    }
    let mut text = String::new();
    f.take(MAX_SIZE + 1).read_to_string(&mut text).map_err(read_err)?;
    if text.len() as u64 > MAX_SIZE {
        return Err(ConfigError::TooLarge { path: path.to_path_buf() });
    }
    parse(&text, path)
}

/// Parse and check the text of a configuration file read from `path`.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let mut cfg = Config { path: Some(path.to_path_buf()), ..Config::default() };
    // A file of comments only is an empty document: no settings.
    if text.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')) {
        return Ok(cfg);
    }
    let opts = serde_saphyr::options! { with_snippet: false };
    let mut raw: raw::File = serde_saphyr::from_str_with_options(text, opts).map_err(|e| syntax(text, path, &e))?;
    let ctx = Ctx { path };
    cfg.general = ctx.settings(raw.general())?;
    if let Some(m) = raw.migrate {
        cfg.migrate = MigrateSettings {
            target_vg: m.target_vg.map(plain),
            max_passes: ctx.check(m.max_passes, "migrate.max_passes", |n: u32| {
                if n >= 2 {
                    Ok(n)
                } else {
                    Err(format!("{n} is below 2 (the frozen pass counts)"))
                }
            })?,
            converge_blocks: m.converge_blocks.map(plain),
            rescan: ctx.parsed(m.rescan, "migrate.rescan")?,
        };
    }
    for (name, h) in raw.hosts.unwrap_or_default() {
        let key = |k: &str| format!("hosts.{name}.{k}");
        let hs = HostSettings {
            ssh: h.ssh.map(plain),
            remote_xenmig: h.remote_xenmig.map(plain),
            bwlimit: ctx.parsed_rate(h.bwlimit, &key("bwlimit"))?,
            target_vg: h.target_vg.map(plain),
            references: h.references.map(paths),
        };
        cfg.hosts.insert(name, hs);
    }
    Ok(cfg)
}

struct Ctx<'a> {
    path: &'a Path,
}

impl Ctx<'_> {
    fn invalid(&self, line: u64, key: &str, message: String) -> ConfigError {
        ConfigError::Invalid { path: self.path.to_path_buf(), line, key: key.to_string(), message }
    }

    /// The top level's settings (their keys have no prefix).
    fn settings(&self, r: raw::Settings) -> Result<Settings, ConfigError> {
        Ok(Settings {
            ssh: r.ssh.map(plain),
            remote_xenmig: r.remote_xenmig.map(plain),
            compress: self.parsed(r.compress, "compress")?,
            hash: self.parsed(r.hash, "hash")?,
            block_size: self.check(r.block_size, "block_size", |n: u32| check_block_size(n).map(|_| n))?,
            bwlimit: self.parsed_rate(r.bwlimit, "bwlimit")?,
            idle_timeout: r.idle_timeout.map(plain),
            references: r.references.map(paths),
            source_references: r.source_references.map(paths),
            log_format: self.parsed(r.log_format, "log_format")?,
        })
    }

    /// A string value read by the same `FromStr` as its flag.
    fn parsed<T: FromStr<Err = String>>(
        &self,
        v: Option<Spanned<String>>,
        key: &str,
    ) -> Result<Option<At<T>>, ConfigError> {
        v.map(|s| {
            let line = s.referenced.line();
            s.value.parse().map(|value| At { value, line }).map_err(|m| self.invalid(line, key, m))
        })
        .transpose()
    }

    /// A rate, written as a number of bytes or with a suffix.
    fn parsed_rate(&self, v: Option<Spanned<raw::NumOrText>>, key: &str) -> Result<Option<At<Rate>>, ConfigError> {
        v.map(|s| {
            let line = s.referenced.line();
            let value = match s.value {
                raw::NumOrText::Num(n) => Ok(Rate(n)),
                raw::NumOrText::Text(t) => t.parse(),
            };
            value.map(|value| At { value, line }).map_err(|m| self.invalid(line, key, m))
        })
        .transpose()
    }

    fn check<T>(
        &self,
        v: Option<Spanned<T>>,
        key: &str,
        ok: impl Fn(T) -> Result<T, String>,
    ) -> Result<Option<At<T>>, ConfigError> {
        v.map(|s| {
            let line = s.referenced.line();
            ok(s.value).map(|value| At { value, line }).map_err(|m| self.invalid(line, key, m))
        })
        .transpose()
    }
}

fn plain<T>(s: Spanned<T>) -> At<T> {
    At { line: s.referenced.line(), value: s.value }
}

fn paths(s: Spanned<Vec<String>>) -> At<Vec<PathBuf>> {
    At { line: s.referenced.line(), value: s.value.into_iter().map(PathBuf::from).collect() }
}

/// A parser or type error, with the key it is about: serde names the key
/// only for unknown fields, so for the others the dotted path is read back
/// from the file's indentation at the error's line.
fn syntax(text: &str, path: &Path, e: &serde_saphyr::Error) -> ConfigError {
    let line = e.location().map_or(0, |l| l.line());
    let message = first_line(&e.to_string());
    match (e, key_path_at(text, line)) {
        (serde_saphyr::Error::SerdeUnknownField { field, .. }, k) => {
            let key = match k.as_deref().and_then(|k| k.rsplit_once('.')) {
                Some((parent, _)) => format!("{parent}.{field}"),
                None => field.clone(),
            };
            ConfigError::Invalid { path: path.to_path_buf(), line, key, message: "unknown key".into() }
        }
        (_, Some(key)) => ConfigError::Invalid { path: path.to_path_buf(), line, key, message },
        (_, None) => ConfigError::Syntax { path: path.to_path_buf(), line, message },
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

/// The dotted path of the key on `line` (1-based) of a block-style YAML
/// file: the key on that line, then each less-indented key above it.
fn key_path_at(text: &str, line: u64) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let idx = (line as usize).checked_sub(1).filter(|&i| i < lines.len())?;
    let key_of = |l: &str| -> Option<(usize, String)> {
        let body = l.trim_start();
        if body.starts_with('#') || body.starts_with('-') {
            return None;
        }
        let (k, _) = body.split_once(':')?;
        let k = k.trim().trim_matches(|c| c == '"' || c == '\'');
        (!k.is_empty()).then(|| (l.len() - body.len(), k.to_string()))
    };
    let (mut indent, key) = key_of(lines[idx])?;
    let mut path = vec![key];
    for l in lines[..idx].iter().rev() {
        if indent == 0 {
            break;
        }
        if let Some((i, k)) = key_of(l) {
            if i < indent {
                path.push(k);
                indent = i;
            }
        }
    }
    path.reverse();
    Some(path.join("."))
}

/// The file as serde sees it: every leaf keeps its location.
mod raw {
    use std::collections::BTreeMap;

    use serde::Deserialize;
    use serde_saphyr::Spanned;

    /// The settings allowed at the top level (not read directly: the
    /// top level also holds the sections).
    pub(super) struct Settings {
        pub ssh: Option<Spanned<String>>,
        pub remote_xenmig: Option<Spanned<String>>,
        pub compress: Option<Spanned<String>>,
        pub hash: Option<Spanned<String>>,
        pub block_size: Option<Spanned<u32>>,
        pub bwlimit: Option<Spanned<NumOrText>>,
        pub idle_timeout: Option<Spanned<u64>>,
        pub references: Option<Spanned<Vec<String>>>,
        pub source_references: Option<Spanned<Vec<String>>>,
        pub log_format: Option<Spanned<String>>,
    }

    /// The top level: the general settings written out (serde's `flatten`
    /// would lose the lines and the unknown-key check).
    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub(super) struct File {
        pub ssh: Option<Spanned<String>>,
        pub remote_xenmig: Option<Spanned<String>>,
        pub compress: Option<Spanned<String>>,
        pub hash: Option<Spanned<String>>,
        pub block_size: Option<Spanned<u32>>,
        pub bwlimit: Option<Spanned<NumOrText>>,
        pub idle_timeout: Option<Spanned<u64>>,
        pub references: Option<Spanned<Vec<String>>>,
        pub source_references: Option<Spanned<Vec<String>>>,
        pub log_format: Option<Spanned<String>>,
        pub migrate: Option<Migrate>,
        pub hosts: Option<BTreeMap<String, Host>>,
    }

    impl File {
        /// The top-level settings, apart from the sections.
        pub fn general(&mut self) -> Settings {
            Settings {
                ssh: self.ssh.take(),
                remote_xenmig: self.remote_xenmig.take(),
                compress: self.compress.take(),
                hash: self.hash.take(),
                block_size: self.block_size.take(),
                bwlimit: self.bwlimit.take(),
                idle_timeout: self.idle_timeout.take(),
                references: self.references.take(),
                source_references: self.source_references.take(),
                log_format: self.log_format.take(),
            }
        }
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Migrate {
        pub target_vg: Option<Spanned<String>>,
        pub max_passes: Option<Spanned<u32>>,
        pub converge_blocks: Option<Spanned<u64>>,
        pub rescan: Option<Spanned<String>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Host {
        pub ssh: Option<Spanned<String>>,
        pub remote_xenmig: Option<Spanned<String>>,
        pub bwlimit: Option<Spanned<NumOrText>>,
        pub target_vg: Option<Spanned<String>>,
        pub references: Option<Spanned<Vec<String>>>,
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    pub(super) enum NumOrText {
        Num(u64),
        Text(String),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Config, ConfigError> {
        parse(text, Path::new("/t/xenmig.yaml"))
    }

    fn invalid(text: &str) -> (u64, String, String) {
        match p(text) {
            Err(ConfigError::Invalid { line, key, message, path }) => {
                assert_eq!(path, Path::new("/t/xenmig.yaml"));
                (line, key, message)
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    const FULL: &str = "\
# site defaults
ssh: ssh -o BatchMode=yes
remote_xenmig: /usr/bin/xenmig
compress: zstd:5
hash: sha256
block_size: 8192
bwlimit: 50M
idle_timeout: 30
references: [/dev/vg0/debian12, /dev/vg0/debian11]
migrate:
  target_vg: vg0
  max_passes: 4
  converge_blocks: 100
  rescan: lvm-snapshot
hosts:
  host2:
    ssh: ssh -p 2222
    target_vg: vg1
    bwlimit: 1048576
  host3:
    bwlimit: 500K
";

    #[test]
    fn reads_every_key_with_its_line() {
        let c = p(FULL).unwrap();
        let g = &c.general;
        assert_eq!(g.ssh.as_ref().unwrap(), &At { value: "ssh -o BatchMode=yes".into(), line: 2 });
        assert_eq!(g.remote_xenmig.as_ref().unwrap().value, "/usr/bin/xenmig");
        assert_eq!(g.compress.as_ref().unwrap().value.to_string(), "zstd:5");
        assert_eq!(g.hash.as_ref().unwrap().value, Algorithm::Sha256);
        assert_eq!(g.block_size.as_ref().unwrap(), &At { value: 8192, line: 6 });
        assert_eq!(g.bwlimit.as_ref().unwrap(), &At { value: Rate(50 << 20), line: 7 });
        assert_eq!(g.idle_timeout.as_ref().unwrap().value, 30);
        assert_eq!(
            g.references.as_ref().unwrap().value,
            vec![PathBuf::from("/dev/vg0/debian12"), "/dev/vg0/debian11".into()]
        );
        assert_eq!(g.references.as_ref().unwrap().line, 9);
        assert_eq!(c.migrate.target_vg.as_ref().unwrap(), &At { value: "vg0".into(), line: 11 });
        assert_eq!(c.migrate.max_passes.as_ref().unwrap().value, 4);
        assert_eq!(c.migrate.converge_blocks.as_ref().unwrap().value, 100);
        assert_eq!(c.migrate.rescan.as_ref().unwrap().value, Rescan::LvmSnapshot);
        let h2 = c.host("root@host2").unwrap();
        assert_eq!(h2.ssh.as_ref().unwrap(), &At { value: "ssh -p 2222".into(), line: 17 });
        assert_eq!(h2.target_vg.as_ref().unwrap().value, "vg1");
        assert_eq!(h2.bwlimit.as_ref().unwrap(), &At { value: Rate(1 << 20), line: 19 });
        assert_eq!(c.host("host3").unwrap().bwlimit.as_ref().unwrap().value, Rate(500 << 10));
        assert!(c.host("host4").is_none());
    }

    #[test]
    fn empty_and_comment_only_files_hold_nothing() {
        for t in ["", "\n\n", "# nothing yet\n  # really\n"] {
            let c = p(t).unwrap();
            assert_eq!(c.general, Settings::default());
            assert!(c.hosts.is_empty());
        }
    }

    #[test]
    fn unknown_keys_name_line_and_path() {
        assert_eq!(invalid("ssh: ssh\nbwlimt: 5M\n"), (2, "bwlimt".into(), "unknown key".into()));
        assert_eq!(invalid("migrate:\n  max_passes: 3\n  target-vg: vg0\n").1, "migrate.target-vg");
        assert_eq!(invalid("migrate:\n  max_passes: 3\n  target-vg: vg0\n").0, 3);
        let (line, key, _) = invalid("hosts:\n  h2:\n    ssh: x\n    compress: lz4\n");
        assert_eq!((line, key.as_str()), (4, "hosts.h2.compress"));
    }

    #[test]
    fn wrong_types_name_line_and_path() {
        let (line, key, msg) = invalid("ssh: ssh\nblock_size: big\n");
        assert_eq!((line, key.as_str()), (2, "block_size"), "{msg}");
        let (line, key, _) = invalid("migrate:\n  max_passes: [1, 2]\n");
        assert_eq!((line, key.as_str()), (2, "migrate.max_passes"));
        let (line, key, _) = invalid("hosts:\n  h2:\n    target_vg: vg1\n    references: /dev/vg0/x\n");
        assert_eq!((line, key.as_str()), (4, "hosts.h2.references"));
        let (line, key, _) = invalid("idle_timeout: -5\n");
        assert_eq!((line, key.as_str()), (1, "idle_timeout"));
    }

    #[test]
    fn bad_values_name_line_and_path() {
        let cases = [
            ("compress: brotli\n", 1, "compress", "unknown compression"),
            ("hash: md5\n", 1, "hash", "unknown digest"),
            ("ssh: x\nlog_format: xml\n", 2, "log_format", "unknown log format"),
            ("ssh: x\nblock_size: 1000\n", 2, "block_size", "power of two"),
            ("bwlimit: 10X\n", 1, "bwlimit", "unknown suffix"),
            ("migrate:\n  rescan: sometimes\n", 2, "migrate.rescan", "unknown rescan"),
            ("migrate:\n  max_passes: 1\n", 2, "migrate.max_passes", "below 2"),
            ("hosts:\n  h2:\n    bwlimit: lots\n", 3, "hosts.h2.bwlimit", "bad rate"),
        ];
        for (text, line, key, msg) in cases {
            let (l, k, m) = invalid(text);
            assert_eq!((l, k.as_str()), (line, key), "{text}");
            assert!(m.contains(msg), "{text}: {m}");
        }
    }

    #[test]
    fn broken_yaml_names_the_line() {
        match p("ssh: ssh\nhosts: [unclosed\n") {
            Err(ConfigError::Syntax { line, .. } | ConfigError::Invalid { line, .. }) => assert!(line >= 2, "{line}"),
            other => panic!("{other:?}"),
        }
        assert!(p("- a list\n- not a mapping\n").is_err());
    }

    #[test]
    fn errors_print_file_line_and_key() {
        let e = p("ssh: x\nbwlimt: 5M\n").unwrap_err().to_string();
        assert_eq!(e, "config /t/xenmig.yaml:2: bwlimt: unknown key");
    }

    #[test]
    fn files_others_can_write_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("xenmig.yaml");
        std::fs::write(&f, "ssh: ssh\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(matches!(load(Some(&f)), Err(ConfigError::Unsafe { mode: 0o666, .. })));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(load(Some(&f)).unwrap().general.ssh.unwrap().value, "ssh");
        // Another user's file (only root can make one here).
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&f, Some(65534), None).unwrap();
            assert!(matches!(load(Some(&f)), Err(ConfigError::Owner { uid: 65534, .. })));
        }
    }

    #[test]
    fn a_named_file_must_exist_and_be_small() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.yaml");
        assert!(matches!(load(Some(&missing)), Err(ConfigError::Read { .. })));
        let big = dir.path().join("big.yaml");
        std::fs::write(&big, "#".repeat(MAX_SIZE as usize + 10)).unwrap();
        assert!(matches!(load(Some(&big)), Err(ConfigError::TooLarge { .. })));
    }

    #[test]
    fn host_names_drop_the_user() {
        assert_eq!(host_name("root@h2"), "h2");
        assert_eq!(host_name("h2"), "h2");
    }
}
