//! `xenmig migrate DOMAIN HOST`: a running guest, its memory and its LVM
//! disks to another Xen host, committed or rolled back as a whole.
//!
//! ```text
//!  source dom0 (xenmig migrate)                         target dom0
//!  P0 preflight: domain running, disks are LVs  ── migrate-target probe ──▶ VG space, name free
//!  P1 prepare                                   ── migrate-target prepare ─▶ lvcreate + tag (or reuse)
//!  P2 disk pre-copy, guest running              ══ xenmig serve --target ══▶ LV (one link per disk)
//!     passes until the changes (all disks) converge
//!  P3 xl migrate -s "xenmig migrate-relay ..."  ── xl's stream (memory) ──▶ NAME--incoming, paused
//!     source suspended by xl
//!  P4 at once: last disk delta                  ══ final pass, verified ══▶ LV (synced, no page cache)
//!     (meanwhile xl's last round)               ◀── READY, held by the relay until P4 is done
//!  P5 RELEASE: READY passed on ─▶ xl sends GO   ─────────────────────────▶ unpause; status 0
//!     xl destroys the source domain; its LV is kept, tagged
//! ```
//!
//! The guest is never lost: until P5 the target was never told it may
//! unpause, so any failure resumes the source (xl does it when the relay
//! closes without READY) and destroys `NAME--incoming` on the target. After
//! P5 the target's state decides (see [`recover`]). The source LV is only
//! ever read. Each phase is journalled ([`journal`]).
//!
//! What changes by host (the hypervisor, LVM, xl) sits behind
//! [`SourceHost`], so that the orchestration runs against fakes in tests.

pub mod journal;
pub mod relay;
pub mod remote;
pub mod stop_copy;
pub mod xl_header;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use serde::Serialize;
use thiserror::Error;

use crate::copy::source::{Convergence, LiveOptions, SourceOptions, SourceSession, Tracking};
use crate::copy::{EngineError, Progress, Report};
use crate::wire::transport::{Link, Peer};

use journal::{Journal, Phase};
use remote::{DomainState, LvRequest, Prepared, Probe, TargetHost};

/// One error per phase, so that the caller (and `--recover`) knows what
/// was rolled back.
#[derive(Debug, Error)]
pub enum MigrateError {
    #[error("refused before anything changed: {0}")]
    Preflight(String),
    #[error("cannot reach the target: {0}")]
    Unreachable(String),
    #[error("on the target: {0}")]
    Target(String),
    #[error("disk pre-copy of {disk} failed (the guest keeps running here; a rerun reuses what arrived): {source}")]
    PreCopy { disk: String, source: EngineError },
    #[error("xl migrate failed before the target was ready ({0}); xl resumes the guest here")]
    Memory(String),
    #[error(
        "the last delta of {disk} failed while the guest was suspended; the target was not told to unpause: {source}"
    )]
    FinalDelta { disk: String, source: EngineError },
    #[error("after the point of no return: {0}")]
    Commit(String),
    #[error("journal: {0}")]
    Journal(String),
    #[error(transparent)]
    Xen(#[from] crate::xen::XenError),
}

/// What a migration needs from the source host: the hypervisor, LVM and
/// xl. [`XenHost`] is the real one.
pub trait SourceHost {
    /// The domain as the migration needs it.
    fn domain(&self, name: &str) -> Result<DomainInfo, MigrateError>;
    /// State of domain `id` now: `None` if it is gone.
    fn state(&self, id: u32) -> Result<Option<DomState>, MigrateError>;
    /// Resume a domain left suspended by a migration that did not complete.
    fn resume(&self, id: u32) -> Result<(), MigrateError>;
    /// Tag a source LV (kept after the migration, marked for the domain).
    fn tag_lv(&self, path: &str, tag: &str) -> Result<(), MigrateError>;
    /// The xl program.
    fn xl(&self) -> PathBuf;
    /// Remove a source LV (`--delete-source`, after a migration committed).
    fn remove_lv(&self, path: &str) -> Result<(), MigrateError> {
        Err(MigrateError::Commit(format!("this host cannot remove {path}")))
    }
    /// Remove the change-tracking snapshots of the LV at `path` that
    /// process `pid` took and left (it was killed); returns their names.
    fn remove_tracking_snapshots(&self, _path: &str, _pid: u32) -> Result<Vec<String>, MigrateError> {
        Ok(Vec::new())
    }
}

#[derive(Clone, Debug)]
pub struct DomainInfo {
    pub id: u32,
    pub name: String,
    pub uuid: String,
    pub paused: bool,
    pub memory_kib: u64,
    pub disks: Vec<DiskInfo>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DiskInfo {
    /// The guest's name for it (`xvda`).
    pub vdev: String,
    pub vg: String,
    pub lv: String,
    pub size_bytes: u64,
}

impl DiskInfo {
    pub fn path(&self) -> String {
        format!("/dev/{}/{}", self.vg, self.lv)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DomState {
    Running,
    Paused,
    /// Shut down for a suspend (a save or migration under way).
    Suspended,
    Other,
}

#[derive(Clone, Debug)]
pub struct MigrateOptions {
    pub domain: String,
    pub host: String,
    /// As xl's `-s`: the command that reaches HOST.
    pub ssh: String,
    pub remote_xenmig: String,
    /// `-C`: the xl config to use on the target.
    pub config: Option<PathBuf>,
    /// `-p`: leave the domain paused on the target.
    pub paused: bool,
    /// `-e`: no monitoring process on the target.
    pub no_monitor: bool,
    pub debug: bool,
    /// Target-side references for the disk copies.
    pub references: Vec<PathBuf>,
    /// Digest, block size, codec and live-pass settings of the disk copies.
    pub source: SourceOptions,
    pub target_vg: Option<String>,
    pub force: bool,
    /// Remove the source LVs once the target runs the domain (default: keep
    /// them, tagged).
    pub delete_source: bool,
    pub dry_run: bool,
    /// This program, as the relay xl starts.
    pub self_exe: PathBuf,
    pub journal_dir: PathBuf,
    /// Directory for the relay's control socket.
    pub run_dir: PathBuf,
    /// How long to wait for the target's READY once xl runs.
    pub memory_timeout: Duration,
    /// `--stop-copy`: suspend, save memory, last delta, restore there
    /// (instead of xl migrate's live memory copy).
    pub stop_copy: bool,
    /// Live mode: keep running disk passes while xl copies memory, so that
    /// the last delta holds only what changed since the last of them.
    pub passes_during_memory: bool,
    /// Fault tests only: wait this long with READY held before the last
    /// delta (`XENMIG_TEST_HOLD_READY=SECONDS`).
    pub hold_ready: Option<Duration>,
    /// Fault tests only: wait this long in the disk pre-copy, after pass 1
    /// began (`XENMIG_TEST_HOLD_PRECOPY=SECONDS`).
    pub hold_precopy: Option<Duration>,
}

impl MigrateOptions {
    pub fn new(domain: &str, host: &str) -> MigrateOptions {
        MigrateOptions {
            domain: domain.into(),
            host: host.into(),
            ssh: "ssh".into(),
            remote_xenmig: "xenmig".into(),
            config: None,
            paused: false,
            no_monitor: false,
            debug: false,
            references: Vec::new(),
            source: SourceOptions {
                live: Some(LiveOptions { rescan: crate::copy::source::Rescan::Auto, ..LiveOptions::default() }),
                ..SourceOptions::default()
            },
            target_vg: None,
            force: false,
            delete_source: false,
            dry_run: false,
            self_exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("xenmig")),
            journal_dir: journal::default_dir(),
            run_dir: PathBuf::from("/run/xenmig"),
            memory_timeout: Duration::from_secs(1800),
            hold_ready: None,
            hold_precopy: None,
            stop_copy: false,
            passes_during_memory: true,
        }
    }

    fn target(&self) -> TargetHost {
        TargetHost { ssh: self.ssh.clone(), host: self.host.clone(), xenmig: self.remote_xenmig.clone() }
    }
}

/// One phase and how long it took.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseTime {
    pub phase: String,
    pub seconds: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct DiskReport {
    pub vdev: String,
    pub source: String,
    pub target: String,
    /// Created on the target by this migration (else reused).
    pub created: bool,
    pub size_bytes: u64,
    pub copy: Option<Report>,
}

/// What `migrate --json` prints, on success and on failure.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MigrateReport {
    pub domain: String,
    pub host: String,
    pub mode: String,
    pub dry_run: bool,
    /// True only when the target runs (or holds paused, with `-p`) the
    /// domain on disks verified against the suspended source.
    pub migrated: bool,
    pub phases: Vec<PhaseTime>,
    pub disks: Vec<DiskReport>,
    /// Disk passes while the guest ran (all disks together).
    pub disk_passes: u32,
    /// Of these, the passes while xl copied memory.
    pub disk_passes_during_memory: u32,
    /// Source suspended (seen by polling the hypervisor) to the target's
    /// unpause report.
    pub downtime_seconds: Option<f64>,
    /// The last disk delta, sent while the source was suspended.
    pub final_delta_seconds: Option<f64>,
    /// From the target's READY to RELEASE (READY passed on to xl): what
    /// xenmig adds to xl's own pause. Near 0 when the last delta was done
    /// before READY came.
    pub ready_to_release_seconds: Option<f64>,
    /// Live mode: the suspended window, event by event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suspended_window: Option<SuspendedWindow>,
    /// `--stop-copy`: the copy of the save image (memory) to the target.
    pub memory_image: Option<Report>,
    /// Bytes the disk copies moved (both directions, framing included).
    pub bytes_wire: u64,
    /// `--bwlimit` of each disk copy, bytes per second (absent: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bwlimit: Option<u64>,
    pub seconds: f64,
    /// What was undone after a failure, in order.
    pub rolled_back: Vec<String>,
    /// What is left for a person to decide, with the command to run.
    pub needs_attention: Vec<String>,
    pub error: Option<String>,
    /// The plan (`--dry-run`, and also recorded on a real run).
    pub plan: Vec<String>,
}

/// Live mode: when each event of the suspended window happened, in
/// seconds after the source was seen suspended. It tells where a pause
/// longer than xl's own goes: the last delta (which starts at once and
/// runs while xl sends its last memory round and the target restores),
/// the wait for READY, and xl's GO and the target's unpause after RELEASE.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SuspendedWindow {
    pub last_delta_started: Option<f64>,
    pub last_delta_done: Option<f64>,
    /// The last byte of xl's stream (its last memory round and the
    /// device state) went to the target.
    pub xl_stream_end: Option<f64>,
    /// The target's xl built the domain, paused (READY reached the relay).
    pub ready: Option<f64>,
    /// READY passed on to the source's xl.
    pub released: Option<f64>,
    /// The source's xl sent GO (its point of no return).
    pub go: Option<f64>,
    /// The target's xl reported the unpause.
    pub unpaused: Option<f64>,
}

