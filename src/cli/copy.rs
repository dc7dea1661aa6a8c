//! `xenmig copy` and `xenmig serve` (the far end of a copy).

use std::path::PathBuf;

use serde_json::json;

use xenmig::copy::run::{self, CopyOptions, ServeRole};
use xenmig::copy::source::SourceOptions;
use xenmig::copy::target::TargetOptions;
use xenmig::copy::Report;
use xenmig::wire::compress::Choice;
use xenmig::wire::rate::Rate;
use xenmig::wire::transport::Location;

use super::{CopyArgs, HashArgs, IdleArgs, LiveArgs};

/// `xenmig serve`.
#[allow(clippy::too_many_arguments)]
pub fn serve(
    source: Option<PathBuf>,
    target: Option<PathBuf>,
    hash: HashArgs,
    compress: Choice,
    references: Vec<PathBuf>,
    source_references: Vec<PathBuf>,
    live: LiveArgs,
    allow_open_by: Option<String>,
    idle: IdleArgs,
    max_image_size: Option<u64>,
    bwlimit: Rate,
    readback: bool,
) -> anyhow::Result<i32> {
    let role = match (source, target) {
        (Some(p), None) => ServeRole::Source(
            p,
            SourceOptions {
                algo: hash.algo,
                block_size: hash.block_size,
                align: hash.align,
                compress,
                live: live.options(),
                idle_timeout: idle.timeout(),
                bwlimit,
                source_references,
                ..SourceOptions::default()
            },
        ),
        (None, Some(p)) => ServeRole::Target(
            p,
            TargetOptions {
                references,
                allow_open_by,
                create_mode: None,
                idle_timeout: idle.timeout(),
                max_image_size,
                readback,
                always_index_similar: false,
            },
        ),
        _ => anyhow::bail!("give exactly one of --source and --target"),
    };
    xenmig::copy::interrupt::install()?;
    run::serve(role)?;
    Ok(0)
}

pub fn run_copy(a: CopyArgs, quiet: bool) -> i32 {
    // SIGINT, SIGTERM and SIGHUP end the copy through its error path (thaw,
    // snapshots removed), never by killing the process where it stands.
    if let Err(e) = xenmig::copy::interrupt::install() {
        eprintln!("xenmig: {e}");
        return 1;
    }
    let src = Location::parse(&a.src);
    let dst = Location::parse(&a.dst);
    if !a.hash.algo.collision_safe() {
        log::warn!(
            "SHA-1 is not collision-safe: a reference holding another tenant's data could supply colliding blocks"
        );
    }
    let opts = CopyOptions {
        source: SourceOptions {
            algo: a.hash.algo,
            block_size: a.hash.block_size,
            align: a.hash.align,
            compress: a.compress,
            live: a.live.options(),
            idle_timeout: a.idle.timeout(),
            bwlimit: a.bwlimit,
            source_references: a.source_references,
            ..SourceOptions::default()
        },
        target: TargetOptions {
            references: a.references,
            allow_open_by: None,
            create_mode: None,
            idle_timeout: a.idle.timeout(),
            max_image_size: a.max_image_size,
            readback: a.readback,
            always_index_similar: false,
        },
        ssh: a.ssh,
        remote_xenmig: a.remote_xenmig,
        direct: !a.no_direct,
    };
    let progress = super::output::progress(quiet, a.json, "copy");
    progress.limit(a.bwlimit);
    let result = run::copy(&src, &dst, &opts, &progress);
    progress.finish();
    match result {
        Ok(report) => {
            print_report(&report, a.json);
            0
        }
        Err(e) => {
            if a.json {
                println!("{}", json!({"source": a.src, "target": a.dst, "verified": false, "error": e.to_string()}));
            }
            let msg = xenmig::copy::sanitize(&format!("copy {} -> {} failed: {e}", a.src, a.dst));
            super::output::error(&msg);
            1
        }
    }
}

fn print_report(r: &Report, json: bool) {
    if json {
        println!("{}", serde_json::to_string(r).expect("report serialises"));
        return;
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let pct = |n: u64| {
        if r.blocks_total == 0 {
            0.0
        } else {
            100.0 * n as f64 / r.blocks_total as f64
        }
    };
    let how = if r.read_back { " (read back)" } else { "" };
    println!(
        "{} -> {}: {:.1} MiB in {:.2} s, verified{how} {}",
        r.source,
        r.target,
        mib(r.image_size),
        r.seconds,
        r.digest
    );
    if let Some(limit) = r.bwlimit {
        println!("  bandwidth limit: {}/s", Rate(limit));
    }
    println!(
        "  blocks: {} total, {} zero ({:.1}%), {} reused ({:.1}%, {} in place), {} fetched ({:.1}%)",
        r.blocks_total,
        r.blocks_zero,
        pct(r.blocks_zero),
        r.blocks_reused,
        pct(r.blocks_reused),
        r.blocks_in_place,
        r.blocks_fetched,
        pct(r.blocks_fetched),
    );
    if r.direct {
        println!(
            "  direct: {:.2} MiB read, hashed and written once, no wire (--no-direct runs the protocol)",
            mib(r.bytes_fetched)
        );
        return;
    }
    println!(
        "  wire: {:.2} MiB in all ({:.3}% of the image); fetched {:.2} MiB sent as {:.2} MiB",
        mib(r.bytes_wire),
        if r.image_size == 0 { 0.0 } else { 100.0 * r.bytes_wire as f64 / r.image_size as f64 },
        mib(r.bytes_fetched),
        mib(r.bytes_payload_wire)
    );
}
