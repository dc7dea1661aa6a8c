//! The wire protocol under stalls, older peers, hostile claims and frames
//! out of order (protocol version 2).

mod common;
#[path = "common/script.rs"]
mod script;

use common::*;
use script::write_executable;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use xenmig::blocks::digest::Algorithm;
use xenmig::blocks::layout::Layout;
use xenmig::copy::source::{LiveOptions, SourceOptions, SourceSession};
use xenmig::copy::target::{self, TargetOptions};
use xenmig::copy::{EngineError, Progress, Report};
use xenmig::wire::protocol::{handshake, read_frame, write_message, Message, Role, CAP_LIVE};
use xenmig::wire::transport::Link;

// Long enough that a loaded machine does not starve a keep-alive thread past
// it (seen with 1 s on a 2-core machine under a QEMU lab), short enough
// for quick tests.
const IDLE: Duration = Duration::from_secs(2);

fn send(link: &mut Link, m: Message) {
    write_message(&mut link.writer, &m).unwrap();
    link.writer.flush().unwrap();
}

fn source_opts(live: bool) -> SourceOptions {
    SourceOptions { live: live.then(LiveOptions::default), idle_timeout: Some(IDLE), ..SourceOptions::default() }
}

fn target_opts() -> TargetOptions {
    TargetOptions { idle_timeout: Some(IDLE), ..TargetOptions::default() }
}

/// Run a target on `link` in a thread.
fn spawn_target(dst: &Path, opts: TargetOptions, link: Link) -> thread::JoinHandle<Result<Report, EngineError>> {
    let dst = dst.to_path_buf();
    thread::spawn(move || target::run(&dst, &opts, link, &Progress::hidden()))
}

#[test]
fn a_target_silent_after_the_handshake_fails_the_source_within_the_timeout() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a.img");
    sample_image(&a, 1, 256);
    let (src_link, mut fake) = Link::pair().unwrap();
    let fake_target = thread::spawn(move || {
        handshake(&mut fake.reader, &mut fake.writer, Role::Target, CAP_LIVE).unwrap();
        thread::sleep(IDLE * 5); // alive, silent, reading nothing
        drop(fake);
    });
    let t = Instant::now();
    let e = SourceSession::start(&a, &source_opts(false), src_link, Progress::hidden())
        .and_then(|mut s| s.final_pass())
        .unwrap_err()
        .to_string();
    let took = t.elapsed();
    assert!(e.contains("the target sent nothing for 2.") && e.contains("idle timeout 2 s"), "{e}");
    assert!(took >= IDLE && took < IDLE * 4, "failed after {took:?}");
    fake_target.join().unwrap();
}

#[test]
fn a_source_silent_after_the_handshake_fails_the_target_within_the_timeout() {
    let d = tempfile::tempdir().unwrap();
    let b = d.path().join("b.img");
    let (tgt_link, mut fake) = Link::pair().unwrap();
    let t = Instant::now();
    let target = spawn_target(&b, target_opts(), tgt_link);
    handshake(&mut fake.reader, &mut fake.writer, Role::Source, 0).unwrap();
    let layout = Layout::flat(1 << 20, 4096).unwrap();
    send(&mut fake, Message::ImageInfo { algo: Algorithm::Blake3, layout });
    // Silent from here on; the target must give up by itself.
    let e = target.join().unwrap().unwrap_err().to_string();
    let took = t.elapsed();
    assert!(e.contains("the source sent nothing for 2."), "{e}");
    assert!(took >= IDLE && took < IDLE * 4, "failed after {took:?}");
    drop(fake);
}

