//! Command-line interface: argument parsing, output and exit codes.
//!
//! Exit codes scripts can rely on: 0 success (for `copy`: the target is
//! verified), 1 the operation failed (nothing reported verified), 2 bad
//! usage (from clap).

use std::path::PathBuf;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use xenmig::blocks::digest::Algorithm;
use xenmig::blocks::layout::{check_block_size, Align};
use xenmig::copy::source::{LiveOptions, Rescan};
use xenmig::wire::compress::Choice;
use xenmig::wire::rate::Rate;

mod assets;
mod bar;
mod copy;
mod images;
mod migrate;
mod output;
mod settings;
mod xen;

const AFTER_HELP: &str = "\
Examples:
  xenmig migrate web1 host2                            move a running guest and its LV disks, live
  xenmig copy guest.img root@host2:/dev/vg0/guest      push a disk to another host over ssh
  xenmig copy -r /dev/vg0/debian12 host1:/dev/vg0/web /dev/vg0/web
                                                       pull, reusing blocks of a local template
  xenmig hash -o web.xmh /dev/vg0/web                  per-block digests of a disk, kept in a file
  xenmig index -o refs.xmi /dev/vg0/debian11 /dev/vg0/debian12
                                                       index reference images (templates, releases)

Exit status: 0 success (migrate: the domain runs on HOST on verified disks;
copy: the target is verified), 1 failure (migrate: the domain did not move),
2 bad usage. `xenmig migrate --help` tells how a migration goes.
Logging: -v, -vv, or RUST_LOG=debug.
Site defaults: /etc/xenmig/xenmig.yaml (or $XENMIG_CONFIG, or --config FILE);
flags override it; `xenmig config` shows what applies and why.";