/// The real source host: libxenctrl/xenstore, lvm2 and xl.
pub struct XenHost {
    xen: crate::xen::Xen,
}

impl XenHost {
    pub fn open() -> Result<XenHost, MigrateError> {
        Ok(XenHost { xen: crate::xen::Xen::open()? })
    }
}

impl SourceHost for XenHost {
    fn domain(&self, name: &str) -> Result<DomainInfo, MigrateError> {
        use crate::xen::domain::{DomainRef, ShutdownReason, State};
        let mut d = self.xen.domain(&DomainRef::parse(name))?;
        if d.id == 0 {
            return Err(MigrateError::Preflight("dom0 cannot be migrated".into()));
        }
        let lvm = crate::storage::lvm::Lvm::new();
        let lvs = lvm.lvs(None).map_err(|e| MigrateError::Preflight(format!("cannot list LVs: {e}")))?;
        crate::xen::disk::resolve_lvs(&mut d.disks, &lvs);
        let mut disks = Vec::new();
        for disk in &d.disks {
            let vdev = disk.vdev.clone().unwrap_or_else(|| disk.devid.to_string());
            let Some(r) = &disk.lv else {
                return Err(MigrateError::Preflight(format!(
                    "disk {vdev} of {} ({}) is not an LVM logical volume; xenmig migrates LV-backed disks",
                    d.label(),
                    disk.params
                )));
            };
            let lv = lvs.iter().find(|l| l.vg == r.vg && l.name == r.lv).expect("resolved from this list");
            disks.push(DiskInfo { vdev, vg: r.vg.clone(), lv: r.lv.clone(), size_bytes: lv.size_bytes });
        }
        let name_now = d.name.clone().unwrap_or_else(|| name.to_string());
        let _ = (ShutdownReason::Suspend, State::Paused);
        Ok(DomainInfo {
            id: d.id,
            uuid: self.xen.uuid(d.id).unwrap_or_default(),
            paused: d.state == State::Paused,
            memory_kib: d.max_memory_kib.unwrap_or(d.memory_kib),
            name: name_now,
            disks,
        })
    }

    fn state(&self, id: u32) -> Result<Option<DomState>, MigrateError> {
        use crate::xen::domain::{Flags, ShutdownReason, State};
        // The hypervisor's flags alone (no xenstore reads): this is polled
        // many times a second while xl migrates.
        let Some(raw) = self.xen.raw_domains()?.into_iter().find(|r| r.domid == id) else {
            return Ok(None);
        };
        let f = Flags(raw.flags);
        Ok(Some(match (f.state(), f.shutdown_reason()) {
            (State::Shutdown, Some(ShutdownReason::Suspend)) => DomState::Suspended,
            (State::Paused, _) => DomState::Paused,
            (State::Running | State::Blocked | State::Idle, _) => DomState::Running,
            _ => DomState::Other,
        }))
    }

    fn resume(&self, id: u32) -> Result<(), MigrateError> {
        Ok(self.xen.resume(id)?)
    }

    fn tag_lv(&self, path: &str, tag: &str) -> Result<(), MigrateError> {
        let r = crate::storage::lvm::LvRef::from_device_path(path)
            .ok_or_else(|| MigrateError::Commit(format!("{path} is not an LV path")))?;
        crate::storage::lvm::Lvm::new().add_tag(&r, tag).map_err(|e| MigrateError::Commit(e.to_string()))
    }

    fn xl(&self) -> PathBuf {
        crate::xen::xl::program()
    }

    fn remove_lv(&self, path: &str) -> Result<(), MigrateError> {
        let r = crate::storage::lvm::LvRef::from_device_path(path)
            .ok_or_else(|| MigrateError::Commit(format!("{path} is not an LV path")))?;
        crate::storage::lvm::Lvm::new().remove(&r).map_err(|e| MigrateError::Commit(e.to_string()))
    }

    fn remove_tracking_snapshots(&self, path: &str, pid: u32) -> Result<Vec<String>, MigrateError> {
        let Some(origin) = crate::storage::lvm::LvRef::from_device_path(path) else { return Ok(Vec::new()) };
        let lvm = crate::storage::lvm::Lvm::new();
        let prefix = crate::copy::tracker::snapshot_prefix(pid);
        let err = |e: crate::storage::lvm::LvmError| MigrateError::Commit(e.to_string());
        let mut removed = Vec::new();
        for lv in lvm.lvs(Some(&origin.vg)).map_err(err)? {
            if lv.is_snapshot() && lv.origin.as_deref() == Some(origin.lv.as_str()) && lv.name.starts_with(&prefix) {
                lvm.remove(&lv.lv_ref()).map_err(err)?;
                removed.push(lv.lv_ref().to_string());
            }
        }
        Ok(removed)
    }
}

/// A phase clock for the report.
pub(crate) struct Clock {
    started: Instant,
    phase_started: Instant,
    phase: &'static str,
}

impl Clock {
    fn new() -> Clock {
        let now = Instant::now();
        Clock { started: now, phase_started: now, phase: "preflight" }
    }