#[test]
fn the_cli_times_out_a_silent_remote_source_with_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let b = d.path().join("b.img");
    // A "remote xenmig" that says a version-2 Hello as a source and hangs.
    let fake = d.path().join("silent");
    write_executable(
        &fake,
        "#!/bin/sh\nprintf '\\001\\015\\000\\000\\000XENMIG\\002\\000\\001\\000\\000\\000\\000'\nexec sleep 30 2>/dev/null\n",
    );
    let t = Instant::now();
    let out = run(&["copy", "--json", "--idle-timeout", "2", "-s", "", "--remote-xenmig", s(&fake), "h:/x.img", s(&b)]);
    let took = t.elapsed();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the source sent nothing for 2.") && err.contains("idle timeout 2 s"), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verified"], false);
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn a_healthy_copy_idle_longer_than_the_timeout_between_passes_completes() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    sample_image(&a, 2, 1024);
    let (src_link, tgt_link) = Link::pair().unwrap();
    let target = spawn_target(&b, target_opts(), tgt_link);
    let mut session = SourceSession::start(&a, &source_opts(true), src_link, Progress::hidden()).unwrap();
    let scan = session.scan().unwrap();
    assert_eq!(scan.changed_blocks, 0);
    // Idle as migrate is while xl moves memory: three timeouts long.
    let wire_before = session.bytes_wire();
    thread::sleep(IDLE * 3);
    let keepalive_bytes = session.bytes_wire() - wire_before;
    change_blocks(&a, 10, 3, 99);
    let report = session.final_pass().unwrap();
    drop(session.finish(Duration::ZERO).unwrap());
    assert!(report.verified);
    let t = target.join().unwrap().unwrap();
    assert!(t.verified);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    // Both ends sent keep-alives (5-byte frames) while idle.
    assert!(keepalive_bytes >= 2 * 5, "{keepalive_bytes} bytes crossed while idle");
}

/// Relay frames between a source and a target as a version-1 peer would
/// see them: both Hellos say version 1; count keep-alives in each direction.
fn v1_relay(mut from: Link, mut to: Link, keepalives: Arc<AtomicU64>) -> thread::JoinHandle<()> {
    thread::spawn(move || loop {
        let m = match read_frame(&mut from.reader, "relay") {
            // A version-1 peer announces 1 and never the next-version bit.
            Ok(Message::Hello { role, caps, .. }) => {
                Message::Hello { version: 1, role, caps: caps & !xenmig::wire::protocol::CAP_NEXT_VERSION }
            }
            Ok(Message::KeepAlive) => {
                keepalives.fetch_add(1, Ordering::Relaxed);
                Message::KeepAlive
            }
            Ok(m) => m,
            Err(_) => return,
        };
        if write_message(&mut to.writer, &m).and_then(|_| Ok(to.writer.flush()?)).is_err() {
            return;
        }
    })
}

#[test]
fn a_version_1_peer_gets_no_keepalives_and_no_timeout_and_the_copy_verifies() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    sample_image(&a, 3, 1024);
    let (src_link, relay_s) = Link::pair().unwrap();
    let (relay_t, tgt_link) = Link::pair().unwrap();
    // Split each relay end into its two directions.
    let (relay_s_r, relay_s_w) = (relay_s.reader, relay_s.writer);
    let (relay_t_r, relay_t_w) = (relay_t.reader, relay_t.writer);
    let stats = relay_s.stats.clone();
    let mk = |reader, writer| Link { reader, writer, stats: stats.clone(), throttle: Default::default() };
    let kas = Arc::new(AtomicU64::new(0));
    let r1 = v1_relay(mk(relay_s_r, Box::new(std::io::sink())), mk(Box::new(std::io::empty()), relay_t_w), kas.clone());
    let r2 = v1_relay(mk(relay_t_r, Box::new(std::io::sink())), mk(Box::new(std::io::empty()), relay_s_w), kas.clone());
    let target = spawn_target(&b, target_opts(), tgt_link);
    let mut session = SourceSession::start(&a, &source_opts(true), src_link, Progress::hidden()).unwrap();
    session.scan().unwrap();
    // Idle past both ends' timeouts: with a version-1 peer neither times out.
    thread::sleep(IDLE * 3);
    change_blocks(&a, 7, 2, 5);
    let report = session.final_pass().unwrap();
    drop(session.finish(Duration::ZERO).unwrap());
    assert!(report.verified);
    assert!(target.join().unwrap().unwrap().verified);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let _ = (r1.join(), r2.join());
    assert_eq!(kas.load(Ordering::Relaxed), 0, "keep-alives reached a version-1 peer");
}