#[derive(Parser)]
#[command(name = "xenmig", version, about = "Move Xen guests with their local disks: hash-dedup block copy between hosts", after_help = AFTER_HELP)]
struct Cli {
    /// More log output on stderr (repeat for more).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// No progress bar.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Configuration file (default: $XENMIG_CONFIG, else
    /// /etc/xenmig/xenmig.yaml, which may be absent).
    #[arg(long = "config", global = true, value_name = "FILE")]
    config_file: Option<PathBuf>,
    /// Format of what goes to stderr: `text`, or `json` (one object per
    /// line, for log collectors). Without a terminal, each phase is one
    /// timestamped line; on a terminal the progress bar is unchanged.
    #[arg(long, global = true, default_value = "text", value_name = "FORMAT", value_parser = output::log_format_parser())]
    log_format: output::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
pub(crate) struct HashArgs {
    /// Block digest: blake3 (default), sha256, or sha1 (for older tools, NOT
    /// collision-safe: avoid when references hold other tenants' data).
    #[arg(long = "hash", default_value = "blake3", value_name = "ALGO")]
    pub(crate) algo: Algorithm,
    /// Block size in bytes: a power of two from 512 to 1048576.
    #[arg(long, default_value_t = 4096, value_parser = parse_block_size)]
    pub(crate) block_size: u32,
    /// How to cut images: `partitions` hashes each MBR partition from its
    /// own start (so a partition at sector 63 dedups against an aligned
    /// copy), `flat` cuts from offset 0.
    #[arg(long, default_value = "partitions", value_name = "MODE")]
    pub(crate) align: Align,
}

#[derive(Subcommand)]
enum Command {
    /// Move a running domain and its LVM disks to another Xen host (like
    /// `xl migrate`, without shared storage).
    #[command(after_help = migrate::MIGRATE_HELP)]
    Migrate(migrate::MigrateArgs),
    /// Copy a disk image or block device, sending only blocks the target
    /// does not already have.
    ///
    /// SRC and DST are local paths (file or block device) or [user@]host:path,
    /// reached over ssh, where `xenmig serve` runs as the far end. The
    /// target rebuilds SRC from zero blocks, its own earlier content (so
    /// copying onto an older copy, or rerunning an interrupted copy, moves
    /// only what differs), reference images, and runs fetched from the
    /// source, compressed. Every block is verified before it counts, and the
    /// whole target is checked against the source's image digest.
    Copy(CopyArgs),
    /// Print the settings a command would use, each with where it came
    /// from: default, the file (FILE:LINE), a host section, or a flag.
    ///
    /// Without COMMAND: those of `migrate` to --host (or to no particular
    /// host). With COMMAND: those of that command line, for example
    /// `xenmig config -- copy --compress lz4 img host2:/dev/vg0/img`.
    Config {
        /// The host whose section applies.
        #[arg(long, value_name = "HOST", conflicts_with = "command")]
        host: Option<String>,
        /// A command line (after `--`): copy, migrate, serve, hash, index or
        /// similarity.
        #[arg(last = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Compute per-block digests of an image (and keep them in a hash file).
    Hash {
        image: PathBuf,
        /// Write the hash file here (format: see README).
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        hash: HashArgs,
        /// Print a JSON summary.
        #[arg(long)]
        json: bool,
    },
    /// Build an index of reference images, for `copy -r`: hashed once, used
    /// by every later copy. On a source's host the same file is a catalog
    /// for `--source-reference` (each image's digest: only the one a
    /// target offers is read).
    Index {
        /// Where to write the index.
        #[arg(short, long)]
        output: PathBuf,
        /// Reference images (files or block devices) to index.
        #[arg(required = true)]
        images: Vec<PathBuf>,
        #[command(flatten)]
        hash: HashArgs,
    },
    /// How much of an image its references already hold: blocks found,
    /// zero blocks apart (what a copy would not have to send). Reads only;
    /// moves nothing.
    Similarity {
        image: PathBuf,
        /// Reference images or index files, or glob patterns (repeatable;
        /// at least one, here or as `references` in the configuration).
        #[arg(short = 'r', long = "reference", value_name = "PATH")]
        references: Vec<PathBuf>,
        #[command(flatten)]
        hash: HashArgs,
        /// Print a JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Print what a hash or index file holds.
    Show { file: PathBuf },
    /// List Xen domains like `xl list` (id, name, state, memory in MiB,
    /// vCPUs), each with its disks and the LVs behind them.
    Domains {
        /// Only this domain (name or id).
        domain: Option<String>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Save a domain's CPU and memory to FILE (runs `xl save`; the file
    /// can be restored by `xl restore` too). The domain is destroyed
    /// afterwards unless -p.
    Save {
        domain: String,
        file: PathBuf,
        /// Leave the domain paused instead of destroying it (as `xl save -p`).
        #[arg(short = 'p', long)]
        paused: bool,
    },
    /// Restore a domain saved by `xenmig save` or `xl save`.
    Restore {
        file: PathBuf,
        /// Leave the restored domain paused (as `xl restore -p`).
        #[arg(short = 'p', long)]
        paused: bool,
    },
    /// Pause a domain's vCPUs (as `xl pause`).
    Pause { domain: String },
    /// Let a paused domain run again (as `xl unpause`).
    Unpause { domain: String },
    /// One end of a copy on stdin/stdout; what `copy` runs on a remote host.
    Serve {
        /// Serve this image as the source.
        #[arg(long, conflicts_with = "target", required_unless_present = "target")]
        source: Option<PathBuf>,
        /// Rebuild the source's image into this path.
        #[arg(long)]
        target: Option<PathBuf>,
        #[command(flatten)]
        hash: HashArgs,
        #[arg(long, default_value = "auto")]
        compress: Choice,
        #[arg(short = 'r', long = "reference")]
        references: Vec<PathBuf>,
        /// Source: images here (patterns, catalogs) the target may hold too
        /// (as `copy --source-reference`).
        #[arg(long = "source-reference", value_name = "PATH", requires = "source")]
        source_references: Vec<PathBuf>,
        #[command(flatten)]
        live: LiveArgs,
        /// Used by migrate: write into the target LV although lvm reports
        /// it open, because DOMAIN (migrate's own paused incoming domain)
        /// holds it. Skips only that check, never the exclusive open.
        #[arg(long, value_name = "DOMAIN", requires = "target", hide = true)]
        allow_open_by: Option<String>,
        #[command(flatten)]
        idle: IdleArgs,
        /// Target: refuse a source image larger than this many bytes.
        #[arg(long, value_name = "BYTES")]
        max_image_size: Option<u64>,
        /// Source: bytes per second it may write (as `copy --bwlimit`).
        #[arg(long, default_value = "0", value_name = "RATE")]
        bwlimit: Rate,
        /// Target: read back what was written (as `copy --readback`).
        #[arg(long, requires = "target")]
        readback: bool,
    },
    /// Write man pages and shell completions into DIR (for packaging).
    #[command(hide = true)]
    Assets { dir: PathBuf },
    /// xl's transport during `migrate` (started by xl, not by hand).
    #[command(hide = true)]
    MigrateRelay {
        #[arg(long)]
        control: PathBuf,
        #[arg(long, default_value = "ssh")]
        ssh: String,
        /// Rewrite disk path OLD to NEW in the domain config at the head of
        /// xl's stream (`migrate --target-vg` without `-C`).
        #[arg(long = "rewrite-disk", value_name = "OLD=NEW")]
        rewrite_disk: Vec<String>,
        /// What xl appends: HOST xl migrate-receive ...
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        rest: Vec<String>,
    },
    /// The target host's side of `migrate` (run over ssh, not by hand).
    #[command(hide = true, subcommand)]
    MigrateTarget(migrate::TargetOp),
}

/// Live copy: copy while the source keeps changing.
#[derive(Args, Clone)]
struct LiveArgs {
    /// Copy while the source changes: pass 1 copies everything, each later
    /// pass only what changed since, until little changes or the pass limit
    /// is reached; then the source is frozen (--freeze-cmd), the last delta
    /// is sent, the whole target is verified, and the source is thawed
    /// (--thaw-cmd, which also runs when anything fails).
    #[arg(long)]
    live: bool,
    /// Live: passes in all, the frozen one included.
    #[arg(long, default_value_t = 6, value_name = "N", requires = "live", value_parser = clap::value_parser!(u32).range(2..))]
    max_passes: u32,
    /// Live: freeze once a pass finds at most this many changed blocks.
    #[arg(long, default_value_t = 256, value_name = "BLOCKS", requires = "live")]
    converge_blocks: u64,
    /// Live: shell command that stops the source from changing (for
    /// example `fsfreeze -f /mnt`), run on the source's host.
    #[arg(long, value_name = "COMMAND", requires = "live")]
    freeze_cmd: Option<String>,
    /// Live: shell command that undoes the freeze (for example `fsfreeze -u
    /// /mnt`); runs after the last pass, on success and on failure.
    #[arg(long, value_name = "COMMAND", requires = "live")]
    thaw_cmd: Option<String>,
    /// Live: how passes find changed blocks: `fast` re-reads and compares
    /// each block's XXH3 (default); `lvm-snapshot` (source is an LVM
    /// logical volume) reads device-mapper snapshots' exception tables and
    /// reads nothing else; `full` recomputes every strong digest (slowest;
    /// kept to measure the others against).
    #[arg(long, default_value = "fast", value_name = "HOW", requires = "live")]
    rescan: Rescan,
    /// Live: a freeze command still running after this many seconds is
    /// killed (with everything it started), the thaw command runs and the
    /// copy fails.
    #[arg(long, default_value_t = 60, value_name = "SECONDS", requires = "live", value_parser = clap::value_parser!(u64).range(1..))]
    freeze_timeout: u64,
    /// Live: fail when the final, frozen pass (the last delta and the
    /// target's verification) has not ended after this many seconds; the
    /// thaw command runs. 0 (the default): only --idle-timeout bounds it,
    /// which a target whose disk hangs does not trip.
    #[arg(long, default_value_t = 0, value_name = "SECONDS", requires = "live")]
    final_timeout: u64,
}

impl LiveArgs {
    fn options(&self) -> Option<LiveOptions> {
        self.live.then(|| LiveOptions {
            max_passes: self.max_passes,
            converge_blocks: self.converge_blocks,
            freeze_cmd: self.freeze_cmd.clone(),
            thaw_cmd: self.thaw_cmd.clone(),
            rescan: self.rescan,
            freeze_timeout: std::time::Duration::from_secs(self.freeze_timeout),
            final_timeout: (self.final_timeout > 0).then(|| std::time::Duration::from_secs(self.final_timeout)),
        })
    }
}

/// How long an end waits for a silent peer.
#[derive(Args, Clone, Copy)]
pub(crate) struct IdleArgs {
    /// Fail when the peer sends nothing for this many seconds while this
    /// end waits for it (0: wait forever). Both ends send keep-alives at a
    /// quarter of it, so a healthy, idle peer never times out. A peer of
    /// protocol version 1 is never timed out.
    #[arg(long, default_value_t = 120, value_name = "SECONDS")]
    pub(crate) idle_timeout: u64,
}

impl IdleArgs {
    pub(crate) fn timeout(&self) -> Option<std::time::Duration> {
        (self.idle_timeout > 0).then(|| std::time::Duration::from_secs(self.idle_timeout))
    }
}

#[derive(Args)]
pub(crate) struct CopyArgs {
    /// Source: PATH or [user@]host:PATH.
    src: String,
    /// Destination: PATH or [user@]host:PATH. A file is created or resized
    /// to the source's size; a block device must be at least as large.
    dst: String,
    /// Image or index file on the DST side whose blocks may be reused
    /// (repeatable; a quoted glob pattern is expanded on DST's host).
    ///
    /// A new or empty DST file is first filled from the first image given
    /// of exactly SRC's size and layout (say, the guest's old image on a
    /// return migration): the copy then costs what it costs onto that
    /// image itself.
    ///
    /// To a remote DST, SRC's host looks for the same paths too (a pool's
    /// hosts often hold their templates at the same paths): one whose bytes
    /// have the digest of a reference DST's side offers serves as a
    /// --source-reference would, read late and only if the copy is long
    /// enough for it to pay.
    #[arg(short = 'r', long = "reference", value_name = "PATH")]
    references: Vec<PathBuf>,
    /// Image on the SRC side that DST's side may hold too (a template or
    /// the old release the guest was built from; repeatable). When the
    /// target holds a reference (-r) with the same image digest, both ends
    /// use it as the zstd dictionary for the blocks that are fetched, as
    /// `zstd --patch-from` does: it helps an upgraded or edited image whose
    /// changed files resemble the reference's, on a slow link
    /// (docs/experiments.md). Costs its size in memory on both hosts (at
    /// most 1 GiB, and half the memory available, is used) and a read and
    /// hash of it on each; needs `--compress zstd` or auto. One above 64 MiB
    /// is read on a thread of its own once 16 MiB have been streamed over a
    /// link below 30 MB/s, and used from then on if the stream's content
    /// resembles it: a short copy or a fast link never waits for it. PATH
    /// may be a glob pattern (expanded on SRC's host, never to SRC), or a
    /// catalog: an index file made by `xenmig index` of the host's templates, of
    /// which only the one the target offers is read (and checked against
    /// the catalog's digest: a changed image is passed over).
    #[arg(long = "source-reference", value_name = "PATH")]
    pub(crate) source_references: Vec<PathBuf>,
    /// Compression of fetched blocks: auto (from measured link rate and CPU
    /// cost), none, lz4, zstd[:LEVEL], zlib[:LEVEL].
    #[arg(long, default_value = "auto", value_name = "CODEC")]
    compress: Choice,
    #[command(flatten)]
    hash: HashArgs,
    /// Command used to reach a remote host instead of `ssh` (as `xl
    /// migrate -s`); an empty string runs the remote command locally.
    /// OpenSSH's `ssh` left at its default cipher list is asked for
    /// AES-GCM first where the CPU has AES instructions (less CPU per
    /// byte); a `-c` here or a `Ciphers` line in ssh_config wins.
    #[arg(short = 's', long = "ssh", default_value = "ssh", value_name = "COMMAND")]
    ssh: String,
    /// The xenmig program on the remote host.
    #[arg(long, default_value = "xenmig", value_name = "PATH")]
    remote_xenmig: String,
    /// Print one JSON object with the report at the end (also on failure).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    live: LiveArgs,
    #[command(flatten)]
    idle: IdleArgs,
    /// Refuse a source image larger than this many bytes onto DST (a
    /// regular-file DST also needs the image's size free on its file system).
    #[arg(long, value_name = "BYTES")]
    max_image_size: Option<u64>,
    /// Cap what the sending end writes to the link at RATE bytes per second,
    /// as rsync's option: K, M, G (powers of 1024), KB, MB, GB (of 1000); a
    /// bare number is bytes; 0: no limit.
    #[arg(long, default_value = "0", value_name = "RATE")]
    pub(crate) bwlimit: Rate,
    /// Read back from DST's device (not the page cache) every block each
    /// pass wrote, and fail, naming the blocks, where it differs from what
    /// was written and verified: catches a device, or another writer, that
    /// changes data under the copy. Without it DST is checked as written.
    #[arg(long)]
    readback: bool,
    /// Run the wire protocol between two local ends (a socket pair, as a
    /// remote copy does) even where the copy could go direct (a new DST, no
    /// references: each block read, hashed and written once): to see what a
    /// remote copy would send, or to try a codec locally.
    #[arg(long)]
    no_direct: bool,
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|_| format!("'{s}' is not a number of bytes"))?;
    check_block_size(n)?;
    Ok(n)
}

pub fn main() -> i32 {
    // The matches are kept: they tell a flag given on the command line
    // from a default, which the configuration may replace.
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let sub = matches.subcommand().map(|(_, m)| m.clone()).expect("clap: a subcommand is required");
    // The configuration first: it may set the log format stderr is
    // written in, including the message saying the file is wrong.
    let (mut cmd, mut format) = (cli.command, cli.log_format);
    let configured = settings::configure(&mut cmd, &mut format, &sub, || settings::load(cli.config_file.as_deref()));
    output::init(cli.verbose, format);
    // A far end's messages (ssh, the remote xenmig) reach the operator as
    // they come.
    xenmig::wire::transport::set_peer_line_sink(|line| eprintln!("{line}"));
    let quiet = cli.quiet;
    match configured.and_then(|_| run(cmd, quiet, cli.config_file.as_deref())) {
        Ok(code) => code,
        Err(e) => {
            // Causes may quote a peer or a remote command: no control
            // characters reach the terminal.
            output::error(&format!("error: {}", xenmig::copy::sanitize(&error_chain(&e))));
            1
        }
    }
}

/// The error and its causes, each said once. The library's messages quote
/// their cause already ("cannot open X: {source}"), so `{:#}`, which
/// appends every cause, would print it twice.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out
}

/// Run a command whose settings are decided (`settings::configure`).
fn run(cmd: Command, quiet: bool, config: Option<&std::path::Path>) -> anyhow::Result<i32> {
    match cmd {
        Command::Copy(a) => Ok(copy::run_copy(a, quiet)),
        Command::Migrate(a) => migrate::run_migrate(a, quiet),
        Command::Config { host, command } => settings::show(host, command, config),
        Command::MigrateRelay { control, ssh, rewrite_disk, rest } => {
            migrate::run_relay(control, ssh, rewrite_disk, rest)
        }
        Command::MigrateTarget(op) => migrate::run_target(op),
        Command::Hash { image, output, hash, json } => images::hash(image, output, hash, json, quiet),
        Command::Index { output, images, hash } => images::index(output, images, hash, quiet),
        Command::Similarity { image, references, hash, json } => {
            images::similarity_cmd(image, references, hash, json, quiet)
        }
        Command::Show { file } => images::show(file),
        Command::Assets { dir } => assets::generate(&dir),
        Command::Domains { domain, json } => Ok(xen::domains(domain.as_deref(), json)?),
        Command::Save { domain, file, paused } => Ok(xen::save(&domain, &file, paused)?),
        Command::Restore { file, paused } => Ok(xen::restore(&file, paused)?),
        Command::Pause { domain } => Ok(xen::pause(&domain, true)?),
        Command::Unpause { domain } => Ok(xen::pause(&domain, false)?),
        Command::Serve {
            source,
            target,
            hash,
            compress,
            references,
            source_references,
            live,
            allow_open_by,
            idle,
            max_image_size,
            bwlimit,
            readback,
        } => copy::serve(
            source,
            target,
            hash,
            compress,
            references,
            source_references,
            live,
            allow_open_by,
            idle,
            max_image_size,
            bwlimit,
            readback,
        ),
    }
}