    pub(crate) fn next(&mut self, report: &mut MigrateReport, phase: &'static str, progress: &Progress) {
        report.phases.push(PhaseTime { phase: self.phase.into(), seconds: self.phase_started.elapsed().as_secs_f64() });
        self.phase = phase;
        self.phase_started = Instant::now();
        progress.message(format!("migrate: {phase}"));
        log::info!("migrate: {phase}");
    }

    fn close(&mut self, report: &mut MigrateReport) {
        report.phases.push(PhaseTime { phase: self.phase.into(), seconds: self.phase_started.elapsed().as_secs_f64() });
        report.seconds = self.started.elapsed().as_secs_f64();
    }
}

/// One disk being copied: its session and the link's far end.
pub(crate) struct DiskCopy {
    disk: DiskInfo,
    target_path: String,
    session: SourceSession,
    peer: Peer,
}

/// What the phases from the memory copy on share: the host, the options,
/// the domain, its open disk copies (handed over), and what they record.
pub(crate) struct Commit<'a> {
    host: &'a dyn SourceHost,
    opts: &'a MigrateOptions,
    dom: &'a DomainInfo,
    copies: Vec<DiskCopy>,
    report: &'a mut MigrateReport,
    clock: &'a mut Clock,
    journal: &'a mut Journal,
    progress: &'a Progress,
}

/// Events of the memory phase.
enum Ev {
    Relay(String),
    RelayConnected(UnixStream),
    XlExit(Option<i32>),
}

/// Run a migration. The report is filled in also on failure.
pub fn migrate(
    host: &dyn SourceHost,
    opts: &MigrateOptions,
    progress: &Progress,
) -> (MigrateReport, Result<(), MigrateError>) {
    let mut report = MigrateReport {
        domain: opts.domain.clone(),
        host: opts.host.clone(),
        mode: if opts.stop_copy { "stop-copy" } else { "live" }.into(),
        dry_run: opts.dry_run,
        bwlimit: opts.source.bwlimit.limit(),
        ..MigrateReport::default()
    };
    let mut clock = Clock::new();
    let r = run(host, opts, progress, &mut report, &mut clock);
    clock.close(&mut report);
    if let Err(e) = &r {
        report.error = Some(e.to_string());
    }
    (report, r)
}

fn run(
    host: &dyn SourceHost,
    opts: &MigrateOptions,
    progress: &Progress,
    report: &mut MigrateReport,
    clock: &mut Clock,
) -> Result<(), MigrateError> {
    // ---- P0 preflight ----
    if let Some(j) = Journal::load(&opts.journal_dir, &opts.domain)? {
        // An earlier migration of this domain was interrupted: settle it by
        // the same rules as `--recover` before anything else.
        log::warn!(
            "an earlier migration of {} to {} stopped in phase {:?}; recovering it first",
            j.domain,
            j.host,
            j.phase
        );
        let lines = recover(host, &opts.journal_dir, &opts.domain)?;
        let attention: Vec<String> = lines.iter().filter(|l| l.starts_with("NEEDS ATTENTION")).cloned().collect();
        report.rolled_back.extend(
            lines.iter().filter(|l| !l.starts_with("NEEDS ATTENTION")).map(|l| format!("earlier migration: {l}")),
        );
        if !attention.is_empty() {
            report.needs_attention.extend(attention);
            return Err(MigrateError::Preflight(format!(
                "an earlier migration of {} to {} stopped in phase {:?} and needs a decision (see above); \
                 then run `xenmig migrate --recover {}`",
                j.domain, j.host, j.phase, j.domain
            )));
        }
    }
    let dom = host.domain(&opts.domain)?;
    if dom.paused {
        return Err(MigrateError::Preflight(format!(
            "{} is paused: a paused PV guest cannot answer the suspend request (and libxc refuses its page tables); \
             unpause it first",
            dom.name
        )));
    }
    if dom.disks.is_empty() {
        return Err(MigrateError::Preflight(format!("{} has no disk; use xl migrate", dom.name)));
    }
    if dom.uuid.is_empty() {
        return Err(MigrateError::Preflight(format!("cannot read the UUID of {} from xenstore", dom.name)));
    }
    let target = opts.target();
    let mut requests = Vec::new();
    for d in &dom.disks {
        let vg = opts.target_vg.clone().unwrap_or_else(|| d.vg.clone());
        // Live, the relay rewrites the disk paths in the config at the head
        // of xl's stream; --stop-copy restores from a save file, which
        // needs -C.
        if vg != d.vg && opts.config.is_none() && opts.stop_copy {
            return Err(MigrateError::Preflight(format!(
                "disk {} moves from /dev/{}/{} to /dev/{vg}/{}: with --stop-copy give -C with a config that \
                 names the target paths",
                d.vdev, d.vg, d.lv, d.lv
            )));
        }
        requests.push(LvRequest { vg, lv: d.lv.clone(), size_bytes: d.size_bytes });
    }
    let mut vgs: Vec<String> = requests.iter().map(|r| r.vg.clone()).collect();
    vgs.sort();
    vgs.dedup();
    let mut probes: Vec<Probe> = Vec::new();
    for vg in &vgs {
        let p: Probe = target.call("probe", &["--vg".into(), vg.clone()])?;
        if p.protocol != crate::wire::protocol::VERSION {
            return Err(MigrateError::Preflight(format!(
                "the target's xenmig {} speaks protocol {}, this one {} ({}): install the same xenmig on both hosts",
                p.version,
                p.protocol,
                crate::wire::protocol::VERSION,
                env!("CARGO_PKG_VERSION")
            )));
        }
        probes.push(p);
    }
    let first = &probes[0];
    for taken in [dom.name.clone(), format!("{}--incoming", dom.name)] {
        if first.domains.contains(&taken) {
            return Err(MigrateError::Preflight(format!("a domain named {taken} already exists on {}", opts.host)));
        }
    }
    if opts.config.is_none() {
        if let Some(free) = first.free_memory_mib {
            let need = dom.memory_kib.div_ceil(1024);
            if free < need {
                return Err(MigrateError::Preflight(format!(
                    "{} has {free} MiB of free memory, {} needs {need} MiB",
                    opts.host, dom.name
                )));
            }
        }
    }
    let tag = remote::uuid_tag(&dom.uuid);
    let mut need_by_vg: std::collections::BTreeMap<String, u64> = Default::default();
    for r in &requests {
        let probe = probes.iter().find(|p| p.vg.as_ref().is_some_and(|v| v.name == r.vg));
        let Some(vg) = probe.and_then(|p| p.vg.clone()) else {
            return Err(MigrateError::Preflight(format!("{} has no volume group {}", opts.host, r.vg)));
        };
        let existing = probe.unwrap().lvs.iter().find(|l| l.name == r.lv);
        let line = match existing {
            Some(l) if l.open => {
                return Err(MigrateError::Preflight(format!(
                    "{}:/dev/{}/{} exists and is open there",
                    opts.host, r.vg, r.lv
                )))
            }
            Some(l) if !l.tags.contains(&tag) && !opts.force => {
                return Err(MigrateError::Preflight(format!(
                    "{}:/dev/{}/{} exists and is not marked for {} (tags: {}); remove it or pass --force",
                    opts.host,
                    r.vg,
                    r.lv,
                    dom.name,
                    if l.tags.is_empty() { "none".into() } else { l.tags.join(",") }
                )))
            }
            Some(l) if l.size_bytes < r.size_bytes => {
                return Err(MigrateError::Preflight(format!(
                    "{}:/dev/{}/{} has {} bytes, the source disk {}",
                    opts.host, r.vg, r.lv, l.size_bytes, r.size_bytes
                )))
            }
            Some(l) => format!(
                "{} /dev/{}/{} -> {}:{}: reuse ({} bytes, {}); only what changed moves",
                dom.disks.iter().find(|d| d.lv == r.lv).map(|d| d.vdev.as_str()).unwrap_or("?"),
                dom.disks.iter().find(|d| d.lv == r.lv).map(|d| d.vg.as_str()).unwrap_or("?"),
                r.lv,
                opts.host,
                r.path(),
                l.size_bytes,
                if l.tags.contains(&tag) { "tagged for this domain" } else { "--force" }
            ),
            None => {
                *need_by_vg.entry(r.vg.clone()).or_default() += r.size_bytes;
                format!("create {}:{} ({} bytes)", opts.host, r.path(), r.size_bytes)
            }
        };
        let _ = vg;
        report.plan.push(line);
    }
    for (vg, need) in &need_by_vg {
        let free =
            probes.iter().filter_map(|p| p.vg.as_ref()).find(|v| &v.name == vg).map(|v| v.free_bytes).unwrap_or(0);
        if *need > free {
            return Err(MigrateError::Preflight(format!(
                "volume group {vg} on {} has {free} bytes free, the new LVs need {need}",
                opts.host
            )));
        }
        report.plan.push(format!("volume group {vg} on {}: {free} bytes free, {need} needed", opts.host));
    }
    report.disks = dom
        .disks
        .iter()
        .zip(&requests)
        .map(|(d, r)| DiskReport {
            vdev: d.vdev.clone(),
            source: d.path(),
            target: r.path(),
            created: false,
            size_bytes: d.size_bytes,
            copy: None,
        })
        .collect();
    // `-r auto`: every LV of the target's VGs that nothing holds open and
    // that is not one being written (templates, other guests' disks, old
    // releases) serves as a reference there; blocks taken from it are
    // verified like any other.
    let mut references = Vec::new();
    for r in &opts.references {
        if r.as_os_str() == "auto" {
            for p in &probes {
                let Some(vg) = &p.vg else { continue };
                for l in p.lvs.iter().filter(|l| !l.open && !requests.iter().any(|q| q.vg == vg.name && q.lv == l.name))
                {
                    references.push(format!("/dev/{}/{}", vg.name, l.name));
                }
            }
        } else {
            references.push(r.display().to_string());
        }
    }
    if !references.is_empty() {
        report.plan.push(format!("references on {}: {}", opts.host, references.join(" ")));
    }
    if opts.dry_run {
        return Ok(());
    }

    // ---- P1 prepare ----
    let mut journal = Journal {
        format: format!("{}.{}", journal::FORMAT_MAJOR, journal::FORMAT_MINOR),
        domain: dom.name.clone(),
        domid: dom.id,
        uuid: dom.uuid.clone(),
        host: opts.host.clone(),
        ssh: opts.ssh.clone(),
        remote_xenmig: opts.remote_xenmig.clone(),
        paused_on_target: opts.paused,
        phase: Phase::Preflight,
        disks: dom.disks.iter().zip(&requests).map(|(d, r)| (d.path(), r.path())).collect(),
        pid: std::process::id(),
        started_unix: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
    };
    journal.save(&opts.journal_dir)?;
    clock.next(report, "prepare", progress);
    let mut args = vec!["--uuid".to_string(), dom.uuid.clone()];
    for r in &requests {
        args.extend(["--lv".into(), r.to_arg()]);
    }
    if opts.force {
        args.push("--force".into());
    }
    let prepared: Vec<Prepared> = match target.call("prepare", &args) {
        Ok(p) => p,
        Err(e) => {
            Journal::remove(&opts.journal_dir, &dom.name);
            return Err(e);
        }
    };
    for (d, p) in report.disks.iter_mut().zip(&prepared) {
        d.created = p.created;
    }
    journal.set_phase(Phase::Prepared, &opts.journal_dir)?;

    // ---- P2 disk pre-copy ----
    clock.next(report, "disk pre-copy", progress);
    journal.set_phase(Phase::PreCopy, &opts.journal_dir)?;
    let mut copies: Vec<DiskCopy> = Vec::new();
    let precopy = precopy(opts, &dom, &requests, &references, &mut copies, report, progress);
    if let Err(e) = precopy {
        abort_copies(copies, &e);
        Journal::remove(&opts.journal_dir, &dom.name);
        return Err(e);
    }

    // ---- P3 memory ----
    let result = if opts.stop_copy {
        clock.next(report, "save (xl save -p)", progress);
        journal.set_phase(Phase::Memory, &opts.journal_dir)?;
        stop_copy::save_and_commit(Commit {
            host,
            opts,
            dom: &dom,
            copies,
            report,
            clock,
            journal: &mut journal,
            progress,
        })
    } else {
        clock.next(report, "memory (xl migrate)", progress);
        journal.set_phase(Phase::Memory, &opts.journal_dir)?;
        memory_and_commit(Commit { host, opts, dom: &dom, copies, report, clock, journal: &mut journal, progress })
    };
    match &result {
        Ok(()) => {
            for d in &dom.disks {
                if opts.delete_source {
                    match host.remove_lv(&d.path()) {
                        Ok(()) => report.plan.push(format!("removed the source LV {}", d.path())),
                        Err(e) => report.needs_attention.push(format!(
                            "the source LV {} was not removed ({e}): `lvremove {}` once you have checked {} runs {}",
                            d.path(),
                            d.path(),
                            opts.host,
                            dom.name
                        )),
                    }
                } else if let Err(e) = host.tag_lv(&d.path(), &tag) {
                    log::warn!("cannot tag the source LV {}: {e}", d.path());
                }
            }
            Journal::remove(&opts.journal_dir, &dom.name);
            report.migrated = true;
        }
        Err(_) if report.needs_attention.is_empty() => Journal::remove(&opts.journal_dir, &dom.name),
        Err(_) => {}
    }
    result
}

