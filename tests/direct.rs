//! The direct local copy (`copy::direct`): a new DST with nothing to reuse,
//! each block read, hashed and written once, no wire.

mod common;

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use xenmig::copy::direct;
use xenmig::copy::source::SourceOptions;
use xenmig::copy::target::TargetOptions;
use xenmig::copy::{EngineError, Progress};
use xenmig::storage::disk::Disk;
use xenmig::storage::image::Image;

/// An image of 4 KiB blocks (every fifth zero) plus a short non-zero tail.
fn image_with_tail(path: &Path, seed: u64, blocks: usize) -> Vec<u8> {
    let mut data = sample_image(path, seed, blocks);
    data.extend_from_slice(&noise(seed + 1, 1000));
    fs::write(path, &data).unwrap();
    data
}

#[test]
fn a_direct_copy_is_identical_sparse_counted_and_agrees_with_the_protocol() {
    let d = tempfile::tempdir().unwrap();
    let (a, b, c) = (d.path().join("a.img"), d.path().join("b.img"), d.path().join("c.img"));
    // 3 groups and a bit: several batches' worth of pieces, a short last block.
    let data = image_with_tail(&a, 11, 3 * 256 + 37);
    let blocks = data.len().div_ceil(4096) as u64;
    let zero = (0..3 * 256 + 37).step_by(5).count() as u64;
    let v = copy_json(&[s(&a), s(&b)]);
    assert_eq!(fs::read(&b).unwrap(), data);
    assert_eq!(v["direct"], true, "{v}");
    assert_eq!(v["blocks_total"], blocks);
    assert_eq!(v["blocks_zero"], zero, "{v}");
    assert_eq!(v["blocks_reused"], 0, "{v}");
    assert_eq!(v["blocks_fetched"], blocks - zero, "{v}");
    assert_eq!(v["bytes_fetched"].as_u64().unwrap(), data.len() as u64 - zero * 4096, "{v}");
    assert_eq!(v["bytes_wire"], 0, "{v}");
    // Zero blocks are holes: at most the non-zero bytes (and a little
    // file system slack) are allocated.
    let allocated = fs::metadata(&b).unwrap().blocks() * 512;
    assert!(allocated <= (blocks - zero) * 4096 + 65536, "{allocated} bytes allocated");
    // A new DST gets the source's permission bits, as over the wire.
    assert_eq!(fs::metadata(&b).unwrap().mode() & 0o777, fs::metadata(&a).unwrap().mode() & 0o777);
    // The wire protocol reaches the same digest and the same bytes ...
    let w = copy_json(&["--no-direct", s(&a), s(&c)]);
    assert_eq!(w["direct"], false, "{w}");
    assert!(w["bytes_wire"].as_u64().unwrap() > 0, "{w}");
    assert_eq!(w["digest"], v["digest"]);
    assert_eq!(fs::read(&c).unwrap(), data);
    // ... and so does `hash`.
    let out = run(&["hash", "--json", s(&a)]);
    let h: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(h["digest"], v["digest"]);
    // An existing DST may hold blocks to reuse: the protocol path, which
    // finds every block in place.
    let again = copy_json(&[s(&a), s(&b)]);
    assert_eq!(again["direct"], false, "{again}");
    assert_eq!(again["blocks_in_place"], blocks - zero, "{again}");
}

/// Other block sizes, digests and a partitioned layout (an MBR partition
/// at sector 63, cut from its own start) agree with the protocol too.
#[test]
fn direct_and_protocol_agree_on_every_layout_and_digest() {
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("disk.img");
    let fsdata = noise(6, 300 * 4096);
    let mut data = vec![0u8; 63 * 512];
    let e = &mut data[446..462];
    e[4] = 0x83;
    e[8..12].copy_from_slice(&63u32.to_le_bytes());
    e[12..16].copy_from_slice(&((fsdata.len() / 512) as u32).to_le_bytes());
    data[510] = 0x55;
    data[511] = 0xAA;
    data.extend_from_slice(&fsdata);
    data.extend_from_slice(&[0u8; 8192]);
    data.extend_from_slice(&noise(7, 777));
    fs::write(&disk, &data).unwrap();
    let cases: &[&[&str]] = &[
        &[],
        &["--align", "flat"],
        &["--hash", "sha256", "--block-size", "512"],
        &["--hash", "sha1", "--block-size", "65536"],
        &["--block-size", "1048576"],
    ];
    for (i, extra) in cases.iter().enumerate() {
        let (b, c) = (d.path().join(format!("b{i}.img")), d.path().join(format!("c{i}.img")));
        let with = |more: &[&str], to: &Path| {
            let mut args: Vec<&str> = more.to_vec();
            args.extend_from_slice(extra);
            args.extend([s(&disk), s(to)]);
            copy_json(&args)
        };
        let v = with(&[], &b);
        let w = with(&["--no-direct"], &c);
        assert_eq!(v["direct"], true, "{extra:?}: {v}");
        assert_eq!(fs::read(&b).unwrap(), data, "{extra:?}");
        assert_eq!(v["digest"], w["digest"], "{extra:?}");
        for k in ["blocks_total", "blocks_zero", "blocks_fetched", "bytes_fetched"] {
            assert_eq!(v[k], w[k], "{extra:?} {k}: {v} / {w}");
        }
    }
}

