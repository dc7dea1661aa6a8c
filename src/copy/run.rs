//! A whole copy: start both ends (a thread for a local end, `xenmig serve`
//! through ssh for a remote one), run the protocol, and return the report.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Instant;

use crate::storage::image::ImageError;
use crate::wire::protocol::ProtocolError;
use crate::wire::transport::{Link, Location, Peer};

use super::direct;
use super::source::{self, SourceOptions};
use super::target::{self, TargetOptions};
use super::{EngineError, Progress, Report};

#[derive(Clone, Debug)]
pub struct CopyOptions {
    pub source: SourceOptions,
    pub target: TargetOptions,
    /// Command that reaches a remote host (`ssh` by default); empty runs the
    /// remote command locally.
    pub ssh: String,
    /// The xenmig program on the remote host.
    pub remote_xenmig: String,
    /// Let a local copy with nothing to reuse go direct (`direct`) instead
    /// of through the wire protocol.
    pub direct: bool,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            source: SourceOptions::default(),
            target: TargetOptions::default(),
            ssh: "ssh".into(),
            remote_xenmig: "xenmig".into(),
            direct: true,
        }
    }
}

/// `--idle-timeout` for a remote `xenmig serve`, only when it is not the
/// default (so that a remote xenmig of the previous release, which lacks
/// the flag, still runs with the default).
pub fn idle_arg(idle: Option<std::time::Duration>) -> Vec<String> {
    if idle == Some(crate::wire::liveness::DEFAULT_IDLE_TIMEOUT) {
        return Vec::new();
    }
    vec!["--idle-timeout".into(), idle.map_or(0, |d| d.as_secs().max(1)).to_string()]
}

/// Arguments for `xenmig serve` playing the source end.
fn serve_source_args(o: &CopyOptions, path: &str) -> Vec<String> {
    let s = &o.source;
    let mut v = vec![
        o.remote_xenmig.clone(),
        "serve".into(),
        "--source".into(),
        path.into(),
        "--hash".into(),
        s.algo.name().into(),
        "--block-size".into(),
        s.block_size.to_string(),
        "--align".into(),
        s.align.name().into(),
        "--compress".into(),
        s.compress.to_string(),
    ];
    v.extend(idle_arg(s.idle_timeout));
    // Only when set: an older xenmig on the far host does not know it.
    if s.bwlimit.limit().is_some() {
        v.extend(["--bwlimit".into(), s.bwlimit.0.to_string()]);
    }
    // Paths on the far (source) host; likewise only when given.
    for r in &s.source_references {
        v.extend(["--source-reference".into(), r.display().to_string()]);
    }
    if let Some(live) = &s.live {
        v.push("--live".into());
        v.extend(["--max-passes".into(), live.max_passes.to_string()]);
        v.extend(["--converge-blocks".into(), live.converge_blocks.to_string()]);
        if let Some(c) = &live.freeze_cmd {
            v.extend(["--freeze-cmd".into(), c.clone()]);
        }
        // The default is not named: an older far end reads it as well.
        if live.rescan != super::source::Rescan::Fast {
            v.extend(["--rescan".into(), live.rescan.name().into()]);
        }
        if let Some(c) = &live.thaw_cmd {
            v.extend(["--thaw-cmd".into(), c.clone()]);
        }
        // Only when asked for: an older xenmig on the far host does not know it.
        if live.freeze_timeout != super::quiesce::DEFAULT_FREEZE_TIMEOUT {
            v.extend(["--freeze-timeout".into(), live.freeze_timeout.as_secs().to_string()]);
        }
        // Likewise: the bound applies where the frozen pass runs, the far end.
        if let Some(t) = live.final_timeout {
            v.extend(["--final-timeout".into(), t.as_secs().max(1).to_string()]);
        }
    }
    v
}

/// Arguments for `xenmig serve` playing the target end.
fn serve_target_args(o: &CopyOptions, path: &str) -> Vec<String> {
    let mut v = vec![o.remote_xenmig.clone(), "serve".into(), "--target".into(), path.into()];
    v.extend(idle_arg(o.target.idle_timeout));
    if let Some(max) = o.target.max_image_size {
        v.extend(["--max-image-size".into(), max.to_string()]);
    }
    // Only when asked for: a far xenmig of the previous release lacks it.
    if o.target.readback {
        v.push("--readback".into());
    }
    for r in &o.target.references {
        v.push("--reference".into());
        v.push(r.display().to_string());
    }
    v
}