/// Start one copy per disk and run live passes until the changes of all
/// disks together converge.
fn precopy(
    opts: &MigrateOptions,
    dom: &DomainInfo,
    requests: &[LvRequest],
    references: &[String],
    copies: &mut Vec<DiskCopy>,
    report: &mut MigrateReport,
    progress: &Progress,
) -> Result<(), MigrateError> {
    let live = opts.source.live.clone().unwrap_or_default();
    // The target's references may be at the same paths on this host.
    let source_opts = crate::copy::source::SourceOptions {
        same_path_references: references.iter().map(std::path::PathBuf::from).collect(),
        ..opts.source.clone()
    };
    for (d, r) in dom.disks.iter().zip(requests) {
        let mut args = vec![opts.remote_xenmig.clone(), "serve".into(), "--target".into(), r.path()];
        // The final delta lands while our own paused incoming domain holds the LV.
        args.extend(["--allow-open-by".into(), format!("{}--incoming", dom.name)]);
        // Every pass is read back from the target's device: a write that
        // lands changed fails its pass, and in the last delta withholds
        // READY. The pre-copy passes pay for it while the guest runs; the
        // suspended window reads back only the last delta.
        args.push("--readback".into());
        args.extend(crate::copy::run::idle_arg(opts.source.idle_timeout));
        for reference in references {
            args.extend(["--reference".into(), reference.clone()]);
        }
        let err = |source: EngineError| MigrateError::PreCopy { disk: d.path(), source };
        let (link, peer) = Link::spawn(&opts.ssh, &opts.host, &args).map_err(|e| err(e.into()))?;
        progress.message(format!("{}: pass 1", d.vdev));
        let session = match SourceSession::start(Path::new(&d.path()), &source_opts, link, progress.clone()) {
            Ok(s) => s,
            // The far end's own words when it failed first (a busy LV, say).
            Err(e) => return Err(err(crate::copy::run::remote_cause(e, peer))),
        };
        copies.push(DiskCopy { disk: d.clone(), target_path: r.path(), session, peer });
    }
    if let Some(hold) = opts.hold_precopy {
        // Fault tests: a window in which to cut the link or kill xenmig
        // while the disk pre-copy is under way (pass 1 in flight).
        log::warn!("holding the disk pre-copy for {hold:?} (XENMIG_TEST_HOLD_PRECOPY)");
        std::thread::sleep(hold);
    }
    let total: u64 = copies.iter().map(|c| c.session.block_count()).sum();
    let mut policy = Convergence::new(live.max_passes, live.converge_blocks, total);
    loop {
        let mut changed = 0;
        let mut pass = 0;
        for c in copies.iter_mut() {
            let s = c.session.scan().map_err(|source| MigrateError::PreCopy { disk: c.disk.path(), source })?;
            changed += s.changed_blocks;
            pass = s.pass_done;
        }
        report.disk_passes = pass;
        progress.message(format!("disk pass {pass} done; {changed} blocks changed since"));
        log::info!("disk pass {pass}: {changed} blocks changed on all disks");
        if policy.next_is_final(pass, changed) {
            // A disk link that died meanwhile is found now, while the guest
            // still runs, not after xl has suspended it.
            for c in copies.iter() {
                c.session.check_link().map_err(|source| MigrateError::PreCopy { disk: c.disk.path(), source })?;
            }
            return Ok(());
        }
        for c in copies.iter_mut() {
            c.session.send_pass().map_err(|source| MigrateError::PreCopy { disk: c.disk.path(), source })?;
        }
    }
}