/// A fake source: handshake, then `ImageInfo` for a flat image.
fn fake_source(dst: &Path, opts: TargetOptions, size: u64) -> (Link, thread::JoinHandle<Result<Report, EngineError>>) {
    let (tgt_link, mut fake) = Link::pair().unwrap();
    let target = spawn_target(dst, opts, tgt_link);
    handshake(&mut fake.reader, &mut fake.writer, Role::Source, CAP_LIVE).unwrap();
    send(&mut fake, Message::ImageInfo { algo: Algorithm::Blake3, layout: Layout::flat(size, 4096).unwrap() });
    (fake, target)
}

#[test]
fn a_hostile_64_gib_claim_onto_a_small_file_system_is_refused_before_the_file_grows() {
    require_root("mounting a small tmpfs");
    let d = tempfile::tempdir().unwrap();
    let mnt = d.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let ok = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=4m", "tmpfs", s(&mnt)]).status();
    assert!(ok.unwrap().success(), "mount tmpfs");
    let b = mnt.join("b.img");
    std::fs::write(&b, noise(1, 4096)).unwrap();
    let (fake, target) = fake_source(&b, target_opts(), 64 << 30);
    let e = target.join().unwrap().unwrap_err().to_string();
    let size_after = std::fs::metadata(&b).unwrap().len();
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    drop(fake);
    assert!(e.contains("68719476736-byte image") && e.contains("b.img"), "{e}");
    assert_eq!(size_after, 4096, "the target file was resized");
}

#[test]
fn a_claim_over_the_configured_maximum_is_refused_before_the_file_exists() {
    let d = tempfile::tempdir().unwrap();
    let b = d.path().join("b.img");
    let opts = TargetOptions { max_image_size: Some(1 << 20), ..target_opts() };
    let (fake, target) = fake_source(&b, opts, 2 << 20);
    let e = target.join().unwrap().unwrap_err().to_string();
    drop(fake);
    assert!(e.contains("2097152-byte image, more than the 1048576-byte limit"), "{e}");
    assert!(!b.exists());
}

#[test]
fn blocks_before_their_keys_in_a_live_pass_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let b = d.path().join("b.img");
    let (mut fake, target) = fake_source(&b, target_opts(), 2 << 20);
    send(&mut fake, Message::PassBegin { pass: 1, final_pass: false, changed_blocks: 512 });
    // Group 0 holds data the target lacks: it asks for its block keys...
    send(&mut fake, Message::Groups { first: 0, digests: vec![[7; 32]] });
    // ...and gets blocks instead, for a group whose keys never came.
    let data = noise(9, 4096);
    let codec = xenmig::wire::compress::Codec::None.code();
    send(&mut fake, Message::Blocks { first_block: 0, count: 1, codec, raw_len: 4096, payload: data });
    let e = target.join().unwrap().unwrap_err().to_string();
    assert!(e.contains("blocks 0+1, which were not asked for in pass 1"), "{e}");
    // The source is told why.
    let mut said = String::new();
    while let Ok(m) = read_frame(&mut fake.reader, "t") {
        if let Message::WantDigests { .. } = m {
            said.push_str("want ");
        }
    }
    assert!(said.contains("want"), "the target never asked for keys");
}

