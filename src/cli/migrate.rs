//! `xenmig migrate` and the two commands it runs behind the scenes:
//! `migrate-relay` (xl's transport, on the source) and `migrate-target`
//! (preflight and clean-up, on the target).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use xenmig::copy::source::{LiveOptions, Rescan, SourceOptions};
use xenmig::migrate::{self, remote, MigrateOptions, MigrateReport, XenHost};
use xenmig::wire::compress::Choice;
use xenmig::wire::rate::Rate;

use super::HashArgs;

pub const MIGRATE_HELP: &str = "\
How it goes: preflight (the domain runs, its disks are LVs, the target has
room, the same xenmig and no domain of that name); LVs created on the target
(tagged with the domain's UUID; an LV tagged for the same domain, left by an
earlier migration the other way, is reused and only what changed moves);
disk passes while the guest runs; then `xl migrate` moves CPU and memory
through a relay that holds the target's \"ready\" back until the last disk
delta, sent while the guest is suspended, is written and verified there.
Only then may the target unpause. The source LV is never written and is
kept (tagged) after the migration.

If anything fails before that point, the guest resumes here and the
target's half-built copy is destroyed: the guest runs on exactly one host.
Every phase is journalled in /var/lib/xenmig/journal; if xenmig is killed,
`xenmig migrate --recover DOMAIN` finishes or rolls back by the same rules.

Examples:
  xenmig migrate web1 host2                     live, disks to the same VG names
  xenmig migrate --dry-run web1 host2           the plan: LVs to create or reuse, space
  xenmig migrate -r /dev/vg0/debian12 web1 host2
                                                reuse a template held on host2
  xenmig migrate --json web1 host2 | jq .downtime_seconds

Exit status: 0 the domain runs on HOST (paused with -p) on verified disks;
1 it did not move (the report says what was rolled back); 2 bad usage.";

#[derive(Args)]
pub struct MigrateArgs {
    /// The domain to move (name or id); it must be running.
    #[arg(required_unless_present = "recover")]
    domain: Option<String>,
    /// The target host, as ssh reaches it.
    #[arg(required_unless_present = "recover")]
    pub(crate) host: Option<String>,
    /// Command that reaches HOST instead of `ssh` (as `xl migrate -s`).
    /// OpenSSH's `ssh` left at its default cipher list is asked for
    /// AES-GCM first where the CPU has AES instructions, for the disks
    /// and xl's memory stream; a `-c` here or a `Ciphers` line in
    /// ssh_config wins.
    #[arg(short = 's', long = "ssh", default_value = "ssh", value_name = "SSHCOMMAND")]
    pub(crate) ssh: String,
    /// xl config to use on the target instead of the running one (as `xl
    /// migrate -C`); needed when disk paths change (--target-vg).
    #[arg(short = 'C', value_name = "CONFIG")]
    config: Option<PathBuf>,
    /// Leave the domain paused on the target (as `xl migrate -p`).
    #[arg(short = 'p')]
    paused: bool,
    /// Do not wait in the background on the target for the domain's death
    /// (as `xl migrate -e`).
    #[arg(short = 'e')]
    no_monitor: bool,
    /// Have xl verify the memory copy (as `xl migrate --debug`).
    #[arg(long)]
    debug: bool,
    /// Image or index file on the target whose blocks may be reused
    /// (repeatable); `auto`: every LV of the target VG that nothing holds
    /// open (templates, other guests' disks, older releases).
    #[arg(short = 'r', long = "reference", value_name = "PATH")]
    pub(crate) references: Vec<PathBuf>,
    /// Image on this host that HOST may hold too (repeatable; a glob
    /// pattern, or a catalog made by `xenmig index`), as in `copy
    /// --source-reference`: when HOST offers a reference with the same
    /// image digest, the fetched blocks of every disk are compressed with
    /// it as the zstd dictionary (a template both hosts keep). Each disk's
    /// copy holds it in memory on both hosts (at most 1 GiB, and half the
    /// memory available).
    #[arg(long = "source-reference", value_name = "PATH")]
    pub(crate) source_references: Vec<PathBuf>,
    /// Compression of fetched blocks, as in `copy`.
    #[arg(long, default_value = "auto", value_name = "CODEC")]
    pub(crate) compress: Choice,
    #[command(flatten)]
    pub(crate) hash: HashArgs,
    /// Volume group on the target (default: the same name as on the source).
    #[arg(long, value_name = "VG")]
    pub(crate) target_vg: Option<String>,
    /// Overwrite a target LV of the same name that is not tagged for this
    /// domain.
    #[arg(long)]
    force: bool,
    /// Stop-and-copy instead of xl's live memory copy:
    /// after the disk passes, `xl save -p` (the guest stops), the last disk
    /// delta, the save image through the copy engine (zero pages never
    /// travel), `xl restore` on HOST; the source is destroyed only once
    /// HOST runs the domain. Longer downtime than live, no xl migrate needed.
    #[arg(long)]
    stop_copy: bool,
    /// Remove the source LVs once HOST runs the domain (default: keep them,
    /// tagged, so that a migration back moves only what changed).
    #[arg(long)]
    delete_source: bool,
    /// Check and print the plan (disks, LVs to create or reuse, sizes, free
    /// space); change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Disk passes while the guest runs, at most (the final one included).
    #[arg(long, default_value_t = 6, value_name = "N", value_parser = clap::value_parser!(u32).range(2..))]
    pub(crate) max_passes: u32,
    /// Stop the disk passes once all disks together changed at most this
    /// many blocks in one pass.
    #[arg(long, default_value_t = 256, value_name = "BLOCKS")]
    pub(crate) converge_blocks: u64,
    /// How disk passes find changed blocks, as in `copy --live`. `auto`
    /// (default): device-mapper snapshots of the source LVs (only written
    /// chunks are read, and the frozen pass reads no whole disk) when their
    /// VG has room for them (a quarter of the LV, at least 8 MiB), else
    /// `fast`.
    #[arg(long, default_value = "auto", value_name = "HOW")]
    pub(crate) rescan: Rescan,
    /// Pause the disk passes while xl copies memory. By default they go on,
    /// so that the last delta, sent while the guest is suspended, holds only
    /// what changed since the last of them.
    #[arg(long)]
    no_passes_during_memory: bool,
    /// Fail the last disk delta (sent while the guest is suspended) when it
    /// has not ended after this many seconds: the guest resumes here and a
    /// rerun reuses what arrived. 0: only --idle-timeout bounds it, which a
    /// target whose disk hangs (but still answers keep-alives) never trips.
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    final_timeout: u64,
    /// The xenmig program on the target host.
    #[arg(long, default_value = "xenmig", value_name = "PATH")]
    pub(crate) remote_xenmig: String,
    #[command(flatten)]
    pub(crate) idle: super::IdleArgs,
    /// Finish or roll back an interrupted migration of DOMAIN from its
    /// journal, and exit.
    #[arg(long, value_name = "DOMAIN", conflicts_with_all = ["domain", "host"])]
    recover: Option<String>,
    /// Print one JSON report at the end (also on failure).
    #[arg(long)]
    json: bool,
    /// Cap what the sending end writes to the link at RATE bytes per second,
    /// as rsync's option: K, M, G (powers of 1024), KB, MB, GB (of 1000); a
    /// bare number is bytes; 0: no limit.
    #[arg(long, default_value = "0", value_name = "RATE")]
    pub(crate) bwlimit: Rate,
}