pub(crate) fn abort_copies(copies: Vec<DiskCopy>, why: &MigrateError) {
    let e = EngineError::Aborted(why.to_string());
    for c in copies {
        c.session.abort(&e);
        c.peer.abort();
    }
}

/// The relay's command line, as xl's `-s` (xl appends `HOST xl migrate-receive ...`),
/// with `ssh` the transport the relay starts. Without `-C`, disks whose
/// target path differs are renamed by the relay in the config xl sends.
fn relay_command(opts: &MigrateOptions, ssh: &str, socket: &Path, renames: &[(String, String)]) -> String {
    let mut words = vec![
        opts.self_exe.display().to_string(),
        "migrate-relay".into(),
        "--control".into(),
        socket.display().to_string(),
        "--ssh".into(),
        ssh.to_string(),
    ];
    if opts.config.is_none() {
        for (old, new) in renames {
            words.extend(["--rewrite-disk".into(), format!("{old}={new}")]);
        }
    }
    words.push("--".into());
    shell_words::join(words)
}

/// How the wait for the target's READY ended.
enum Waited {
    Ready,
    XlExit(Option<i32>),
    Timeout,
}

/// Tells the disk passes of the memory phase what happened meanwhile.
#[derive(Default)]
struct PassControl {
    /// READY came or xl ended: start no more passes.
    stop: AtomicBool,
    /// The source is suspended: stop (the change trackers watch it too: a
    /// scan stops waiting for a snapshot being taken).
    suspended: Arc<AtomicBool>,
    /// When the source was seen suspended (set before `suspended`).
    suspended_at: OnceLock<Instant>,
    /// Start the last delta as soon as the source is suspended, while xl
    /// still sends its last memory round and the target restores.
    early_delta: bool,
}

/// What the disk thread of the memory phase did.
#[derive(Default)]
struct DuringMemory {
    passes: u32,
    failed: Option<MigrateError>,
    /// The last delta, when the thread started it (the source was seen
    /// suspended before READY came).
    delta: Option<Result<FinalDelta, MigrateError>>,
}

/// The pause between disk passes of the memory phase: xl copies memory on
/// the same dom0 CPUs and link. Short, because what the guest writes
/// between two scans is what the last delta carries: a pause as long as the
/// pass before it (until 2026-11-29) let 40 s of writes (1896 blocks, 9.5 s
/// of last delta beside the target's domain build) pile up in the lab.
const MEMORY_PHASE_PASS_GAP: Duration = Duration::from_secs(1);