#[test]
fn a_target_flooding_requests_without_reading_is_held_by_back_pressure() {
    use std::os::unix::net::UnixStream;
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a.img");
    sample_image(&a, 4, 256);
    let (x, y) = UnixStream::pair().unwrap();
    let ctl = y.try_clone().unwrap();
    let src_link = Link::new(x.try_clone().unwrap(), x);
    let mut fake = Link::new(y.try_clone().unwrap(), y);
    let source = thread::spawn(move || {
        SourceSession::start(&a, &source_opts(false), src_link, Progress::hidden()).and_then(|mut s| s.final_pass())
    });
    handshake(&mut fake.reader, &mut fake.writer, Role::Target, 0).unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let flood = thread::spawn(move || {
        for i in 0..200_000u64 {
            if write_message(&mut fake.writer, &Message::Fetch { first_block: i % 256, count: 1 }).is_err() {
                return;
            }
            if i % 256 == 0 && fake.writer.flush().is_err() {
                return;
            }
            counter.fetch_add(1, Ordering::Relaxed);
        }
        let _ = fake.writer.flush();
    });
    thread::sleep(Duration::from_secs(3));
    let n1 = sent.load(Ordering::Relaxed);
    thread::sleep(Duration::from_secs(1));
    let n2 = sent.load(Ordering::Relaxed);
    // The source stopped reading once its queue was full: the flood stalls
    // (the queue, the replies in flight and the socket buffers hold the rest).
    eprintln!("flood: {n1} then {n2} requests written");
    assert_eq!(n1, n2, "the flood still moves: {n1} then {n2}");
    assert!(n2 < 60_000, "{n2} requests were taken in");
    ctl.shutdown(std::net::Shutdown::Both).unwrap();
    assert!(source.join().unwrap().is_err());
    flood.join().unwrap();
}

#[test]
fn a_claim_whose_block_state_exceeds_memory_is_refused() {
    let layout = Layout::flat(1 << 50, 512).unwrap();
    let e = target::check_memory(&layout).unwrap_err().to_string();
    assert!(e.contains("1125899906842624-byte image of 2199023255552 blocks"), "{e}");
    assert!(target::check_memory(&Layout::flat(1 << 30, 4096).unwrap()).is_ok());
}

#[test]
fn a_target_busy_hashing_a_reference_longer_than_the_timeout_keeps_the_source_waiting() {
    let d = tempfile::tempdir().unwrap();
    let (a, b, r) = (d.path().join("a.img"), d.path().join("b.img"), d.path().join("ref.img"));
    sample_image(&a, 5, 256);
    // A large sparse reference (8 GiB: several seconds to read even on an idle
    // machine): hashing it keeps the target busy, silent but
    // for its keep-alives, for longer than the source's timeout.
    std::fs::File::create(&r).unwrap().set_len(8 << 30).unwrap();
    let (src_link, tgt_link) = Link::pair().unwrap();
    let t = Instant::now();
    let opts = TargetOptions { references: vec![r], ..target_opts() };
    let target = spawn_target(&b, opts, tgt_link);
    let report = SourceSession::start(&a, &source_opts(false), src_link, Progress::hidden())
        .and_then(|mut s| {
            let r = s.final_pass()?;
            drop(s.finish(Duration::ZERO)?);
            Ok(r)
        })
        .unwrap();
    let took = t.elapsed();
    assert!(report.verified);
    assert!(target.join().unwrap().unwrap().verified);
    eprintln!("target busy copy took {took:?}");
    assert!(took > IDLE * 2, "the reference hashed too fast ({took:?}) to show anything");
}

/// A peer that never says Hello (a link that stalled before the first
/// frame) holds neither end past its idle timeout (found by the fault
/// matrix: both ends waited forever).
#[test]
fn a_peer_that_never_says_hello_fails_either_end_within_the_timeout() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    sample_image(&a, 5, 64);
    let (src_link, silent_tgt) = Link::pair().unwrap();
    let t = Instant::now();
    let e = SourceSession::start(&a, &source_opts(false), src_link, Progress::hidden()).err().expect("fails");
    assert!(e.to_string().contains("the target sent nothing for 2."), "{e}");
    assert!(t.elapsed() < IDLE * 3, "the source waited {:?}", t.elapsed());
    let (tgt_link, silent_src) = Link::pair().unwrap();
    let t = Instant::now();
    let e = spawn_target(&b, target_opts(), tgt_link).join().unwrap().unwrap_err();
    assert!(e.to_string().contains("the source sent nothing for 2."), "{e}");
    assert!(t.elapsed() < IDLE * 3, "the target waited {:?}", t.elapsed());
    assert!(!b.exists(), "DST was created");
    drop((silent_tgt, silent_src));
}