#[derive(Subcommand)]
pub enum TargetOp {
    /// Versions, domains, the VG's space and LVs.
    Probe {
        #[arg(long)]
        vg: String,
    },
    /// Create or reuse the LVs (VG/LV:SIZE), tagged for domain UUID.
    Prepare {
        #[arg(long)]
        uuid: String,
        #[arg(long = "lv", value_name = "VG/LV:SIZE", required = true)]
        lvs: Vec<String>,
        #[arg(long)]
        force: bool,
    },
    /// Restore the save image FILE (--stop-copy) and report DOMAIN's state.
    Restore {
        #[arg(long)]
        domain: String,
        #[arg(long)]
        file: PathBuf,
        #[arg(long)]
        paused: bool,
    },
    /// The state of DOMAIN and DOMAIN--incoming here.
    State {
        #[arg(long)]
        domain: String,
    },
    /// Destroy a DOMAIN--incoming left by a failed migration (and remove
    /// the save image FILE of a failed --stop-copy).
    Cleanup {
        #[arg(long)]
        domain: String,
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

pub fn run_migrate(a: MigrateArgs, quiet: bool) -> anyhow::Result<i32> {
    if let Some(domain) = &a.recover {
        let host = XenHost::open()?;
        let lines = migrate::recover(&host, &migrate::journal::default_dir(), domain)?;
        let attention = lines.iter().any(|l| l.starts_with("NEEDS ATTENTION"));
        for l in &lines {
            println!("{l}");
        }
        return Ok(if attention { 1 } else { 0 });
    }
    let (domain, host_name) = (a.domain.clone().expect("clap"), a.host.clone().expect("clap"));
    let mut opts = MigrateOptions::new(&domain, &host_name);
    opts.ssh = a.ssh;
    opts.config = a.config;
    opts.paused = a.paused;
    opts.no_monitor = a.no_monitor;
    opts.debug = a.debug;
    opts.references = a.references;
    opts.source = SourceOptions {
        algo: a.hash.algo,
        block_size: a.hash.block_size,
        align: a.hash.align,
        compress: a.compress,
        live: Some(LiveOptions {
            max_passes: a.max_passes,
            converge_blocks: a.converge_blocks,
            freeze_cmd: None,
            thaw_cmd: None,
            rescan: a.rescan,
            final_timeout: (a.final_timeout > 0).then(|| std::time::Duration::from_secs(a.final_timeout)),
            ..LiveOptions::default()
        }),
        idle_timeout: a.idle.timeout(),
        bwlimit: a.bwlimit,
        source_references: a.source_references,
        ..SourceOptions::default()
    };
    opts.target_vg = a.target_vg;
    opts.force = a.force;
    opts.dry_run = a.dry_run;
    opts.stop_copy = a.stop_copy;
    opts.passes_during_memory = !a.no_passes_during_memory;
    opts.delete_source = a.delete_source;
    opts.remote_xenmig = a.remote_xenmig;
    // Seconds from the environment: the memory phase's limit, and the
    // fault tests' windows (docs/lab.md).
    let secs = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok()).map(Duration::from_secs);
    if let Some(d) = secs("XENMIG_MEMORY_TIMEOUT") {
        opts.memory_timeout = d;
    }
    opts.hold_ready = secs("XENMIG_TEST_HOLD_READY");
    opts.hold_precopy = secs("XENMIG_TEST_HOLD_PRECOPY");
    let host = XenHost::open()?;
    let progress = super::output::progress(quiet, a.json, "migrate");
    progress.limit(a.bwlimit);
    let (report, result) = migrate::migrate(&host, &opts, &progress);
    progress.finish();
    print_migrate_report(&report, a.json);
    match result {
        Ok(()) => Ok(0),
        Err(e) => {
            super::output::error(&xenmig::copy::sanitize(&format!("migrate {domain} -> {host_name}: {e}")));
            Ok(1)
        }
    }
}

fn print_migrate_report(r: &MigrateReport, json: bool) {
    if json {
        println!("{}", serde_json::to_string(r).expect("report serialises"));
        return;
    }
    if r.dry_run {
        println!("plan for migrating {} to {} (nothing changed):", r.domain, r.host);
        for l in &r.plan {
            println!("  {l}");
        }
        return;
    }
    if r.migrated {
        println!(
            "{} now runs on {}: {:.1} s in all, downtime {}, last disk delta {}",
            r.domain,
            r.host,
            r.seconds,
            r.downtime_seconds.map(|d| format!("{d:.2} s")).unwrap_or_else(|| "unknown".into()),
            r.final_delta_seconds.map(|d| format!("{d:.2} s")).unwrap_or_else(|| "-".into()),
        );
    }
    for p in &r.phases {
        eprintln!("  {:<32} {:>8.2} s", p.phase, p.seconds);
    }
    for d in &r.disks {
        if let Some(c) = &d.copy {
            eprintln!(
                "  {} {} -> {}:{} {}: {} passes, {} blocks fetched, {} reused, verified {}",
                d.vdev,
                d.source,
                r.host,
                d.target,
                if d.created { "(created)" } else { "(reused)" },
                c.passes.len(),
                c.blocks_fetched,
                c.blocks_reused,
                c.digest
            );
        }
    }
    for l in &r.rolled_back {
        eprintln!("  rolled back: {l}");
    }
    for l in &r.needs_attention {
        eprintln!("  NEEDS ATTENTION: {l}");
    }
}

pub fn run_relay(control: PathBuf, ssh: String, rewrite_disk: Vec<String>, rest: Vec<String>) -> anyhow::Result<i32> {
    let renames = rewrite_disk
        .iter()
        .map(|r| {
            r.split_once('=')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| anyhow::anyhow!("--rewrite-disk '{r}': expected OLD=NEW"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut transport = shell_words::split(&ssh).map_err(|e| anyhow::anyhow!("--ssh '{ssh}': {e}"))?;
    let mut rest = rest;
    if transport.is_empty() && !rest.is_empty() {
        // No transport: run the receiver here; xl's HOST word means nothing.
        rest.remove(0);
        transport = Vec::new();
    }
    match migrate::relay::run(&control, &renames, &transport, &rest) {
        Ok(code) => Ok(code),
        Err(migrate::relay::RelayError::Aborted) => Ok(1),
        Err(e) => Err(e.into()),
    }
}

pub fn run_target(op: TargetOp) -> anyhow::Result<i32> {
    let out = match op {
        TargetOp::Probe { vg } => serde_json::to_string(&remote::probe(&vg)?)?,
        TargetOp::Prepare { uuid, lvs, force } => {
            let reqs = lvs
                .iter()
                .map(|s| remote::LvRequest::parse(s))
                .collect::<Result<Vec<_>, _>>()
                .map_err(anyhow::Error::msg)?;
            serde_json::to_string(&remote::prepare(&uuid, &reqs, force)?)?
        }
        TargetOp::State { domain } => serde_json::to_string(&remote::state(&domain)?)?,
        TargetOp::Restore { domain, file, paused } => serde_json::to_string(&remote::restore(&domain, &file, paused)?)?,
        TargetOp::Cleanup { domain, file } => {
            let removed = match &file {
                Some(f) => remote::remove_incoming(f)?,
                None => false,
            };
            serde_json::json!({ "destroyed": remote::cleanup(&domain)?, "removed": removed }).to_string()
        }
    };
    println!("{out}");
    Ok(0)
}
