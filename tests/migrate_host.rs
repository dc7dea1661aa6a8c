//! `xenmig migrate` orchestration and rollback rules on one host, without
//! Xen or LVM: the fake world of `common/fakexen.rs` (a source host whose
//! domain state is a file, a fake `xl` speaking xl's migration protocol, fake
//! lvm2 commands over regular files in `/dev/xmt[st]-ID/`). The orchestrator,
//! the relay, the target's `migrate-target` and the disk copies
//! (`serve --target`) are the real code and the real binary.
//!
//! Each test asserts where the domain runs afterwards, what was rolled back,
//! `migrated`, the source disk byte for byte, the target's disk, leftovers
//! (`NAME--incoming`) and the journal. Kill tests run `migrate()` in a child
//! process of this test binary, SIGKILL it at a phase, then run
//! `recover()` on the journal it left.
//!
//! `scripts/migrate-matrix.sh` runs them and prints the case x outcome
//! matrix (docs/faults.md).

mod common;
#[path = "common/fakexen.rs"]
mod fakexen;
#[path = "common/script.rs"]
mod script;

use std::fs;
use std::process::{Child, Command};
use std::time::Duration;

use fakexen::*;
use xenmig::copy::Progress;
use xenmig::migrate::{self, MigrateError, MigrateReport};

const VG_BIG: u64 = 64 << 20;

/// One row of the matrix (case, outcome), written to `$XMT_MATRIX_DIR`
/// when set (scripts/migrate-matrix.sh collects them).
fn row(case: &str, outcome: String) {
    let dir = std::env::var_os("XMT_MATRIX_DIR").map(std::path::PathBuf::from);
    if let Some(d) = dir {
        fs::create_dir_all(&d).unwrap();
        let safe: String = case.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        fs::write(d.join(safe), format!("{case}\t{outcome}\n")).unwrap();
    }
}

fn run(w: &World) -> (MigrateReport, Result<(), MigrateError>) {
    migrate::migrate(&w.host(), &w.opts(), &Progress::hidden())
}

/// Where the domain is: "source", "target", "both", "none" (+ details).
fn where_runs(w: &World) -> String {
    let src = w.src_state();
    let tgt = w.tgt_domains();
    format!("source {src}; target [{}]", tgt.iter().map(|(n, s)| format!("{n} {s}")).collect::<Vec<_>>().join(", "))
}

fn src_unchanged(w: &World, want: &[u8]) {
    assert!(fs::read(w.src_disk()).unwrap() == want, "the source disk changed");
}

/// After any rollback: the source runs, the target holds no domain of that
/// name, the source disk is untouched and the journal is gone.
fn assert_rolled_back(w: &World, want_src: &[u8]) {
    assert_eq!(w.src_state(), "running", "{}", w.log());
    assert_eq!(w.tgt_domains(), vec![], "{}", w.log());
    src_unchanged(w, want_src);
    assert!(!w.journal_file().exists(), "journal left");
}

/// Refused before anything changed: no journal, no LV, no xl run.
fn assert_refused(w: &World, r: &MigrateReport, res: &Result<(), MigrateError>) -> String {
    let e = res.as_ref().unwrap_err();
    assert!(!r.migrated);
    assert!(r.rolled_back.is_empty(), "{:?}", r.rolled_back);
    assert!(w.tgt_lvs().is_empty(), "an LV was created: {:?}", w.tgt_lvs());
    assert!(!w.journal_file().exists());
    assert!(!w.log().contains("xl migrate"), "{}", w.log());
    src_unchanged(w, &w.src_before);
    e.to_string()
}

/// Failed before xl ran: not migrated, nothing rolled back or left to
/// decide, the guest never touched, and [`assert_rolled_back`]'s state.
fn assert_failed_before_xl(w: &World, r: &MigrateReport) {
    assert!(!r.migrated && r.rolled_back.is_empty() && r.needs_attention.is_empty(), "{r:?}");
    assert!(!w.log().contains("xl migrate") && !w.log().contains("suspended"), "the guest was touched: {}", w.log());
    assert_rolled_back(w, &w.src_before);
}

/// READY withheld: not migrated, xl resumed the source, the target's copy
/// destroyed, and [`assert_rolled_back`]'s state (the source disk as
/// `want_src`).
fn assert_ready_withheld(w: &World, r: &MigrateReport, want_src: &[u8]) {
    assert!(!r.migrated);
    assert_eq!(
        r.rolled_back,
        vec![format!("{DOMAIN} runs on this host (resumed by xl)"), format!("destroyed {DOMAIN}--incoming on {HOST}")],
        "{}",
        w.log()
    );
    assert!(w.logged("source: no READY; source resumed"), "READY reached xl: {}", w.log());
    assert_rolled_back(w, want_src);
}

/// A world whose domain has a second disk, xvdb on LV `g1-data` (1 MiB of
/// noise), and that disk's content.
fn with_data_disk() -> (World, Vec<u8>) {
    let w = World::new(VG_BIG);
    let data = w.add_disk("xvdb", "g1-data", 1 << 20, 8);
    (w, data)
}

/// The faults cleared, migrate again: it must succeed.
fn rerun(w: &World) -> MigrateReport {
    w.clear_faults();
    let (r, res) = run(w);
    res.unwrap_or_else(|e| panic!("{e}\n{}", w.log()));
    assert!(r.migrated, "{r:?}");
    r
}

// ---- success ----

#[test]
fn a_migration_moves_the_domain_and_its_disk() {
    let mut w = World::new(VG_BIG);
    let want = w.guest_writes_before_suspend(100, 3);
    let (r, res) = run(&w);
    res.unwrap_or_else(|e| panic!("{e}\n{}", w.log()));
    assert!(r.migrated);
    assert!(r.rolled_back.is_empty() && r.needs_attention.is_empty(), "{r:?}");
    assert_eq!(w.src_state(), "gone");
    assert_eq!(w.tgt_domains(), vec![(DOMAIN.to_string(), "r-----".to_string())]);
    src_unchanged(&w, &want);
    assert!(fs::read(w.tgt_disk()).unwrap() == want, "the target disk differs from the suspended source");
    assert!(r.disks[0].created);
    assert_eq!(w.tgt_tags(), vec![format!("xenmig-{UUID}")]);
    assert!(w.logged(&format!("source: tag {} xenmig-{UUID}", w.src_disk().display())));
    assert!(!w.journal_file().exists());
    assert!(r.downtime_seconds.is_some() && r.final_delta_seconds.is_some());
    let copy = r.disks[0].copy.as_ref().unwrap();
    assert!(copy.verified);
    row(
        "success (guest writes just before suspend)",
        format!("migrated; {}; target disk = suspended source", where_runs(&w)),
    );
}

/// A domain with two disks: each moves onto an LV of its own and is, on
/// the target, the suspended source's disk byte for byte (the guest wrote
/// to both just before the suspension: the last delta carries both); each
/// is tagged there and has its verified copy in the report; the domain's
/// config on the target names both.
#[test]
fn a_migration_moves_every_disk_of_the_domain() {
    let (mut w, data) = with_data_disk();
    let want = w.guest_writes_before_suspend(100, 3);
    let want_data = w.guest_writes_to_before_suspend("g1-data", &data, 7, 2);
    let (r, res) = run(&w);
    res.unwrap_or_else(|e| panic!("{e}\n{}", w.log()));
    assert!(r.migrated);
    assert_eq!(w.src_state(), "gone");
    assert_eq!(w.tgt_domains(), vec![(DOMAIN.to_string(), "r-----".to_string())]);
    src_unchanged(&w, &want);
    let (src_data, tgt_data) = (format!("/dev/{}/g1-data", w.src_vg), format!("/dev/{}/g1-data", w.tgt_vg));
    assert!(fs::read(&src_data).unwrap() == want_data, "the source's second disk changed");
    assert!(fs::read(w.tgt_disk()).unwrap() == want, "xvda on the target differs from the suspended source");
    assert!(fs::read(&tgt_data).unwrap() == want_data, "xvdb on the target differs from the suspended source");
    let disks: Vec<(&str, &str, &str)> =
        r.disks.iter().map(|d| (d.vdev.as_str(), d.source.as_str(), d.target.as_str())).collect();
    let (src_root, tgt_root) = (w.src_disk().display().to_string(), w.tgt_disk().display().to_string());
    assert_eq!(disks, vec![("xvda", src_root.as_str(), tgt_root.as_str()), ("xvdb", &src_data, &tgt_data)]);
    for d in &r.disks {
        assert!(d.created, "{d:?}");
        assert!(d.copy.as_ref().is_some_and(|c| c.verified), "{d:?}");
    }
    assert_eq!(w.tgt_tags(), vec![format!("xenmig-{UUID}")]);
    assert_eq!(w.tgt_tags_of("g1-data"), vec![format!("xenmig-{UUID}")]);
    for disk in [&tgt_root, &tgt_data] {
        assert!(w.logged(&format!("target: config names disk {disk}")), "{}", w.log());
    }
    assert!(!w.journal_file().exists());
    row(
        "success, two disks (guest writes to both just before suspend)",
        format!("migrated; {}; both target disks = suspended source's", where_runs(&w)),
    );
}