/// Copy `src` to `dst`; at most one of them may be remote.
pub fn copy(src: &Location, dst: &Location, opts: &CopyOptions, progress: &Progress) -> Result<Report, EngineError> {
    let started = Instant::now();
    let mut report = match (src, dst) {
        (Location::Local(s), Location::Local(d)) => {
            let src_meta = refuse_same_file(s, d)?;
            let mut topts = opts.target.clone();
            // A new DST gets the source's permission bits: a private
            // source does not become a readable copy.
            if topts.create_mode.is_none() {
                topts.create_mode = Some(src_meta.permissions().mode() & 0o777);
            }
            if opts.direct && direct::eligible(&opts.source, &topts, d) {
                let mut report = direct::copy(s, d, &opts.source, &topts, progress)?;
                report.source = src.to_string();
                report.target = dst.to_string();
                report.seconds = started.elapsed().as_secs_f64();
                return Ok(report);
            }
            let (a, b) = Link::pair()?;
            let (s, sopts) = (s.clone(), opts.source.clone());
            let source = thread::spawn(move || source::run(&s, &sopts, a, &Progress::hidden()));
            let result = target::run(d, &topts, b, progress);
            let source_result = source.join().expect("source thread panicked");
            // Both ends are this process: what each frame kind cost, both
            // directions (a measurement aid for the protocol's bytes).
            for l in crate::wire::protocol::tally::lines() {
                log::debug!(
                    "frames {:?}: {} frames, {} bytes ({} bulk, {} protocol)",
                    l.kind,
                    l.frames,
                    l.bytes,
                    l.bulk,
                    l.bytes - l.bulk
                );
            }
            // The target's error is usually the more telling one (it names
            // what did not arrive or did not verify), unless it only saw the
            // source hang up: then the source's own error says why.
            match (result, source_result) {
                // (the levels are the source's to tell)
                (Ok(report), Ok(from_source)) => {
                    Report { stream_levels: from_source.stream_levels, receipts: from_source.receipts, ..report }
                }
                (_, Err(e @ EngineError::Interrupted { .. })) => return Err(e),
                (Err(EngineError::Protocol(ProtocolError::Eof(_) | ProtocolError::Io(_))), Err(e)) => return Err(e),
                (Err(e), _) | (Ok(_), Err(e)) => return Err(e),
            }
        }
        (Location::Local(s), Location::Remote { host, path }) => {
            let (link, peer) = Link::spawn(&opts.ssh, host, &serve_target_args(opts, path))?;
            let stats = link.stats.clone();
            // The far host's references may be at the same paths here.
            let sopts = SourceOptions { same_path_references: opts.target.references.clone(), ..opts.source.clone() };
            let r = source::run(s, &sopts, link, progress);
            let mut report = finish_remote(r, peer)?;
            report.bytes_wire = stats.total();
            report
        }
        (Location::Remote { host, path }, Location::Local(d)) => {
            let (link, peer) = Link::spawn(&opts.ssh, host, &serve_source_args(opts, path))?;
            let r = target::run(d, &opts.target, link, progress);
            finish_remote(r, peer)?
        }
        (Location::Remote { .. }, Location::Remote { .. }) => return Err(EngineError::BothRemote),
    };
    report.source = src.to_string();
    report.target = dst.to_string();
    report.bwlimit = opts.source.bwlimit.limit();
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Refuse to copy `src` onto itself: the same inode (a second name, a
/// symlink, a hard link) or the same block device (`st_rdev`, whatever node
/// names it). Returns the source's metadata.
fn refuse_same_file(src: &Path, dst: &Path) -> Result<std::fs::Metadata, EngineError> {
    let s =
        std::fs::metadata(src).map_err(|source| EngineError::Image(ImageError::Open { path: src.into(), source }))?;
    let Ok(d) = std::fs::metadata(dst) else { return Ok(s) };
    let same_inode = s.dev() == d.dev() && s.ino() == d.ino();
    let same_device = s.file_type().is_block_device() && d.file_type().is_block_device() && s.rdev() == d.rdev();
    if same_inode || same_device {
        let what = if s.file_type().is_block_device() { "block device" } else { "file" };
        return Err(EngineError::SameFile { src: src.into(), dst: dst.into(), what });
    }
    Ok(s)
}

/// Wait for the remote end after our end is done; on failure, stop it.
fn finish_remote(r: Result<Report, EngineError>, peer: Peer) -> Result<Report, EngineError> {
    match r {
        Ok(report) => {
            peer.close()?;
            Ok(report)
        }
        Err(e) => Err(remote_cause(e, peer)),
    }
}

/// This end failed. If it only saw the link break, and the far end failed
/// and said why, that is the error to report (not "Broken pipe"); then the
/// far end is stopped.
pub fn remote_cause(e: EngineError, mut peer: Peer) -> EngineError {
    let link_broke =
        matches!(&e, EngineError::Protocol(ProtocolError::Io(_) | ProtocolError::Eof(_)) | EngineError::Transport(_))
            || e.to_string().contains("closed");
    let out = if link_broke {
        match peer.failure(std::time::Duration::from_secs(2)) {
            Some(said) => said.into(),
            None => e,
        }
    } else {
        e
    };
    peer.abort();
    out
}

/// `xenmig serve`: one end of a copy on stdin/stdout.
pub enum ServeRole {
    Source(PathBuf, SourceOptions),
    Target(PathBuf, TargetOptions),
}

pub fn serve(role: ServeRole) -> Result<Option<Report>, EngineError> {
    let link = Link::stdio();
    match role {
        ServeRole::Source(p, o) => source::run(&p, &o, link, &Progress::hidden()).map(Some),
        ServeRole::Target(p, o) => target::run(&p, &o, link, &Progress::hidden()).map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::source::LiveOptions;

    /// A far source gets `--final-timeout` only when one is set (a far
    /// xenmig of the previous release does not know the flag), and the
    /// frozen pass it bounds runs there.
    #[test]
    fn the_final_timeout_reaches_a_far_source_only_when_set() {
        let mut o = CopyOptions::default();
        o.source.live = Some(LiveOptions::default());
        assert!(!serve_source_args(&o, "/x").iter().any(|a| a == "--final-timeout"));
        o.source.live =
            Some(LiveOptions { final_timeout: Some(std::time::Duration::from_secs(30)), ..LiveOptions::default() });
        let args = serve_source_args(&o, "/x");
        let at = args.iter().position(|a| a == "--final-timeout").expect("--final-timeout passed on");
        assert_eq!(args[at + 1], "30");
    }
}