/// Disk passes while xl copies memory, each leaving less for the frozen
/// window. Runs until told to stop or the source is suspended; returns the
/// passes sent and why it stopped early, if it did. The last delta (the
/// final pass) then waits for the pass in flight and sends what is left.
///
/// What a scan found is sent at once, and the pause that leaves xl the
/// CPUs comes before the next scan: found blocks that wait for the pause
/// are what the suspended window would have to carry (in the lab, 1880
/// blocks found 4 s before the suspension made the last delta 10 s long).
fn passes_during_memory(
    copies: &mut [DiskCopy],
    ctl: &PassControl,
    progress: &Progress,
) -> (u32, Option<MigrateError>) {
    let halted = || ctl.stop.load(Ordering::SeqCst) || ctl.suspended.load(Ordering::SeqCst);
    for c in copies.iter_mut() {
        c.session.watch_freeze(ctl.suspended.clone());
    }
    let mut sent = 0;
    loop {
        if ctl.stop.load(Ordering::SeqCst) {
            return (sent, None);
        }
        for c in copies.iter_mut() {
            if let Err(source) = c.session.send_pass() {
                return (sent, Some(MigrateError::PreCopy { disk: c.disk.path(), source }));
            }
        }
        sent += 1;
        for c in copies.iter_mut() {
            if let Err(source) = c.session.wait_pass() {
                return (sent, Some(MigrateError::PreCopy { disk: c.disk.path(), source }));
            }
        }
        let until = Instant::now() + MEMORY_PHASE_PASS_GAP;
        while Instant::now() < until && !halted() {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Suspended (or READY came): the final pass finds the rest, with no
        // new tracking snapshot (seconds under emulation).
        if halted() {
            return (sent, None);
        }
        let mut changed = 0;
        for c in copies.iter_mut() {
            match c.session.scan() {
                Ok(s) => changed += s.changed_blocks,
                Err(source) => return (sent, Some(MigrateError::PreCopy { disk: c.disk.path(), source })),
            }
        }
        // Suspended during the scan: what it found goes with the last delta.
        if halted() {
            return (sent, None);
        }
        progress.message(format!("memory copy; disk pass {sent} of it done, {changed} blocks changed since"));
        log::info!("disk pass during the memory copy: {changed} blocks changed on all disks since");
    }
}

/// The disk thread of the memory phase: passes while xl copies memory;
/// then, if the source was seen suspended before READY came, the last
/// delta at once. The guest cannot write any more, so the delta is final;
/// it runs while xl sends its last memory round and the target's xl builds
/// the domain (seconds), instead of after READY. READY is passed on only
/// once this thread is done and its delta verified. Requests the guest had
/// in flight when it was suspended are replayed by its block frontend on
/// the target after the unpause, so a write that lands on the source LV
/// after this delta read its block is not lost.
fn disks_during_memory(copies: &mut Vec<DiskCopy>, ctl: &PassControl, progress: &Progress) -> DuringMemory {
    let (passes, failed) = passes_during_memory(&mut copies[..], ctl, progress);
    let delta = match (&failed, ctl.suspended_at.get()) {
        (None, Some(&since)) if ctl.early_delta && !ctl.stop.load(Ordering::SeqCst) => {
            progress.message("source suspended: the last disk delta, while xl sends its last memory round".into());
            Some(final_delta(copies, since))
        }
        _ => None,
    };
    DuringMemory { passes, failed, delta }
}

/// P3 to P5: xl migrate through the relay, the last delta as soon as the
/// source is suspended, READY held until it is verified, then release or
/// roll back.
fn memory_and_commit(p: Commit) -> Result<(), MigrateError> {
    let Commit { host, opts, dom, mut copies, report, clock, journal, progress } = p;
    let copies = &mut copies;
    let target = opts.target();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&opts.run_dir)
        .map_err(|e| MigrateError::Memory(format!("cannot create {}: {e}", opts.run_dir.display())))?;
    let socket = opts.run_dir.join(format!("relay-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)
        .map_err(|e| MigrateError::Memory(format!("cannot listen on {}: {e}", socket.display())))?;
    let _socket_guard = RemoveOnDrop(socket.clone());

    let (tx, rx) = unbounded::<Ev>();
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            if let Ok((stream, _)) = listener.accept() {
                let _ = tx.send(Ev::RelayConnected(stream.try_clone().expect("clone unix stream")));
                for line in BufReader::new(stream).lines() {
                    match line {
                        Ok(l) => {
                            let _ = tx.send(Ev::Relay(l));
                        }
                        Err(_) => break,
                    }
                }
            }
        });
    }
    let mut xl = Command::new(host.xl());
    xl.arg("migrate");
    if let Some(c) = &opts.config {
        xl.arg("-C").arg(c);
    }
    if opts.paused {
        xl.arg("-p");
    }
    if opts.no_monitor {
        xl.arg("-e");
    }
    if opts.debug {
        xl.arg("--debug");
    }
    let renames: Vec<(String, String)> = copies
        .iter()
        .filter(|c| c.disk.path() != c.target_path)
        .map(|c| (c.disk.path(), c.target_path.clone()))
        .collect();
    // xl's memory stream goes through ssh as the disks' links do: the
    // same cipher choice (a link's is made in `Link::spawn`).
    let ssh = crate::wire::ssh_cipher::prefer_aes_gcm(&opts.ssh, &opts.host);
    xl.arg("-s").arg(relay_command(opts, &ssh, &socket, &renames)).arg(&dom.name).arg(&opts.host);
    // xl's chatter goes to our stderr: stdout may carry the JSON report.
    let stderr_fd = std::io::stderr().lock();
    let out = std::os::fd::AsFd::as_fd(&stderr_fd).try_clone_to_owned().map(Stdio::from).unwrap_or(Stdio::null());
    drop(stderr_fd);
    // xl (and the relay and ssh it starts) in a process group of its own: a
    // Ctrl-C at the terminal must not kill xl in the middle of its stream,
    // where it could leave the guest suspended. xenmig's own end (or death)
    // is what decides, through the relay: no RELEASE, no READY, xl resumes.
    std::os::unix::process::CommandExt::process_group(&mut xl, 0);
    let mut child = xl
        .stdin(Stdio::null())
        .stdout(out)
        .spawn()
        .map_err(|e| MigrateError::Memory(format!("cannot run {}: {e}", host.xl().display())))?;
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let code = child.wait().ok().and_then(|s| s.code());
            let _ = tx.send(Ev::XlExit(code));
        });
    }
    drop(tx);

    // Wait for READY, polling the source for the moment it suspends. The
    // disk passes go on meanwhile (xl's memory copy takes long, and what
    // the guest writes during it would otherwise all wait for the frozen
    // window); once the source is suspended, the last delta starts.
    let deadline = Instant::now() + opts.memory_timeout;
    let mut relay: Option<UnixStream> = None;
    let is_suspended = || matches!(host.state(dom.id), Ok(Some(DomState::Suspended) | None));
    // The fault tests' READY hold needs the delta after READY.
    let ctl = PassControl { early_delta: opts.hold_ready.is_none(), ..PassControl::default() };
    let overlap = opts.passes_during_memory;
    let mut relay_error: Option<String> = None;
    let mut ready_at: Option<Instant> = None;
    let mut delta_phase = false;
    let mut stream_end: Option<Instant> = None;
    let (waited, during) = std::thread::scope(|s| {
        let disks = overlap.then(|| {
            let (copies, ctl) = (&mut *copies, &ctl);
            s.spawn(move || disks_during_memory(copies, ctl, progress))
        });
        let waited = loop {
            if ctl.suspended_at.get().is_none() && is_suspended() {
                let _ = ctl.suspended_at.set(Instant::now());
                // The disk thread first: the journal's write below takes
                // 0.4-0.8 s under emulation, the window's time.
                ctl.suspended.store(true, Ordering::SeqCst);
                if overlap && ctl.early_delta {
                    delta_phase = true;
                    clock.next(report, "final disk delta (suspended)", progress);
                    // Memory and FinalDelta are undone alike (both before
                    // Released): a journal that could not say which is no
                    // reason to stop here, with the guest suspended.
                    if let Err(e) = journal.set_phase(Phase::FinalDelta, &opts.journal_dir) {
                        log::warn!("{e}");
                    }
                }
            }
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(Ev::RelayConnected(s)) => relay = Some(s),
                Ok(Ev::Relay(l)) if l == "READY" => {
                    ready_at = Some(Instant::now());
                    break Waited::Ready;
                }
                Ok(Ev::Relay(l)) => {
                    log::debug!("relay: {l}");
                    if let Some(ms) = l.strip_prefix("STREAM_IDLE ").and_then(|m| m.parse::<u64>().ok()) {
                        stream_end = Instant::now().checked_sub(Duration::from_millis(ms));
                    }
                    if let Some(e) = l.strip_prefix("ERROR ") {
                        relay_error = Some(e.to_string());
                    }
                }
                Ok(Ev::XlExit(code)) => break Waited::XlExit(code),
                Err(RecvTimeoutError::Timeout) if Instant::now() > deadline => break Waited::Timeout,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => unreachable!("the xl waiter holds a sender until xl exits"),
            }
        };
        ctl.stop.store(true, Ordering::SeqCst);
        if matches!(waited, Waited::Ready) && disks.as_ref().is_some_and(|d| !d.is_finished()) {
            progress.message("READY held until the last disk delta is verified".into());
        }
        let during = disks.map(|h| h.join().expect("disk passes thread panicked")).unwrap_or_default();
        (waited, during)
    });
    if ctl.suspended_at.get().is_none() && is_suspended() {
        let _ = ctl.suspended_at.set(Instant::now());
    }
    let suspended_at = ctl.suspended_at.get().copied();
    let DuringMemory { passes, failed: disk_failure, delta: early_delta } = during;
    report.disk_passes += passes;
    report.disk_passes_during_memory = passes;
    let mut window = SuspendedWindow::default();
    let since = |t: Instant| suspended_at.map(|s| t.saturating_duration_since(s).as_secs_f64());
    // The trackers of a delta that ran go when this function returns: the
    // guest runs again by then, here or there.
    let mut _tracking = Vec::new();
    let early_delta = early_delta.map(|d| {
        d.map(|d| {
            (window.last_delta_started, window.last_delta_done) = (since(d.started), since(d.done));
            report.final_delta_seconds = Some(d.seconds());
            _tracking = d.record(report);
        })
    });
    window.ready = ready_at.and_then(since);
    window.xl_stream_end = stream_end.and_then(since);
    let e = match waited {
        // xl resumes the source itself when READY never came.
        Waited::XlExit(code) => Some(MigrateError::Memory(match &relay_error {
            Some(r) => format!("xl migrate {}: {r}", exit_text(code)),
            None => format!("xl migrate {}", exit_text(code)),
        })),
        Waited::Timeout => {
            let e = MigrateError::Memory(format!("no READY from the target within {:?}", opts.memory_timeout));
            drop(relay.take());
            wait_xl(&rx, Duration::from_secs(120));
            Some(e)
        }
        Waited::Ready => None,
    };
    if let Some(e) = e {
        if let Some(d) = &disk_failure {
            log::error!("{d}");
        }
        if let Some(Err(d)) = &early_delta {
            log::error!("{d}");
        }
        report.suspended_window = suspended_at.map(|_| window);
        rollback_before_release(host, opts, dom, std::mem::take(copies), report, &e);
        return Err(e);
    }
    // ---- P4 final delta, unless it ran already: the source is suspended,
    // the target paused. Any failure up to RELEASE withholds READY ----
    let verified = match disk_failure.or(early_delta.and_then(Result::err)) {
        // READY came, but a disk copy broke meanwhile.
        Some(e) => Err(e),
        None if window.last_delta_done.is_some() => Ok(()),
        None => {
            if let Some(hold) = opts.hold_ready {
                // Fault tests: a window in which to kill or cut something
                // while the target's READY is held.
                log::warn!("holding READY for {hold:?} (XENMIG_TEST_HOLD_READY)");
                std::thread::sleep(hold);
            }
            if !delta_phase {
                clock.next(report, "final disk delta (suspended)", progress);
            }
            journal.set_phase(Phase::FinalDelta, &opts.journal_dir).and_then(|()| {
                let d = final_delta(copies, suspended_at.unwrap_or_else(Instant::now))?;
                (window.last_delta_started, window.last_delta_done) = (since(d.started), since(d.done));
                report.final_delta_seconds = Some(d.seconds());
                _tracking = d.record(report);
                Ok(())
            })
        }
    }
    // Released is journalled before RELEASE goes: a `--recover` must know
    // that the target may run.
    .and_then(|()| journal.set_phase(Phase::Released, &opts.journal_dir));
    if let Err(e) = verified {
        // ABORT: the relay closes without passing READY on, and xl, with
        // no READY, resumes the source; the rollback does what xl did not.
        if let Some(relay) = relay.as_mut() {
            let _ = relay.write_all(b"ABORT\n");
        }
        drop(relay);
        wait_xl(&rx, Duration::from_secs(180));
        report.suspended_window = suspended_at.map(|_| window);
        rollback_before_release(host, opts, dom, std::mem::take(copies), report, &e);
        return Err(e);
    }
    let mut relay = relay.expect("READY comes over the relay's connection");

    // ---- P5 release: the point of no return is xl's GO ----
    clock.next(report, "commit", progress);
    let released = relay.write_all(b"RELEASE\n").and_then(|_| relay.flush());
    let released_at = Instant::now();
    window.released = since(released_at);
    report.ready_to_release_seconds = ready_at.map(|r| released_at.duration_since(r).as_secs_f64());
    if let Err(e) = released {
        // The relay is gone: xl never got READY and resumes the source.
        let e = MigrateError::Memory(format!("the relay went away before READY was passed on: {e}"));
        wait_xl(&rx, Duration::from_secs(180));
        report.suspended_window = suspended_at.map(|_| window);
        rollback_before_release(host, opts, dom, Vec::new(), report, &e);
        return Err(e);
    }
    let mut result: Option<u8> = None;
    let mut unpaused_at: Option<Instant> = None;
    let code = loop {
        match rx.recv_timeout(Duration::from_secs(600)) {
            Ok(Ev::Relay(l)) if l == "GO" => window.go = since(Instant::now()),
            Ok(Ev::Relay(l)) => {
                if let Some(s) = l.strip_prefix("RESULT ") {
                    result = s.trim().parse().ok();
                    unpaused_at = Some(Instant::now());
                }
            }
            Ok(Ev::RelayConnected(_)) => {}
            Ok(Ev::XlExit(code)) => break code,
            Err(_) => break None,
        }
    };
    window.unpaused = unpaused_at.and_then(since);
    if let (Some(s), Some(u)) = (suspended_at, unpaused_at) {
        report.downtime_seconds = Some(u.duration_since(s).as_secs_f64());
    }
    report.suspended_window = suspended_at.map(|_| window);
    if code == Some(0) {
        return Ok(());
    }
    // xl failed after READY went on. Decide from where the domain runs.
    let why = format!(
        "xl migrate {} after the target was released (the target reported {})",
        exit_text(code),
        result.map(|r| format!("status {r}")).unwrap_or_else(|| "nothing".into())
    );
    settle_after_release(host, &target, dom, opts.paused, report, why)
}