/// `--readback` is honoured by a direct copy: the report says DST was read
/// back from the device.
#[test]
fn a_direct_copy_reads_back_when_asked() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    let data = image_with_tail(&a, 3, 600);
    let v = copy_json(&["--readback", s(&a), s(&b)]);
    assert_eq!(v["direct"], true, "{v}");
    assert_eq!(v["read_back"], true, "{v}");
    assert_eq!(fs::read(&b).unwrap(), data);
}

#[test]
fn a_copy_onto_the_source_itself_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a.img");
    let data = image_with_tail(&a, 5, 100);
    let link = d.path().join("link.img");
    std::os::unix::fs::symlink(&a, &link).unwrap();
    for dst in [&a, &link] {
        let out = run(&["copy", s(&a), s(dst)]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("same file"), "{err}");
        assert_eq!(fs::read(&a).unwrap(), data, "the source was touched");
    }
}

/// What a DST wrapper does to the source at DST's first write.
#[derive(Clone, Copy, Debug)]
enum Meddle {
    /// Rewrite the source's first block in place (same size).
    Rewrite,
    /// Append a block to the source.
    Grow,
    /// Cut the source to one group.
    Truncate,
}

/// DST as a real file, except that its first write changes the source:
/// the copy is then mid-way, deterministically.
#[derive(Debug)]
struct Meddler {
    inner: Image,
    src: PathBuf,
    how: Meddle,
    done: AtomicBool,
}

impl Disk for Meddler {
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn size(&self) -> u64 {
        Disk::size(&self.inner)
    }
    fn is_block_device(&self) -> bool {
        Disk::is_block_device(&self.inner)
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.pread(buf, offset)
    }
    fn pwrite(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        if !self.done.swap(true, Ordering::SeqCst) {
            use std::os::unix::fs::FileExt;
            let f = fs::OpenOptions::new().write(true).open(&self.src).unwrap();
            match self.how {
                Meddle::Rewrite => f.write_all_at(&noise(99, 4096), 0).unwrap(),
                Meddle::Grow => f.write_all_at(&noise(98, 4096), f.metadata().unwrap().len()).unwrap(),
                Meddle::Truncate => f.set_len(1 << 20).unwrap(),
            }
        }
        self.inner.pwrite(buf, offset)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.inner.punch_hole(offset, len)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn drop_cache(&self) {
        Disk::drop_cache(&self.inner)
    }
    fn evict(&self, offset: u64, len: u64) {
        self.inner.evict(offset, len)
    }
}

/// A source written, grown or cut while a direct copy reads it (which
/// reads it only once) fails the copy, naming the source, never a copy
/// reported verified.
#[test]
fn a_source_that_changes_during_a_direct_copy_fails_clearly() {
    for how in [Meddle::Rewrite, Meddle::Grow, Meddle::Truncate] {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
        // 40 groups: reads go on well after the first write.
        sample_image(&a, 21, 40 * 256);
        let src = a.clone();
        let wrap = move |img: Image| -> Box<dyn Disk> {
            Box::new(Meddler { inner: img, src: src.clone(), how, done: AtomicBool::new(false) })
        };
        let r =
            direct::copy_with(&a, &b, &SourceOptions::default(), &TargetOptions::default(), &Progress::hidden(), &wrap);
        let e = r.expect_err("a changed source was copied as verified");
        let msg = e.to_string();
        match how {
            Meddle::Truncate => assert!(
                matches!(e, EngineError::SourceChanged { .. }) || msg.contains("did it shrink"),
                "{how:?}: {msg}"
            ),
            _ => assert!(matches!(e, EngineError::SourceChanged { .. }), "{how:?}: {msg}"),
        }
        assert!(msg.contains("a.img"), "{how:?}: {msg}");
    }
}

/// DST failing a write (EIO mid-way, or ENOSPC on the first write) fails
/// a direct copy with the write's error, naming DST and the offset; it
/// neither hangs nor reports the copy verified. The source is untouched.
#[test]
fn a_write_error_fails_a_direct_copy_naming_dst() {
    use xenmig::storage::faulty::{Fault, FaultPlan, FaultyDisk, Op, Rule};
    for (rule, errno) in [
        (Rule::once_at(Op::Write, 5 << 20, 6 << 20, Fault::Errno(libc::EIO)), "Input/output error"),
        (Rule::always(Op::Write, Fault::Errno(libc::ENOSPC)), "No space left"),
    ] {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
        let data = sample_image(&a, 31, 40 * 256);
        let plan = FaultPlan::new(vec![rule], true);
        let p = plan.clone();
        let wrap = move |img: Image| -> Box<dyn Disk> { Box::new(FaultyDisk::new(Box::new(img), p.clone())) };
        let r =
            direct::copy_with(&a, &b, &SourceOptions::default(), &TargetOptions::default(), &Progress::hidden(), &wrap);
        let msg = r.expect_err("a failed write was reported verified").to_string();
        assert!(msg.contains("b.img") && msg.contains(errno) && msg.contains("offset"), "{msg}");
        assert!(plan.fired() >= 1);
        assert_eq!(fs::read(&a).unwrap(), data);
    }
}