/// The last delta starts when the source is seen suspended, not at READY:
/// here the target's xl takes 5 s after the suspension (its last memory
/// round and the domain's build, under TCG), and the delta is done before
/// READY comes, so READY goes on at once.
#[test]
fn the_last_delta_runs_before_ready_while_xl_finishes() {
    let mut w = World::new(VG_BIG);
    let want = w.guest_writes_before_suspend(100, 3);
    w.fault("xl_sleep_suspended", "5");
    let (r, res) = run(&w);
    res.unwrap_or_else(|e| panic!("{e}\n{}", w.log()));
    assert!(r.migrated);
    assert!(fs::read(w.tgt_disk()).unwrap() == want, "the target disk differs from the suspended source");
    let t = r.suspended_window.clone().unwrap_or_else(|| panic!("no suspended window: {r:?}"));
    let (done, ready) = (t.last_delta_done.unwrap(), t.ready.unwrap());
    assert!(done < ready, "the last delta ended at {done:.2} s, READY came at {ready:.2} s: {t:?}");
    // The fake xl sends the rest of its stream after its 5 s: the delta
    // was done while xl was still at it.
    let end = t.xl_stream_end.unwrap();
    assert!(done < end && end <= ready, "{t:?}");
    assert!(t.last_delta_started.unwrap() < 2.0, "{t:?}");
    assert!(r.ready_to_release_seconds.unwrap() < 0.5, "{r:?}");
    let (released, go, unpaused) = (t.released.unwrap(), t.go.unwrap(), t.unpaused.unwrap());
    assert!(ready <= released && released <= go && go <= unpaused, "{t:?}");
    assert!(r.disks[0].copy.as_ref().unwrap().verified);
    let phases: Vec<&str> = r.phases.iter().map(|p| p.phase.as_str()).collect();
    let mut unique = phases.clone();
    unique.dedup();
    assert_eq!(phases, unique, "a phase twice");
    row(
        "success, last delta done before READY (target's xl slow after the suspension)",
        format!("migrated; {}; the last delta verified before READY came", where_runs(&w)),
    );
}

/// The target's disk end dies at the suspension, so the last delta (run
/// before READY comes) fails: READY is withheld when it comes, the source
/// resumes, the target's copy is destroyed.
#[test]
fn the_last_delta_fails_before_ready_ready_withheld() {
    let mut w = World::new(VG_BIG);
    let want = w.guest_writes_before_suspend(100, 2);
    w.fault("kill_serve_at_suspend", "");
    w.fault("xl_sleep_suspended", "2");
    let (r, res) = run(&w);
    let e = res.unwrap_err();
    // The last pass of the memory phase (sent at the suspension) or the
    // delta itself meets the dead link first.
    assert!(matches!(e, MigrateError::FinalDelta { .. } | MigrateError::PreCopy { .. }), "{e}\n{}", w.log());
    assert_ready_withheld(&w, &r, &want);
    assert!(!w.log().contains("GO"), "{}", w.log());
    row(
        "last delta: target disk end killed at the suspension, before READY",
        format!("not migrated; READY withheld; rolled back: {}; {}", r.rolled_back.join(" / "), where_runs(&w)),
    );
}

/// Two disks, and only the second one's target end dies at the
/// suspension: its last delta fails, READY is withheld, the source resumes
/// with both disks as they were, and the target's copy is destroyed.
#[test]
fn the_second_disks_last_delta_fails_ready_withheld() {
    let (mut w, data) = with_data_disk();
    let want = w.guest_writes_before_suspend(100, 2);
    let want_data = w.guest_writes_to_before_suspend("g1-data", &data, 7, 2);
    w.fault("kill_serve_at_suspend", "g1-data");
    w.fault("xl_sleep_suspended", "2");
    let (r, res) = run(&w);
    let e = res.unwrap_err();
    let src_data = format!("/dev/{}/g1-data", w.src_vg);
    let names_it = match &e {
        MigrateError::FinalDelta { disk, .. } | MigrateError::PreCopy { disk, .. } => *disk == src_data,
        _ => false,
    };
    assert!(names_it, "{e}\n{}", w.log());
    assert!(w.logged("source: target disk end killed (g1-data)"), "{}", w.log());
    assert_ready_withheld(&w, &r, &want);
    assert!(fs::read(&src_data).unwrap() == want_data, "the source's second disk changed");
    row(
        "last delta: the second disk's target end killed at the suspension (two disks)",
        format!("not migrated; READY withheld; rolled back: {}; {}", r.rolled_back.join(" / "), where_runs(&w)),
    );
}

/// `migrate --bwlimit` (`opts.source.bwlimit`) reaches the disk copies:
/// the target's disk fills at the limit, the pre-copy cannot beat it, and
/// the report `migrate --json` prints carries it (and each disk's copy
/// report). Side by side, the same migration without a limit.
#[test]
fn bwlimit_throttles_the_disk_copies_and_is_reported() {
    const DISK: usize = 24 << 20;
    let limit: u64 = 4 << 20;
    let (r, steady) = watched_migrate(DISK, Some(limit));
    let precopy = phase_seconds(&r, "disk pre-copy");
    let copy = r.disks[0].copy.as_ref().unwrap();
    let floor = copy.bytes_payload_wire as f64 / limit as f64;
    let steady = steady.expect("enough samples of the target disk's growth");
    eprintln!(
        "migrate --bwlimit 4M, {} MiB disk: steady {steady:.0} B/s ({:.3} of the limit); pre-copy {precopy:.2} s for {} payload bytes ({floor:.2} s at the limit); whole migration {:.2} s",
        DISK >> 20,
        steady / limit as f64,
        copy.bytes_payload_wire,
        r.seconds
    );
    assert!((0.9..=1.1).contains(&(steady / limit as f64)), "steady {steady:.0} B/s is not within 10% of {limit}");
    // Nearly all of the payload is pass 1, in the pre-copy; the bucket
    // starts empty, so it cannot have gone faster than the limit.
    assert!(copy.bytes_payload_wire as usize >= DISK, "{copy:?}");
    assert!(precopy >= 0.95 * DISK as f64 / limit as f64, "pre-copy {precopy:.2} s beat the limit");
    assert_eq!(r.bwlimit, Some(limit));
    assert_eq!(copy.bwlimit, Some(limit));
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["bwlimit"], limit, "{json}");
    assert_eq!(json["disks"][0]["copy"]["bwlimit"], limit);
    // Without a limit: none reported, and the pre-copy is much faster.
    let (free, _) = watched_migrate(DISK, None);
    let free_precopy = phase_seconds(&free, "disk pre-copy");
    eprintln!("the same without a limit: pre-copy {free_precopy:.2} s, whole migration {:.2} s", free.seconds);
    assert!(serde_json::to_value(&free).unwrap().get("bwlimit").is_none());
    assert!(free_precopy < precopy / 2.0, "unlimited {free_precopy:.2} s, limited {precopy:.2} s");
}

fn phase_seconds(r: &MigrateReport, name: &str) -> f64 {
    r.phases.iter().find(|p| p.phase == name).unwrap_or_else(|| panic!("no phase {name}: {:?}", r.phases)).seconds
}