/// Every disk's last delta, sent, verified and synced on the target.
pub(crate) struct FinalDelta {
    reports: Vec<(String, Report)>,
    bytes_wire: u64,
    tracking: Vec<Tracking>,
    started: Instant,
    done: Instant,
}

impl FinalDelta {
    fn seconds(&self) -> f64 {
        self.done.duration_since(self.started).as_secs_f64()
    }

    /// Into the report. The change trackers come back: the caller drops
    /// them (removing their snapshots, which is slow) once the guest runs
    /// again, here or there.
    pub(crate) fn record(self, report: &mut MigrateReport) -> Vec<Tracking> {
        for (disk, mut r) in self.reports {
            // The target's report knows nothing of the limit its source ran under.
            r.bwlimit = report.bwlimit;
            if let Some(d) = report.disks.iter_mut().find(|d| d.source == disk) {
                d.copy = Some(r);
            }
        }
        report.bytes_wire += self.bytes_wire;
        self.tracking
    }
}

/// Send every disk's last delta and check it; finish the links. `frozen`
/// is when the guest stopped writing (the target's report counts its
/// downtime from there).
pub(crate) fn final_delta(copies: &mut Vec<DiskCopy>, frozen: Instant) -> Result<FinalDelta, MigrateError> {
    let started = Instant::now();
    let mut delta = FinalDelta { reports: Vec::new(), bytes_wire: 0, tracking: Vec::new(), started, done: started };
    for i in 0..copies.len() {
        let r = match copies[i].session.final_pass() {
            Ok(r) => r,
            Err(e) => {
                // A disk end that failed (its read-back found a changed
                // write, say) sends its error and exits; this end may see
                // only the broken link. Its own words are the cause to
                // report; that copy is stopped here, the others by the
                // caller's rollback.
                let c = copies.remove(i);
                let disk = c.disk.path();
                c.session.abort(&e);
                return Err(MigrateError::FinalDelta { disk, source: crate::copy::run::remote_cause(e, c.peer) });
            }
        };
        delta.reports.push((copies[i].disk.path(), r));
    }
    for c in std::mem::take(copies) {
        let disk = c.disk.path();
        delta.bytes_wire += c.session.bytes_wire();
        delta.tracking.push(
            c.session
                .finish(frozen.elapsed())
                .map_err(|source| MigrateError::FinalDelta { disk: disk.clone(), source })?,
        );
        // The target end exits only after its final sync.
        c.peer.close().map_err(|e| MigrateError::FinalDelta { disk: disk.clone(), source: e.into() })?;
        let _ = c.target_path;
    }
    delta.done = Instant::now();
    Ok(delta)
}

/// How xl ended, in words.
fn exit_text(code: Option<i32>) -> String {
    match code {
        Some(c) => format!("exited with status {c}"),
        None => "was killed by a signal".into(),
    }
}

