//! `migrate --stop-copy`: the seed's path. Disk passes while the guest
//! runs (as in live mode), then:
//!
//! ```text
//!  source                                         target
//!  xl save -p NAME FILE   (guest suspended, its memory in FILE, left paused)
//!  last disk delta        ══ final pass, verified ══▶ LV
//!  FILE                   ══ copy engine ═══════════▶ /var/lib/xenmig/incoming/NAME.save
//!                         (zero pages never travel; verified like any image)
//!                         ── migrate-target restore ─▶ xl restore; NAME runs
//!  xl destroy NAME        (only once the target runs it)
//! ```
//!
//! Until the restore is asked for, every failure unpauses the source (its
//! disk was never written, its memory never left). Once it is asked for,
//! the target's state decides, as after `GO` in live mode.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::copy::run::{copy, CopyOptions};
use crate::copy::source::SourceOptions;
use crate::copy::target::TargetOptions;
use crate::copy::Progress;
use crate::wire::transport::Location;

use super::journal::Phase;
use super::remote::{self, DomainState};
use super::{final_delta, Commit, MigrateError, MigrateReport, SourceHost};

/// Run an xl subcommand on the source; its output goes to our stderr.
fn xl(host: &dyn SourceHost, args: &[&str]) -> Result<(), String> {
    let mut cmd = Command::new(host.xl());
    // Its own process group: a Ctrl-C meant for xenmig must not kill xl in
    // the middle of a save.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let st = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run {}: {e}", host.xl().display()))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("xl {} failed ({st})", args.join(" ")))
    }
}

/// Where the save image waits on both hosts.
pub fn save_path(dir: &Path, domain: &str) -> PathBuf {
    dir.join(format!("{domain}.save"))
}

pub(super) fn save_and_commit(p: Commit) -> Result<(), MigrateError> {
    let Commit { host, opts, dom, mut copies, report, clock, journal, progress } = p;
    let copies = &mut copies;
    let target = opts.target();
    let local_dir =
        opts.journal_dir.parent().map(|p| p.join("save")).unwrap_or_else(|| PathBuf::from("/var/lib/xenmig/save"));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&local_dir)
        .map_err(|e| MigrateError::Memory(format!("cannot create {}: {e}", local_dir.display())))?;
    let local = save_path(&local_dir, &dom.name);
    let remote_file = save_path(Path::new(remote::INCOMING_DIR), &dom.name);
    let _ = std::fs::remove_file(&local);

    // ---- save: the guest stops here ----
    let stopped = Instant::now();
    let file = local.display().to_string();
    if let Err(e) = xl(host, &["save", "-p", &dom.name, &file]) {
        // xl resumes the domain itself when the save fails.
        let _ = std::fs::remove_file(&local);
        let err = MigrateError::Memory(e);
        super::abort_copies(std::mem::take(copies), &err);
        return Err(err);
    }
    let undo = |report: &mut MigrateReport, err: &MigrateError| {
        let _ = std::fs::remove_file(&local);
        match xl(host, &["unpause", &dom.name]) {
            Ok(()) => report.rolled_back.push(format!("unpaused {} on this host", dom.name)),
            Err(e) => report.needs_attention.push(format!(
                "{} is left paused here ({e}); `xl unpause {}` once you have checked {} does not run it",
                dom.name, dom.name, opts.host
            )),
        }
        let _ = target.call::<serde_json::Value>(
            "cleanup",
            &["--domain".into(), dom.name.clone(), "--file".into(), remote_file.display().to_string()],
        );
        log::info!("rolled back after: {err}");
    };

    // ---- the last disk delta, the guest paused ----
    clock.next(report, "final disk delta (paused)", progress);
    journal.set_phase(Phase::FinalDelta, &opts.journal_dir)?;
    let t = Instant::now();
    let delta = final_delta(copies, stopped);
    report.final_delta_seconds = Some(t.elapsed().as_secs_f64());
    // The tracking snapshots go when this function returns, after the
    // restore on the target or the rollback here.
    let _tracking = match delta {
        Ok(d) => d.record(report),
        Err(e) => {
            super::abort_copies(std::mem::take(copies), &e);
            undo(report, &e);
            return Err(e);
        }
    };

    // ---- the save image, through the engine ----
    clock.next(report, "memory image copy", progress);
    let copy_opts = CopyOptions {
        source: SourceOptions { live: None, ..opts.source.clone() },
        target: TargetOptions::default(),
        ssh: opts.ssh.clone(),
        remote_xenmig: opts.remote_xenmig.clone(),
        ..CopyOptions::default()
    };
    let dst = Location::Remote { host: opts.host.clone(), path: remote_file.display().to_string() };
    match copy(&Location::Local(local.clone()), &dst, &copy_opts, &Progress::hidden()) {
        Ok(r) => {
            report.bytes_wire += r.bytes_wire;
            report.memory_image = Some(r);
        }
        Err(e) => {
            let err = MigrateError::Memory(format!("copying the save image: {e}"));
            undo(report, &err);
            return Err(err);
        }
    }
    let _ = std::fs::remove_file(&local);

    // ---- restore on the target: the point of no return ----
    clock.next(report, "restore on target", progress);
    journal.set_phase(Phase::Released, &opts.journal_dir)?;
    let mut args = vec!["--domain".to_string(), dom.name.clone(), "--file".into(), remote_file.display().to_string()];
    if opts.paused {
        args.push("--paused".into());
    }
    let restored: Result<DomainState, MigrateError> = target.call("restore", &args);
    let there = match restored {
        Ok(s) => s,
        Err(e) => {
            // Did it start anyway (the answer may be what was lost)?
            match target.call::<DomainState>("state", &["--domain".into(), dom.name.clone()]) {
                Ok(s) if s.name.is_none() => {
                    undo(report, &e);
                    return Err(MigrateError::Commit(format!("restore on {} failed: {e}", opts.host)));
                }
                Ok(s) => s,
                Err(e2) => {
                    report.needs_attention.push(format!(
                        "cannot tell whether {} runs on {} ({e2}); {} stays paused here: check there, then \
                         `xl destroy {}` here or `xl unpause {}` here",
                        dom.name, opts.host, dom.name, dom.name, dom.name
                    ));
                    return Err(MigrateError::Commit(format!("restore on {}: {e}", opts.host)));
                }
            }
        }
    };
    report.downtime_seconds = Some(stopped.elapsed().as_secs_f64());
    let runs = there.name.as_deref().is_some_and(|s| opts.paused || !s.contains('p'));
    if !runs {
        let e = MigrateError::Commit(format!(
            "{} on {} is in state {:?} after the restore",
            dom.name, opts.host, there.name
        ));
        undo(report, &e);
        return Err(e);
    }
    // ---- the target runs it: the source copy goes ----
    if let Err(e) = xl(host, &["destroy", &dom.name]) {
        report.needs_attention.push(format!("{} runs on {}; destroy the paused source copy: {e}", dom.name, opts.host));
    }
    let _ = Duration::ZERO;
    Ok(())
}

use std::os::unix::fs::DirBuilderExt;