/// A migration of a `disk`-byte guest disk (no guest writes), with the
/// target disk's allocated bytes sampled every 50 ms; the report and the
/// steady rate between 20% and 80% of the disk.
fn watched_migrate(disk: usize, limit: Option<u64>) -> (MigrateReport, Option<f64>) {
    use std::os::unix::fs::MetadataExt;
    use std::time::Instant;
    let w = World::with_disk(VG_BIG, disk);
    w.no_guest_writes();
    let mut o = w.opts();
    // Noise does not compress: no CPU spent finding that out.
    o.source.compress = "none".parse().unwrap();
    if let Some(l) = limit {
        o.source.bwlimit = xenmig::wire::rate::Rate(l);
    }
    let (host, tgt) = (w.host(), w.tgt_disk());
    let started = Instant::now();
    let ((r, res), samples) = std::thread::scope(|sc| {
        let job = sc.spawn(|| migrate::migrate(&host, &o, &Progress::hidden()));
        let mut samples: Vec<(f64, u64)> = Vec::new();
        while !job.is_finished() {
            if let Ok(m) = fs::metadata(&tgt) {
                samples.push((started.elapsed().as_secs_f64(), m.blocks() * 512));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        (job.join().unwrap(), samples)
    });
    res.unwrap_or_else(|e| panic!("{e}\n{}", w.log()));
    assert!(r.migrated);
    assert!(fs::read(w.tgt_disk()).unwrap() == w.src_before, "the target disk differs from the source");
    let size = disk as u64;
    let first = samples.iter().find(|s| s.1 >= size / 5);
    let last = samples.iter().rev().find(|s| s.1 <= size * 4 / 5);
    let steady = match (first, last) {
        (Some(a), Some(b)) if b.0 - a.0 > 1.0 => Some((b.1 - a.1) as f64 / (b.0 - a.0)),
        _ => None,
    };
    (r, steady)
}

#[test]
fn disk_passes_go_on_while_xl_copies_memory() {
    // The guest writes 64 blocks while xl copies memory (3 s) and 2 more
    // just before it is suspended. With passes during the memory copy the
    // 64 travel then, and the frozen pass carries at most the last 2.
    for overlap in [true, false] {
        let mut w = World::new(VG_BIG);
        let early = w.guest_writes_during_memory(10, 64, 3.0);
        let mut want = w.guest_writes_before_suspend(100, 2);
        want[10 * 4096..74 * 4096].copy_from_slice(&early);
        let mut o = w.opts();
        o.passes_during_memory = overlap;
        let (r, res) = migrate::migrate(&w.host(), &o, &Progress::hidden());
        res.unwrap_or_else(|e| panic!("overlap {overlap}: {e}\n{}", w.log()));
        assert!(r.migrated);
        assert!(fs::read(w.tgt_disk()).unwrap() == want, "overlap {overlap}: the target disk differs");
        let c = r.disks[0].copy.as_ref().unwrap();
        let last = c.passes.last().unwrap();
        assert!(last.final_pass && c.verified, "{c:?}");
        if overlap {
            assert!(r.disk_passes_during_memory >= 1, "{r:?}");
            assert!(last.changed_blocks <= 2, "the frozen pass carried {} blocks: {c:?}", last.changed_blocks);
        } else {
            assert_eq!(r.disk_passes_during_memory, 0);
            assert_eq!(last.changed_blocks, 66, "{c:?}");
        }
        row(
            if overlap { "disk passes during xl's memory copy" } else { "--no-passes-during-memory" },
            format!(
                "migrated; {} disk passes during the memory copy; the frozen pass carried {} of the 66 blocks written meanwhile",
                r.disk_passes_during_memory, last.changed_blocks
            ),
        );
    }
}

#[test]
fn another_vg_without_c_the_relay_renames_the_disk_in_xls_config() {
    // The VGs differ (xmts-ID here, xmtt-ID there). Without -C xl sends the
    // domain's own config, naming the source path; the relay rewrites it.
    let w = World::new(VG_BIG);
    let (r, res) = migrate::migrate(&w.host(), &o_for(&w), &Progress::hidden());
    res.unwrap_or_else(|e| panic!("{e}\n{}", w.log()));
    assert!(r.migrated);
    let named = format!("target: config names disk {}", w.tgt_disk().display());
    assert!(w.logged(&named), "{}", w.log());
    assert!(fs::read(w.tgt_disk()).unwrap() == w.src_before);
    row(
        "--target-vg without -C",
        format!("migrated; the relay rewrote the disk path in xl's config; {}", where_runs(&w)),
    );

    // A header the relay cannot rewrite (no JSON config) stops xl before
    // anything moves to the target; the guest runs here.
    let w = World::new(VG_BIG);
    w.fault("xl_header_flags", "1");
    let (r, res) = migrate::migrate(&w.host(), &o_for(&w), &Progress::hidden());
    let e = res.unwrap_err();
    assert!(matches!(e, MigrateError::Memory(_)), "{e}");
    assert!(e.to_string().contains("carries no JSON domain config"), "{e}");
    assert!(!r.migrated);
    assert_rolled_back(&w, &w.src_before);
    row("--target-vg without -C, xl's header unreadable", format!("not migrated: {e}; {}", where_runs(&w)));
}

/// The same with two disks: the relay rewrites both paths in xl's config,
/// and the target's domain is built on both new LVs.
#[test]
fn another_vg_without_c_the_relay_renames_every_disk() {
    let (w, data) = with_data_disk();
    let (r, res) = migrate::migrate(&w.host(), &o_for(&w), &Progress::hidden());
    res.unwrap_or_else(|e| panic!("{e}\n{}", w.log()));
    assert!(r.migrated);
    let tgt_data = format!("/dev/{}/g1-data", w.tgt_vg);
    for disk in [w.tgt_disk().display().to_string(), tgt_data.clone()] {
        assert!(w.logged(&format!("target: config names disk {disk}")), "{}", w.log());
    }
    assert!(!w.log().contains(&format!("config names disk /dev/{}/", w.src_vg)), "{}", w.log());
    assert!(fs::read(w.tgt_disk()).unwrap() == w.src_before);
    assert!(fs::read(&tgt_data).unwrap() == data);
    row(
        "--target-vg without -C, two disks",
        format!("migrated; the relay rewrote both disk paths in xl's config; {}", where_runs(&w)),
    );
}

fn o_for(w: &World) -> migrate::MigrateOptions {
    let mut o = w.opts();
    o.config = None;
    o.target_vg = Some(w.tgt_vg.clone());
    o
}

#[test]
fn paused_on_target_with_p() {
    let w = World::new(VG_BIG);
    let mut o = w.opts();
    o.paused = true;
    let (r, res) = migrate::migrate(&w.host(), &o, &Progress::hidden());
    res.unwrap_or_else(|e| panic!("{e}\n{}", w.log()));
    assert!(r.migrated);
    assert_eq!(w.src_state(), "gone");
    assert_eq!(w.tgt_domains(), vec![(DOMAIN.to_string(), "--p---".to_string())]);
    row("success with -p", format!("migrated; {}", where_runs(&w)));
}

// ---- preflight: refused before anything changes ----

#[test]
fn preflight_refusals_change_nothing() {
    type Setup = Box<dyn Fn(&World, &mut migrate::MigrateOptions)>;
    let cases: Vec<(&str, Setup, &str)> = vec![
        ("preflight: domain paused", Box::new(|w, _| w.set_src_state("paused")), "is paused"),
        ("preflight: domain missing", Box::new(|w, _| w.set_src_state("gone")), "no domain g1"),
        (
            "preflight: target unreachable (ssh 255)",
            Box::new(|w, o| o.ssh = w.dir.join("no-ssh").display().to_string()),
            "cannot reach the target: tgt: ssh: connect to host tgt port 22: Connection refused",
        ),
        (
            "preflight: no xenmig on the target",
            Box::new(|_, o| o.remote_xenmig = "/nonexistent/xenmig".into()),
            "no '/nonexistent/xenmig' there",
        ),
        (
            "preflight: other protocol version on the target",
            Box::new(|w, _| w.fault("probe_protocol", "9999")),
            "speaks protocol 9999",
        ),
        (
            "preflight: name taken on the target",
            Box::new(|w, _| w.add_tgt_domain(DOMAIN, "r-----")),
            "a domain named g1 already exists on tgt",
        ),
        (
            "preflight: NAME--incoming on the target",
            Box::new(|w, _| w.add_tgt_domain("g1--incoming", "--p---")),
            "a domain named g1--incoming already exists on tgt",
        ),
        (
            "preflight: no such VG on the target",
            Box::new(|_, o| o.target_vg = Some("xmt-none".into())),
            "volume group xmt-none",
        ),
        (
            "preflight: LV there, not tagged for the domain",
            Box::new(|w, _| fs::write(w.tgt_disk(), vec![0u8; DISK_BYTES]).unwrap()),
            "exists and is not marked for g1",
        ),
    ];
    for (case, setup, want) in cases {
        let w = World::new(VG_BIG);
        let mut o = w.opts();
        setup(&w, &mut o);
        let lvs_before = w.tgt_lvs();
        let doms_before = w.tgt_domains();
        let state_before = w.src_state();
        let (r, res) = migrate::migrate(&w.host(), &o, &Progress::hidden());
        let e = res.as_ref().expect_err(case).to_string();
        assert!(e.contains(want), "{case}: {e}");
        assert!(!r.migrated && r.rolled_back.is_empty() && r.needs_attention.is_empty(), "{case}: {r:?}");
        assert_eq!(w.tgt_lvs(), lvs_before, "{case}");
        assert_eq!(w.tgt_domains(), doms_before, "{case}");
        assert_eq!(w.src_state(), state_before, "{case}");
        assert!(!w.journal_file().exists(), "{case}");
        assert!(!w.log().contains("xl migrate"), "{case}: {}", w.log());
        assert!(!w.log().contains("lvcreate") && !w.log().contains("addtag"), "{case}: {}", w.log());
        src_unchanged(&w, &w.src_before);
        row(case, format!("refused, nothing changed: {e}"));
    }
}

#[test]
fn preflight_no_space_in_the_target_vg() {
    let w = World::new(DISK_BYTES as u64 - 4096);
    let (r, res) = run(&w);
    let e = assert_refused(&w, &r, &res);
    assert!(
        e.contains(&format!(
            "volume group {} on tgt has {} bytes free, the new LVs need {DISK_BYTES}",
            w.tgt_vg,
            DISK_BYTES - 4096
        )),
        "{e}"
    );
    assert_eq!(w.src_state(), "running");
    row("preflight: no space in the target VG", format!("refused, nothing changed: {e}"));
}

#[test]
fn dry_run_changes_nothing() {
    let w = World::new(VG_BIG);
    let mut o = w.opts();
    o.dry_run = true;
    let (r, res) = migrate::migrate(&w.host(), &o, &Progress::hidden());
    res.unwrap();
    assert!(!r.migrated && r.dry_run);
    assert!(r.plan.iter().any(|l| l.starts_with("create tgt:")), "{:?}", r.plan);
    assert!(w.tgt_lvs().is_empty() && !w.journal_file().exists() && w.src_state() == "running");
    row("--dry-run", "plan only, nothing changed".into());
}

// ---- disk pre-copy ----

#[test]
fn precopy_target_end_fails_then_a_rerun_succeeds() {
    let w = World::new(VG_BIG);
    w.fault("serve_fail", "");
    let (r, res) = run(&w);
    let e = res.unwrap_err();
    assert!(matches!(e, MigrateError::PreCopy { .. }), "{e}");
    assert_failed_before_xl(&w, &r);
    // The LV prepared for it stays, tagged, for the rerun.
    assert_eq!(w.tgt_lvs(), vec![format!("{DOMAIN}-disk")]);
    assert_eq!(w.tgt_tags(), vec![format!("xenmig-{UUID}")]);
    let first = format!("{}; {}", e, where_runs(&w));
    let r = rerun(&w);
    assert!(!r.disks[0].created, "the LV is reused: {r:?}");
    assert!(fs::read(w.tgt_disk()).unwrap() == w.src_before);
    row(
        "pre-copy: target disk end fails",
        format!("not migrated, guest never suspended ({first}); rerun reuses the LV and migrates"),
    );
}

/// A domain with two disks whose second disk's target end fails: nothing
/// moves, the guest is never suspended, the error names that disk, and a
/// rerun reuses both LVs and moves the domain.
#[test]
fn precopy_second_disk_fails_then_a_rerun_succeeds() {
    let (w, data) = with_data_disk();
    let (src_data, tgt_data) = (format!("/dev/{}/g1-data", w.src_vg), format!("/dev/{}/g1-data", w.tgt_vg));
    w.fault("serve_fail_dst", &tgt_data);
    let (r, res) = run(&w);
    let e = res.unwrap_err();
    assert!(matches!(&e, MigrateError::PreCopy { disk, .. } if *disk == src_data), "{e}\n{}", w.log());
    assert!(e.to_string().contains(&src_data), "{e}");
    assert_failed_before_xl(&w, &r);
    assert!(fs::read(&src_data).unwrap() == data, "the source's second disk changed");
    assert_eq!(w.tgt_lvs(), vec!["g1-data".to_string(), format!("{DOMAIN}-disk")]);
    let first = format!("{}; {}", e, where_runs(&w));
    let r = rerun(&w);
    assert!(r.disks.len() == 2 && r.disks.iter().all(|d| !d.created), "both LVs are reused: {r:?}");
    assert!(fs::read(w.tgt_disk()).unwrap() == w.src_before);
    assert!(fs::read(&tgt_data).unwrap() == data);
    row(
        "pre-copy: the second disk's target end fails (two disks)",
        format!("not migrated, guest never suspended ({first}); rerun reuses both LVs and migrates"),
    );
}

/// Two disks, and the target cannot create the second LV although the
/// checks before passed (lvcreate fails): the error names it, the guest is
/// never touched, the first LV stays there tagged, and a rerun reuses it,
/// creates the second and moves the domain.
#[test]
fn prepare_fails_half_way_then_a_rerun_succeeds() {
    let (w, data) = with_data_disk();
    w.fault("lvcreate_fail", "g1-data");
    let (r, res) = run(&w);
    let e = res.unwrap_err();
    assert!(matches!(e, MigrateError::Target(_)), "{e}\n{}", w.log());
    assert!(e.to_string().contains("g1-data"), "{e}");
    assert_failed_before_xl(&w, &r);
    assert_eq!(w.tgt_lvs(), vec![format!("{DOMAIN}-disk")]);
    assert_eq!(w.tgt_tags(), vec![format!("xenmig-{UUID}")]);
    let first = format!("{}; {}", e, where_runs(&w));
    let r = rerun(&w);
    let created: Vec<bool> = r.disks.iter().map(|d| d.created).collect();
    assert!(created == [false, true], "the first LV is reused, the second created: {r:?}");
    assert!(fs::read(format!("/dev/{}/g1-data", w.tgt_vg)).unwrap() == data);
    row(
        "prepare: the second LV cannot be created (two disks)",
        format!(
            "not migrated, guest never suspended ({first}); rerun reuses the first LV, creates the second, migrates"
        ),
    );
}

#[test]
fn precopy_link_drops_then_a_rerun_reuses_what_arrived() {
    let w = World::new(VG_BIG);
    // Cut the link after ~1.9 MB of the 2 MiB (incompressible) disk: the
    // blocks of the runs that arrived whole are written there.
    w.fault("serve_cut", "1900000");
    let (r, res) = run(&w);
    let e = res.unwrap_err();
    assert!(matches!(e, MigrateError::PreCopy { .. }), "{e}");
    assert!(!r.migrated && r.rolled_back.is_empty() && r.needs_attention.is_empty(), "{r:?}");
    assert!(!w.log().contains("xl migrate") && !w.log().contains("suspended"), "{}", w.log());
    assert_rolled_back(&w, &w.src_before);
    // The source fails on its first write after the cut and returns at
    // once; the disk end still works through what reached it (as a remote
    // end does after its ssh session dies). Look once it has exited.
    w.wait_for("the disk end to exit", LONG, || w.pids("serve.pids").iter().all(|p| !alive(*p)));
    let tgt = fs::read(w.tgt_disk()).unwrap();
    let arrived = tgt.chunks(4096).zip(w.src_before.chunks(4096)).filter(|(a, b)| a == b).count();
    assert!(arrived > 50, "only {arrived} blocks arrived before the cut ({e}); {}", w.log());
    w.clear_faults();
    let (r, res) = run(&w);
    res.unwrap_or_else(|e| panic!("{e}\n{}", w.log()));
    assert!(r.migrated && !r.disks[0].created);
    let c = r.disks[0].copy.as_ref().unwrap();
    assert!(
        c.blocks_reused as usize >= arrived,
        "rerun reused {} blocks, {arrived} had arrived: {c:?}",
        c.blocks_reused
    );
    assert!(fs::read(w.tgt_disk()).unwrap() == w.src_before);
    assert_eq!(w.src_state(), "gone");
    row(
        "pre-copy: link drops mid-disk",
        format!(
            "not migrated, guest never suspended; rerun reused {} of {} blocks and migrated",
            c.blocks_reused, c.blocks_total
        ),
    );
}

// ---- xl stream or restore ----

fn memory_failure(case: &str, faults: &[&str], want_rolled_back: &[String]) {
    let w = World::new(VG_BIG);
    for f in faults {
        w.fault(f, "");
    }
    let (r, res) = run(&w);
    let e = res.unwrap_err();
    assert!(matches!(e, MigrateError::Memory(_)), "{case}: {e}\n{}", w.log());
    assert!(!r.migrated);
    assert_eq!(r.rolled_back, want_rolled_back, "{case}: {}", w.log());
    assert!(r.needs_attention.is_empty(), "{case}: {:?}", r.needs_attention);
    assert_rolled_back(&w, &w.src_before);
    row(case, format!("not migrated; rolled back: {}; {}", r.rolled_back.join(" / "), where_runs(&w)));
}

#[test]
fn stream_fails_xl_resumes_the_source() {
    memory_failure(
        "memory: xl stream fails",
        &["xl_stream_fail"],
        &[format!("{DOMAIN} runs on this host (resumed by xl)")],
    );
}

#[test]
fn restore_fails_target_destroys_its_copy() {
    memory_failure(
        "memory: restore fails (target destroys its copy)",
        &["recv_fail_restore"],
        &[format!("{DOMAIN} runs on this host (resumed by xl)")],
    );
}

#[test]
fn restore_fails_incoming_left_xenmig_destroys_it() {
    memory_failure(
        "memory: restore fails, NAME--incoming left",
        &["recv_fail_restore", "recv_leave_incoming"],
        &[format!("{DOMAIN} runs on this host (resumed by xl)"), format!("destroyed {DOMAIN}--incoming on {HOST}")],
    );
}

#[test]
fn xl_fails_and_leaves_the_source_suspended_xenmig_resumes_it() {
    memory_failure(
        "memory: xl fails and does not resume (failed_suspend)",
        &["xl_fail_suspended"],
        &[format!("resumed {DOMAIN} on this host (xl had not)")],
    );
}

#[test]
fn receiver_never_starts() {
    let w = World::new(VG_BIG);
    w.fault("recv_no_banner", "");
    let (r, res) = run(&w);
    assert!(matches!(res, Err(MigrateError::Memory(_))), "{res:?}");
    assert_eq!(r.rolled_back, vec![format!("{DOMAIN} runs on this host (resumed by xl)")]);
    assert!(!w.logged("source: suspended"), "suspended without a receiver");
    assert_rolled_back(&w, &w.src_before);
    row("memory: receiver fails before its banner", format!("not migrated, never suspended; {}", where_runs(&w)));
}

// ---- last disk delta ----

#[test]
fn final_delta_fails_ready_withheld_source_resumes_target_copy_destroyed() {
    let mut w = World::new(VG_BIG);
    let want = w.guest_writes_before_suspend(200, 2);
    w.hold_ready(Duration::from_secs(3));
    let killer = {
        let state = w.state();
        std::thread::spawn(move || {
            let end = std::time::Instant::now() + Duration::from_secs(60);
            while !state.join("ready.sent").exists() && std::time::Instant::now() < end {
                std::thread::sleep(Duration::from_millis(10));
            }
            // The target's disk end dies while READY is held.
            for l in fs::read_to_string(state.join("serve.pids")).unwrap_or_default().lines() {
                signal(l.trim().parse().unwrap(), libc::SIGKILL);
            }
        })
    };
    let (r, res) = run(&w);
    killer.join().unwrap();
    let e = res.unwrap_err();
    assert!(matches!(e, MigrateError::FinalDelta { .. }), "{e}\n{}", w.log());
    assert_ready_withheld(&w, &r, &want);
    assert!(r.needs_attention.is_empty());
    assert!(!w.log().contains("GO"), "{}", w.log());
    row(
        "last delta: target disk end killed while READY is held",
        format!("not migrated; READY withheld; rolled back: {}; {}", r.rolled_back.join(" / "), where_runs(&w)),
    );
}

/// The last delta lands changed on the target's disk (every write of the
/// frozen pass: its device stores other bytes than it was given). The disk
/// end's read-back finds it, so the last delta fails and READY is withheld:
/// the guest resumes here and the target's copy is destroyed, as for any
/// last delta that does not verify. Without the read-back this migration
/// succeeded onto a disk that differs from the source.
#[test]
fn final_delta_that_lands_changed_withholds_ready() {
    let mut w = World::new(VG_BIG);
    let want = w.guest_writes_before_suspend(200, 2);
    w.fault("faulty_disk_end", std::env::current_exe().unwrap().to_str().unwrap());
    let (r, res) = run(&w);
    let e = res.unwrap_err();
    assert!(matches!(e, MigrateError::FinalDelta { .. }), "{e}\n{}", w.log());
    let text = e.to_string();
    assert!(text.contains("read back") && text.contains("blocks 200.."), "{text}");
    assert!(!r.migrated);
    assert!(w.logged("source: no READY; source resumed"), "READY reached xl: {}", w.log());
    assert!(!w.log().contains("GO"), "{}", w.log());
    assert_rolled_back(&w, &want);
    row(
        "last delta: a write lands changed on the target's disk",
        format!("not migrated; READY withheld; rolled back: {}; {}", r.rolled_back.join(" / "), where_runs(&w)),
    );
}

/// The target's disk end for the test above, started by the fake host in
/// place of `xenmig serve --target DST`: the real target end, writing DST
/// through a `FaultyDisk` whose writes land changed once the frozen pass
/// begins (armed by a relay that reads the source's frames before the
/// target does, so no write of that pass escapes it).
#[test]
#[ignore = "the target's disk end of final_delta_that_lands_changed_withholds_ready"]
fn faulty_disk_end() {
    use std::os::fd::FromRawFd;
    use xenmig::storage::faulty::{Fault, FaultPlan, FaultyDisk, Op, Rule};
    use xenmig::wire::protocol::{read_frame, Message, ProtocolError};
    let Some(dst) = std::env::var_os("XMT_FAULTY_DST") else { return };
    // SAFETY: the fake host's wrapper opened fds 3 (from the source) and 4
    // (to it) for this process, and nothing else here uses them.
    let (from_source, to_source) = unsafe { (fs::File::from_raw_fd(3), fs::File::from_raw_fd(4)) };
    let plan = FaultPlan::new(vec![Rule::always(Op::Write, Fault::Changed)], false);
    let (relay_r, relay_w) = nix::unistd::pipe().unwrap();
    let arm = plan.clone();
    std::thread::spawn(move || {
        use std::io::Write;
        let (mut from, mut to) = (from_source, fs::File::from(relay_w));
        loop {
            let m = match read_frame(&mut from, "relay") {
                Ok(m) => m,
                Err(ProtocolError::Remote(message)) => Message::Error { message },
                Err(_) => return,
            };
            if matches!(m, Message::PassBegin { final_pass: true, .. }) {
                arm.arm();
            }
            if to.write_all(&m.encode()).and_then(|()| to.flush()).is_err() {
                return;
            }
        }
    });
    let wrap = move |img: xenmig::storage::image::Image| -> Box<dyn xenmig::storage::disk::Disk> {
        Box::new(FaultyDisk::new(Box::new(img), plan.clone()))
    };
    let link = xenmig::wire::transport::Link::new(fs::File::from(relay_r), to_source);
    // As `serve` would take them: migrate asks its disk ends for the read-back.
    let args = std::env::var("XMT_SERVE_ARGS").unwrap_or_default();
    let opts = xenmig::copy::target::TargetOptions {
        readback: args.split(' ').any(|a| a == "--readback"),
        ..Default::default()
    };
    let r = xenmig::copy::target::run_with(std::path::Path::new(&dst), &opts, link, &Progress::hidden(), &wrap);
    // As `serve` ends: its error on stderr, where the source looks for it.
    if let Err(e) = r {
        eprintln!("xenmig: error: {e}");
        std::process::exit(1);
    }
}

/// The target's disk end dies during the pre-copy, after it has written
/// pass 1: the migration stops in the pre-copy and the guest is never
/// suspended. In lab runs 2-4 of 2026-11-29 the target had sent PassDone
/// before it died, so the source's wait took PassDone and the link's end
/// stayed queued behind it, unread, until the frozen pass wrote to the dead
/// link; `SourceSession::check_link`, run before xl starts, reads it. (Here
/// the fake's timing lets the wait see the failure itself, so this test
/// passes with or without that check: it holds the row, not the cause.)
#[test]
fn a_disk_link_dead_after_pass_1_is_found_before_the_guest_is_suspended() {
    let w = World::new(VG_BIG);
    w.hold_precopy(Duration::from_secs(6));
    let killer = {
        let w2 = w.state();
        let (tgt, want) = (w.tgt_disk(), w.src_before.clone());
        std::thread::spawn(move || {
            let end = std::time::Instant::now() + Duration::from_secs(60);
            // Pass 1 done on the target (its disk holds the source's data),
            // then kill its disk end: the source is in its hold by then.
            while std::time::Instant::now() < end {
                if fs::read(&tgt).map(|d| d == want).unwrap_or(false) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            std::thread::sleep(Duration::from_millis(500));
            for l in fs::read_to_string(w2.join("serve.pids")).unwrap_or_default().lines() {
                signal(l.trim().parse().unwrap(), libc::SIGKILL);
            }
        })
    };
    let (r, res) = run(&w);
    killer.join().unwrap();
    let e = res.unwrap_err();
    assert!(matches!(e, MigrateError::PreCopy { .. }), "{e}\n{}", w.log());
    assert!(!r.migrated);
    assert!(!w.logged("source: suspended"), "the guest was suspended: {}", w.log());
    assert!(!w.log().contains("xl migrate"), "xl was started: {}", w.log());
    src_unchanged(&w, &w.src_before);
    row(
        "pre-copy: the disk link dies after pass 1 (in the hold)",
        format!("not migrated, never suspended; {}", where_runs(&w)),
    );
}

// ---- after GO: the report is lost ----

fn after_go(case: &str, paused: bool, faults: &[(&str, &str)]) -> (World, MigrateReport, Result<(), MigrateError>) {
    let w = World::new(VG_BIG);
    for (f, v) in faults {
        w.fault(f, v);
    }
    let mut o = w.opts();
    o.paused = paused;
    let (r, res) = migrate::migrate(&w.host(), &o, &Progress::hidden());
    assert!(w.logged("source: GO sent"), "{case}: {}", w.log());
    assert!(!w.journal_file().exists() || !r.needs_attention.is_empty(), "{case}");
    (w, r, res)
}

#[test]
fn report_lost_target_runs_source_destroyed() {
    let (w, r, res) = after_go("report lost, target runs", false, &[("xl_lose_report", "2")]);
    res.unwrap_or_else(|e| panic!("{e}\n{}", w.log()));
    assert!(r.migrated);
    assert_eq!(r.rolled_back, vec![format!("destroyed the source copy of {DOMAIN}")]);
    assert!(r.needs_attention.is_empty());
    assert_eq!(w.src_state(), "gone");
    assert_eq!(w.tgt_domains(), vec![(DOMAIN.to_string(), "r-----".to_string())]);
    assert!(fs::read(w.tgt_disk()).unwrap() == w.src_before);
    src_unchanged(&w, &w.src_before);
    assert!(!w.journal_file().exists());
    row("GO sent, report lost: target runs", format!("migrated; {}; {}", r.rolled_back.join(" / "), where_runs(&w)));
}

#[test]
fn report_lost_target_paused_with_p_counts_as_running() {
    let (w, r, res) = after_go("report lost, -p", true, &[("xl_lose_report", "2")]);
    res.unwrap_or_else(|e| panic!("{e}\n{}", w.log()));
    assert!(r.migrated);
    assert_eq!(r.rolled_back, vec![format!("destroyed the source copy of {DOMAIN}")]);
    assert_eq!(w.src_state(), "gone");
    assert_eq!(w.tgt_domains(), vec![(DOMAIN.to_string(), "--p---".to_string())]);
    row("GO sent, report lost, -p: target holds it paused", format!("migrated; {}", where_runs(&w)));
}

#[test]
fn report_lost_target_absent_source_resumes() {
    let (w, r, res) = after_go("report lost, absent", false, &[("recv_vanish_after_go", "")]);
    let e = res.unwrap_err();
    assert!(matches!(e, MigrateError::Commit(_)), "{e}");
    assert!(!r.migrated);
    assert_eq!(r.rolled_back, vec![format!("resumed {DOMAIN} on this host")], "{}", w.log());
    assert!(r.needs_attention.is_empty());
    assert_rolled_back(&w, &w.src_before);
    row(
        "GO sent, report lost: absent on target",
        format!("not migrated; {}; {}", r.rolled_back.join(" / "), where_runs(&w)),
    );
}

#[test]
fn report_lost_still_incoming_destroyed_there_source_resumes() {
    let (w, r, res) = after_go("report lost, incoming", false, &[("recv_die_after_go", "")]);
    let e = res.unwrap_err();
    assert!(matches!(e, MigrateError::Commit(_)), "{e}");
    assert!(!r.migrated);
    assert_eq!(
        r.rolled_back,
        vec![format!("destroyed {DOMAIN}--incoming on {HOST}"), format!("resumed {DOMAIN} on this host")],
        "{}",
        w.log()
    );
    assert!(r.needs_attention.is_empty());
    assert_rolled_back(&w, &w.src_before);
    row(
        "GO sent, report lost: still NAME--incoming",
        format!("not migrated; {}; {}", r.rolled_back.join(" / "), where_runs(&w)),
    );
}

// ---- xenmig killed at each phase, then `--recover` ----
//
// `migrate()` runs in a child process of this test binary (the ignored test
// `child_migrate`), in a process group of its own. The parent waits until
// the journal shows the phase (the fakes park the migration there), then
// SIGKILLs either xenmig alone (xl, the relay and the target ends go on, as
// they would) or its whole process group (xenmig, xl and the relay die; the
// target's processes are in sessions of their own and see EOF, as on
// another host). When the survivors have settled, `recover()` runs on the
// journal the child left.

#[test]
#[ignore = "the child process of the kill tests"]
fn child_migrate() {
    let Some(dir) = std::env::var_os("XMT_CHILD_WORLD") else { return };
    let w = World::load(std::path::Path::new(&dir));
    let (r, res) = run(&w);
    fs::write(w.dir.join("child.report"), serde_json::to_string(&r).unwrap()).unwrap();
    res.unwrap();
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kill {
    /// SIGKILL to xenmig only.
    Xenmig,
    /// SIGKILL to xenmig and every process it started, whatever their
    /// process group (xenmig runs xl in a group of its own, so that a
    /// terminal's Ctrl-C does not reach it; what this models is everything
    /// dying at once, as systemd's stop of a unit's cgroup does).
    Group,
}

fn spawn_child(w: &World) -> Child {
    use std::os::unix::process::CommandExt;
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_migrate", "--ignored", "--nocapture", "--test-threads=1"])
        .env("XMT_CHILD_WORLD", &w.dir)
        .process_group(0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn kill(child: &mut Child, how: Kill) {
    let pid = child.id() as i32;
    let mut victims = vec![pid];
    if how == Kill::Group {
        victims.extend(descendants(pid));
    }
    for p in victims {
        signal(p, libc::SIGKILL);
    }
    child.wait().unwrap();
}

/// Every process below `pid` (from /proc's parent links).
fn descendants(pid: i32) -> Vec<i32> {
    let mut parent_of = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        // "pid (comm) state ppid ...": comm may hold spaces; ppid follows the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|x| x.1) else { continue };
        if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|x| x.parse::<i32>().ok()) {
            parent_of.push((p, ppid));
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(q) = frontier.pop() {
        for &(p, pp) in &parent_of {
            if pp == q && !out.contains(&p) {
                out.push(p);
                frontier.push(p);
            }
        }
    }
    out
}

const LONG: Duration = Duration::from_secs(60);

/// Run a migration in a child, park it with `park` (returns when parked),
/// kill it, let the survivors settle, recover; returns recover's lines.
fn kill_and_recover(w: &World, phase: &str, how: Kill, park: impl Fn(&World), settle: impl Fn(&World)) -> Vec<String> {
    let mut child = spawn_child(w);
    park(w);
    w.wait_for(&format!("journal phase {phase}"), LONG, || w.journal_phase().as_deref() == Some(phase));
    kill(&mut child, how);
    settle(w);
    let jdir = w.dir.join("journal");
    assert!(w.journal_file().exists(), "no journal after the kill");
    let lines = migrate::recover(&w.host(), &jdir, DOMAIN).unwrap_or_else(|e| panic!("recover: {e}\n{}", w.log()));
    assert!(!lines.iter().any(|l| l.starts_with("NEEDS ATTENTION")), "{lines:?}\n{}", w.log());
    assert!(!w.journal_file().exists(), "the journal stays after a clean recover");
    lines
}

fn xl_done(w: &World) {
    w.wait_for("xl to exit", LONG, || w.state().join("xl.done").exists());
}

fn receiver_gone(w: &World) {
    w.wait_for("the receiver to exit", LONG, || w.pids("recv.pid").iter().all(|p| !alive(*p)));
}

fn ready_sent(w: &World) {
    w.wait_for("READY", LONG, || w.state().join("ready.sent").exists());
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn rows_for_kill(case: &str, lines: &[String], w: &World) {
    row(
        case,
        format!(
            "recover: {}; {}",
            if lines.is_empty() { "(nothing to do)".into() } else { lines.join(" / ") },
            where_runs(w)
        ),
    );
}

#[test]
fn kill_in_preflight_then_recover_and_rerun() {
    let w = World::new(VG_BIG);
    w.fault("prepare_sleep", "3");
    let lines = kill_and_recover(
        &w,
        "preflight",
        Kill::Xenmig,
        // The journal says "preflight" before prepare is started: kill
        // once the target runs it.
        |w| w.wait_for("prepare to start", LONG, || w.state().join("prepare.started").exists()),
        |w| w.wait_for("prepare to finish", LONG, || w.tgt_tags().len() == 1),
    );
    assert_eq!(lines, s(&["g1 runs on this host"]));
    assert_rolled_back(&w, &w.src_before);
    rows_for_kill("killed in preflight/prepare", &lines, &w);
    // A rerun reuses the LV prepared for the killed run.
    w.clear_faults();
    let (r, res) = run(&w);
    res.unwrap_or_else(|e| panic!("{e}\n{}", w.log()));
    assert!(r.migrated && !r.disks[0].created);
}

#[test]
fn kill_in_precopy_then_recover() {
    let w = World::new(VG_BIG);
    w.fault("serve_sleep", "3");
    let lines = kill_and_recover(
        &w,
        "pre_copy",
        Kill::Xenmig,
        |_| {},
        |w| w.wait_for("the disk end to exit", LONG, || w.pids("serve.pids").iter().all(|p| !alive(*p))),
    );
    assert_eq!(lines, s(&["g1 runs on this host"]));
    assert_rolled_back(&w, &w.src_before);
    assert!(!w.log().contains("xl migrate"));
    rows_for_kill("killed in pre-copy", &lines, &w);
}

#[test]
fn recover_refuses_while_the_migration_runs() {
    let w = World::new(VG_BIG);
    w.fault("serve_sleep", "3");
    let mut child = spawn_child(&w);
    w.wait_for("pre_copy", LONG, || w.journal_phase().as_deref() == Some("pre_copy"));
    let e = migrate::recover(&w.host(), &w.dir.join("journal"), DOMAIN).unwrap_err().to_string();
    assert!(e.contains("is still running"), "{e}");
    // And a second migrate of the same domain is refused.
    let (_, res) = run(&w);
    // (it recovers the earlier migration first, which refuses while that one runs)
    let second = res.unwrap_err().to_string();
    assert!(second.contains("is still running"), "{second}");
    kill(&mut child, Kill::Xenmig);
    row("recover while the migration runs; a second migrate", format!("refused ({e}); second migrate refused"));
}

#[test]
fn kill_in_memory_with_ready_held() {
    for how in [Kill::Xenmig, Kill::Group] {
        let w = World::new(VG_BIG);
        w.hold_ready(Duration::from_secs(4));
        let lines = kill_and_recover(&w, "memory", how, ready_sent, |w| {
            receiver_gone(w);
            if how == Kill::Xenmig {
                xl_done(w)
            }
        });
        let first = if how == Kill::Xenmig { "g1 runs on this host" } else { "resumed g1 on this host" };
        assert_eq!(lines, s(&[first, "destroyed g1--incoming on tgt"]), "{how:?}: {}", w.log());
        assert_rolled_back(&w, &w.src_before);
        rows_for_kill(&format!("killed in memory, READY held ({how:?})"), &lines, &w);
    }
}

#[test]
fn kill_in_final_delta() {
    for how in [Kill::Xenmig, Kill::Group] {
        let mut w = World::new(VG_BIG);
        let want = w.guest_writes_before_suspend(300, 1);
        w.hold_ready(Duration::from_secs(3));
        // Park: the target's disk end stops (SIGSTOP) once READY is out, so
        // the last delta waits for it.
        let lines = kill_and_recover(
            &w,
            "final_delta",
            how,
            |w| {
                ready_sent(w);
                w.signal_serve(libc::SIGSTOP);
                w.wait_for("final_delta", LONG, || w.journal_phase().as_deref() == Some("final_delta"));
                std::thread::sleep(Duration::from_millis(300));
                assert_eq!(w.src_state(), "suspended");
                assert_eq!(w.journal_phase().as_deref(), Some("final_delta"));
            },
            |w| {
                w.signal_serve(libc::SIGCONT);
                receiver_gone(w);
                if how == Kill::Xenmig {
                    xl_done(w)
                }
            },
        );
        let first = if how == Kill::Xenmig { "g1 runs on this host" } else { "resumed g1 on this host" };
        assert_eq!(lines, s(&[first, "destroyed g1--incoming on tgt"]), "{how:?}: {}", w.log());
        assert_rolled_back(&w, &want);
        rows_for_kill(&format!("killed in the last delta ({how:?})"), &lines, &w);
    }
}

/// The same with two disks, xenmig's whole process group killed: the
/// journal names both, and the recovery puts the domain back here with
/// both disks as the guest left them.
#[test]
fn kill_in_final_delta_two_disks() {
    let (mut w, data) = with_data_disk();
    let want = w.guest_writes_before_suspend(300, 1);
    let want_data = w.guest_writes_to_before_suspend("g1-data", &data, 9, 1);
    w.hold_ready(Duration::from_secs(3));
    let lines = kill_and_recover(
        &w,
        "final_delta",
        Kill::Group,
        |w| {
            ready_sent(w);
            w.signal_serve(libc::SIGSTOP);
            w.wait_for("final_delta", LONG, || w.journal_phase().as_deref() == Some("final_delta"));
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(w.src_state(), "suspended");
            let journal = fs::read_to_string(w.journal_file()).unwrap();
            assert!(journal.contains("g1-data"), "the journal does not name the second disk: {journal}");
        },
        |w| {
            w.signal_serve(libc::SIGCONT);
            receiver_gone(w);
        },
    );
    assert_eq!(lines, s(&["resumed g1 on this host", "destroyed g1--incoming on tgt"]), "{}", w.log());
    assert_rolled_back(&w, &want);
    assert!(fs::read(format!("/dev/{}/g1-data", w.src_vg)).unwrap() == want_data, "the source's second disk changed");
    rows_for_kill("killed in the last delta, two disks (Group)", &lines, &w);
}

#[test]
fn report_lost_incoming_renamed_while_xenmig_destroys_it() {
    // xenmig sees NAME--incoming, but the target's xl renames and unpauses
    // it before `xl destroy NAME--incoming` runs: the destroy fails and the
    // domain runs there, so the source must not be resumed.
    let (w, r, res) = after_go(
        "report lost, rename races the destroy",
        false,
        &[("recv_die_after_go", ""), ("destroy_races_rename", "")],
    );
    res.unwrap_or_else(|e| panic!("{e}\n{}", w.log()));
    assert!(r.migrated);
    assert_eq!(r.rolled_back, vec![format!("destroyed the source copy of {DOMAIN}")], "{}", w.log());
    assert!(r.needs_attention.is_empty(), "{:?}", r.needs_attention);
    assert_eq!(w.src_state(), "gone", "{}", w.log());
    assert_eq!(w.tgt_domains(), vec![(DOMAIN.to_string(), "r-----".to_string())]);
    assert!(!w.log().contains("resumed by xenmig"), "resumed while it runs on the target: {}", w.log());
    row(
        "GO sent, report lost: NAME--incoming renamed while xenmig destroys it",
        format!("migrated; {}; {}", r.rolled_back.join(" / "), where_runs(&w)),
    );
}

#[test]
fn report_lost_renamed_but_still_paused_is_left_for_a_person() {
    // NAME exists on the target, paused, without -p (renamed, not unpaused):
    // neither "runs there" nor "absent": the source stays suspended.
    let w = World::new(VG_BIG);
    w.fault("xl_lose_report", "2");
    w.fault("recv_sleep_after_go", "4");
    let state = w.state();
    let pauser = std::thread::spawn(move || {
        let end = std::time::Instant::now() + Duration::from_secs(60);
        let unpaused = || fs::read_to_string(state.join("log")).unwrap().contains("target: g1 unpaused");
        while !unpaused() && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        fs::write(state.join("tgt").join(DOMAIN), "--p---").unwrap();
    });
    let (r, res) = run(&w);
    pauser.join().unwrap();
    let e = res.unwrap_err();
    assert!(matches!(e, MigrateError::Commit(_)), "{e}");
    assert!(!r.migrated);
    assert!(r.rolled_back.is_empty(), "{:?}", r.rolled_back);
    assert_eq!(r.needs_attention.len(), 1, "{:?}", r.needs_attention);
    assert!(r.needs_attention[0].contains("is paused on tgt"), "{:?}", r.needs_attention);
    assert_eq!(w.src_state(), "suspended");
    assert!(w.journal_file().exists(), "the journal must stay for --recover");
    row(
        "GO sent, report lost: NAME paused on target (no -p)",
        format!("not migrated; needs attention, source left suspended, journal kept; {}", where_runs(&w)),
    );
}

#[test]
fn kill_after_release() {
    // (fault, kill, park until, recover's lines, source, target)
    type Case = (&'static str, &'static str, Kill, bool, Vec<String>, &'static str, Vec<(String, String)>);
    let cases: Vec<Case> = vec![
        (
            "xl_sleep_before_go",
            "killed after RELEASE, before GO",
            Kill::Xenmig,
            false,
            s(&["g1 runs on tgt; nothing to undo"]),
            "gone",
            vec![(DOMAIN.into(), "r-----".into())],
        ),
        (
            "xl_sleep_before_go",
            "killed after RELEASE, before GO",
            Kill::Group,
            false,
            s(&["destroyed g1--incoming on tgt", "resumed g1 on this host"]),
            "running",
            vec![],
        ),
        (
            "recv_sleep_after_go",
            "killed after GO, target unpaused, no report yet",
            Kill::Xenmig,
            true,
            s(&["g1 runs on tgt; nothing to undo"]),
            "gone",
            vec![(DOMAIN.into(), "r-----".into())],
        ),
        (
            "recv_sleep_after_go",
            "killed after GO, target unpaused, no report yet",
            Kill::Group,
            true,
            s(&["destroyed the source copy of g1"]),
            "gone",
            vec![(DOMAIN.into(), "r-----".into())],
        ),
    ];
    for (fault, case, how, wait_unpaused, want, src, tgt) in cases {
        let w = World::new(VG_BIG);
        w.fault(fault, "4");
        let lines = kill_and_recover(
            &w,
            "released",
            how,
            |w| {
                // The journal says "released" just before xenmig writes
                // RELEASE: wait for what follows it.
                if wait_unpaused {
                    w.wait_for("the target to unpause", LONG, || w.logged("target: g1 unpaused"));
                } else {
                    w.wait_for("READY to reach xl", LONG, || w.logged("source: READY received"));
                }
            },
            |w| {
                if how == Kill::Xenmig {
                    xl_done(w)
                }
                w.wait_for("the receiver to exit", LONG, || w.pids("recv.pid").iter().all(|p| !alive(*p)));
            },
        );
        assert_eq!(lines, want, "{case} {how:?}: {}", w.log());
        assert_eq!(w.src_state(), src, "{case} {how:?}");
        assert_eq!(w.tgt_domains(), tgt, "{case} {how:?}");
        src_unchanged(&w, &w.src_before);
        if src == "gone" {
            assert!(fs::read(w.tgt_disk()).unwrap() == w.src_before);
        }
        rows_for_kill(&format!("{case} ({how:?})"), &lines, &w);
    }
}

// ---- the target cannot be reached during the rollback ----

#[test]
fn cleanup_fails_journal_kept_then_recover_finishes() {
    let w = World::new(VG_BIG);
    w.fault("recv_fail_restore", "");
    w.fault("recv_leave_incoming", "");
    w.fault("cleanup_fail", "");
    let (r, res) = run(&w);
    assert!(matches!(res, Err(MigrateError::Memory(_))), "{res:?}");
    assert_eq!(r.rolled_back, vec![format!("{DOMAIN} runs on this host (resumed by xl)")]);
    assert_eq!(r.needs_attention.len(), 1, "{:?}", r.needs_attention);
    assert!(r.needs_attention[0].contains("xl destroy g1--incoming"), "{:?}", r.needs_attention);
    assert_eq!(w.src_state(), "running");
    assert_eq!(w.tgt_domains(), vec![("g1--incoming".to_string(), "--p---".to_string())]);
    assert!(w.journal_file().exists(), "the journal must stay while something needs attention");
    w.clear_faults();
    let lines = migrate::recover(&w.host(), &w.dir.join("journal"), DOMAIN).unwrap();
    assert_eq!(lines, s(&["g1 runs on this host", "destroyed g1--incoming on tgt"]));
    assert_rolled_back(&w, &w.src_before);
    row(
        "restore fails, NAME--incoming left, target unreachable for the clean-up",
        format!("not migrated; needs attention, journal kept; then recover: {}; {}", lines.join(" / "), where_runs(&w)),
    );
}

#[test]
fn report_lost_and_target_unreachable_source_stays_suspended_then_recover() {
    let w = World::new(VG_BIG);
    w.fault("xl_lose_report", "2");
    w.fault("state_fail", "");
    let (r, res) = run(&w);
    assert!(matches!(res, Err(MigrateError::Commit(_))), "{res:?}");
    assert!(!r.migrated && r.rolled_back.is_empty(), "{r:?}");
    assert_eq!(r.needs_attention.len(), 1, "{:?}", r.needs_attention);
    assert!(r.needs_attention[0].starts_with("cannot ask tgt where g1 runs"), "{:?}", r.needs_attention);
    assert_eq!(w.src_state(), "suspended", "resumed without knowing the target: {}", w.log());
    assert_eq!(w.tgt_domains(), vec![(DOMAIN.to_string(), "r-----".to_string())]);
    assert!(w.journal_file().exists());
    w.clear_faults();
    let lines = migrate::recover(&w.host(), &w.dir.join("journal"), DOMAIN).unwrap();
    assert_eq!(lines, s(&["destroyed the source copy of g1"]));
    assert_eq!(w.src_state(), "gone");
    assert!(!w.journal_file().exists());
    row(
        "GO sent, report lost, target unreachable",
        format!(
            "not migrated yet; source left suspended, journal kept; then recover: {}; {}",
            lines.join(" / "),
            where_runs(&w)
        ),
    );
}

#[test]
fn report_lost_incoming_cannot_be_destroyed_source_stays_suspended() {
    let (w, r, res) =
        after_go("report lost, clean-up fails", false, &[("recv_die_after_go", ""), ("cleanup_fail", "")]);
    assert!(matches!(res, Err(MigrateError::Commit(_))), "{res:?}");
    assert!(!r.migrated && r.rolled_back.is_empty(), "{r:?}");
    assert_eq!(r.needs_attention.len(), 1, "{:?}", r.needs_attention);
    assert!(r.needs_attention[0].starts_with("g1--incoming is paused on tgt"), "{:?}", r.needs_attention);
    assert_eq!(w.src_state(), "suspended", "resumed next to an undestroyed copy: {}", w.log());
    assert!(w.journal_file().exists());
    w.clear_faults();
    let lines = migrate::recover(&w.host(), &w.dir.join("journal"), DOMAIN).unwrap();
    assert_eq!(lines, s(&["destroyed g1--incoming on tgt", "resumed g1 on this host"]));
    assert_rolled_back(&w, &w.src_before);
    row(
        "GO sent, report lost: NAME--incoming cannot be destroyed",
        format!(
            "not migrated; source left suspended, journal kept; then recover: {}; {}",
            lines.join(" / "),
            where_runs(&w)
        ),
    );
}