fn wait_xl(rx: &Receiver<Ev>, limit: Duration) -> Option<Option<i32>> {
    let end = Instant::now() + limit;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(Ev::XlExit(c)) => return Some(c),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

/// Before READY went on: the target never unpaused. Make sure the source
/// runs (xl resumes it; if it did not, resume it here), and remove what the
/// target built.
fn rollback_before_release(
    host: &dyn SourceHost,
    opts: &MigrateOptions,
    dom: &DomainInfo,
    copies: Vec<DiskCopy>,
    report: &mut MigrateReport,
    why: &MigrateError,
) {
    abort_copies(copies, why);
    match host.state(dom.id) {
        Ok(Some(DomState::Suspended)) => match host.resume(dom.id) {
            Ok(()) => report.rolled_back.push(format!("resumed {} on this host (xl had not)", dom.name)),
            Err(e) => report.needs_attention.push(format!(
                "{} is suspended here and could not be resumed ({e}); run `xenmig migrate --recover {}`",
                dom.name, dom.name
            )),
        },
        Ok(Some(_)) => report.rolled_back.push(format!("{} runs on this host (resumed by xl)", dom.name)),
        Ok(None) => report
            .needs_attention
            .push(format!("{} is no longer on this host; check {} with `xl list`", dom.name, opts.host)),
        Err(e) => report.needs_attention.push(format!("cannot read the state of {}: {e}", dom.name)),
    }
    match opts.target().call::<serde_json::Value>("cleanup", &["--domain".into(), dom.name.clone()]) {
        Ok(v) if v.get("destroyed").and_then(|d| d.as_bool()) == Some(true) => {
            report.rolled_back.push(format!("destroyed {}--incoming on {}", dom.name, opts.host))
        }
        Ok(_) => {}
        Err(e) => report.needs_attention.push(format!(
            "could not check {} for a leftover {}--incoming ({e}); there: `xl destroy {}--incoming`",
            opts.host, dom.name, dom.name
        )),
    }
}

/// After READY went on and xl did not report success: the domain must run
/// on exactly one host. If the target runs it, the source copy goes; if
/// not, the target's copy goes and the source resumes.
fn settle_after_release(
    host: &dyn SourceHost,
    target: &TargetHost,
    dom: &DomainInfo,
    paused_on_target: bool,
    report: &mut MigrateReport,
    why: String,
) -> Result<(), MigrateError> {
    let ask = |report: &mut MigrateReport| -> Option<DomainState> {
        match target.call("state", &["--domain".into(), dom.name.clone()]) {
            Ok(s) => Some(s),
            Err(e) => {
                report.needs_attention.push(format!(
                    "cannot ask {} where {} runs ({e}); the source stays as it is: run `xenmig migrate --recover {}`",
                    target.host, dom.name, dom.name
                ));
                None
            }
        }
    };
    let runs = |s: &DomainState| s.name.as_deref().is_some_and(|s| paused_on_target || !s.contains('p'));
    let Some(mut there) = ask(report) else { return Err(MigrateError::Commit(why)) };
    if !runs(&there) && there.incoming.is_some() {
        match target.call::<serde_json::Value>("cleanup", &["--domain".into(), dom.name.clone()]) {
            Ok(v) if v.get("destroyed").and_then(|d| d.as_bool()) == Some(true) => {
                report.rolled_back.push(format!("destroyed {}--incoming on {}", dom.name, target.host))
            }
            Ok(_) => {}
            Err(e) => log::warn!("cleanup on {}: {e}", target.host),
        }
        // The target's xl may have renamed (and unpaused) it between the
        // question and the destroy: ask again before resuming anything.
        let Some(s) = ask(report) else { return Err(MigrateError::Commit(why)) };
        there = s;
    }
    let here = host.state(dom.id)?;
    if runs(&there) {
        if here.is_some() {
            let st = Command::new(host.xl()).args(["destroy", &dom.id.to_string()]).status();
            match st {
                Ok(s) if s.success() => report.rolled_back.push(format!("destroyed the source copy of {}", dom.name)),
                _ => report.needs_attention.push(format!(
                    "{} runs on {}; destroy the source copy here: `xl destroy {}`",
                    dom.name, target.host, dom.id
                )),
            }
        }
        report.migrated = true;
        return Ok(());
    }
    let left = match (&there.name, &there.incoming) {
        (Some(s), _) => Some((dom.name.clone(), s)),
        (None, Some(s)) => Some((format!("{}--incoming", dom.name), s)),
        (None, None) => None,
    };
    if let Some((name, s)) = left {
        // Renamed but not unpaused (without -p), or an incoming copy that
        // would not go: it holds the disks there; resuming here could make
        // two copies run. A person decides.
        report.needs_attention.push(format!(
            "{name} is paused on {} (state {s}) and this host's copy of {} stays suspended: either unpause it \
             there and `xl destroy {}` here, or `xl destroy {name}` there and run `xenmig migrate --recover {}`",
            target.host, dom.name, dom.id, dom.name
        ));
        return Err(MigrateError::Commit(why));
    }
    match here {
        Some(DomState::Suspended) => match host.resume(dom.id) {
            Ok(()) => report.rolled_back.push(format!("resumed {} on this host", dom.name)),
            Err(e) => report.needs_attention.push(format!("resume {} here failed: {e}", dom.name)),
        },
        Some(_) => report.rolled_back.push(format!("{} runs on this host", dom.name)),
        None => report.needs_attention.push(format!("{} runs nowhere: it is not on {} either", dom.name, target.host)),
    }
    Err(MigrateError::Commit(why))
}

/// `xenmig migrate --recover DOMAIN`: apply the rollback rules to a
/// migration whose xenmig was killed, from its journal.
pub fn recover(host: &dyn SourceHost, journal_dir: &Path, domain: &str) -> Result<Vec<String>, MigrateError> {
    let Some(j) = Journal::load(journal_dir, domain)? else {
        return Ok(vec![format!("no interrupted migration of {domain} is recorded")]);
    };
    if j.pid != std::process::id() && Path::new(&format!("/proc/{}", j.pid)).exists() {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", j.pid)).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("migrate") {
            return Err(MigrateError::Preflight(format!(
                "the migration of {domain} is still running (pid {}); wait for it or stop it first",
                j.pid
            )));
        }
    }
    let target = TargetHost { ssh: j.ssh.clone(), host: j.host.clone(), xenmig: j.remote_xenmig.clone() };
    let dom = DomainInfo {
        id: j.domid,
        name: j.domain.clone(),
        uuid: j.uuid.clone(),
        paused: false,
        memory_kib: 0,
        disks: Vec::new(),
    };
    let mut report = MigrateReport::default();
    if j.phase < Phase::Released {
        // The target was never told it may unpause.
        match host.state(j.domid)? {
            Some(DomState::Suspended) => {
                host.resume(j.domid)?;
                report.rolled_back.push(format!("resumed {domain} on this host"));
            }
            Some(_) => report.rolled_back.push(format!("{domain} runs on this host")),
            None => report.needs_attention.push(format!("{domain} (id {}) is gone from this host", j.domid)),
        }
        if j.phase >= Phase::Memory {
            match target.call::<serde_json::Value>("cleanup", &["--domain".into(), domain.into()]) {
                Ok(v) if v.get("destroyed").and_then(|d| d.as_bool()) == Some(true) => {
                    report.rolled_back.push(format!("destroyed {domain}--incoming on {}", j.host))
                }
                Ok(_) => {}
                Err(e) => report.needs_attention.push(format!("cannot clean up on {}: {e}", j.host)),
            }
        }
    } else {
        let _ = settle_after_release(host, &target, &dom, j.paused_on_target, &mut report, "recovered".into());
        if report.migrated && report.rolled_back.is_empty() && report.needs_attention.is_empty() {
            report.rolled_back.push(format!("{domain} runs on {}; nothing to undo", j.host));
        }
    }
    // Change tracking of the killed run may have left snapshots on the
    // source LVs: they slow the guest's writes and hold VG space.
    if j.pid != std::process::id() {
        for (source, _) in &j.disks {
            match host.remove_tracking_snapshots(source, j.pid) {
                Ok(names) => {
                    report.rolled_back.extend(names.into_iter().map(|n| format!("removed tracking snapshot {n}")))
                }
                Err(e) => report
                    .needs_attention
                    .push(format!("cannot remove the tracking snapshots of {source} (`lvs` shows them): {e}")),
            }
        }
    }
    if report.needs_attention.is_empty() {
        Journal::remove(journal_dir, domain);
    }
    let mut lines = report.rolled_back;
    lines.extend(report.needs_attention.into_iter().map(|l| format!("NEEDS ATTENTION: {l}")));
    Ok(lines)
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[allow(dead_code)]
fn _assert_send(_: Sender<Ev>) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_command_quotes_the_transport() {
        let mut o = MigrateOptions::new("g1", "h");
        o.self_exe = PathBuf::from("/usr/bin/xenmig");
        o.ssh = "ssh -o BatchMode=yes".into();
        let renames = vec![("/dev/vg0/g1".to_string(), "/dev/vg1/g1".to_string())];
        let c = relay_command(&o, &o.ssh, Path::new("/run/xenmig/relay-1.sock"), &renames);
        assert_eq!(
            shell_words::split(&c).unwrap(),
            vec![
                "/usr/bin/xenmig",
                "migrate-relay",
                "--control",
                "/run/xenmig/relay-1.sock",
                "--ssh",
                "ssh -o BatchMode=yes",
                "--rewrite-disk",
                "/dev/vg0/g1=/dev/vg1/g1",
                "--"
            ]
        );
        // With -C the operator's config names the paths: nothing is rewritten.
        o.config = Some(PathBuf::from("/etc/xen/g1.cfg"));
        let c = relay_command(&o, &o.ssh, Path::new("/s"), &renames);
        assert!(!c.contains("--rewrite-disk"), "{c}");
    }
}
