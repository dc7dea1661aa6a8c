//! Bodies of the fuzz targets, shared by the AFL binaries under `fuzz/`
//! (included there with `#[path]`) and by `tests/fuzz_corpus.rs`, which
//! replays every seed and regression through them without AFL.
//!
//! Each body takes arbitrary bytes and must return normally: a panic (or
//! an abort, or a hang) is a finding. Besides "does not panic", some bodies
//! check properties of what was accepted (a layout's extents stay inside
//! the image; the source never writes its image; the target writes nothing
//! but DST). docs/fuzzing.md says what each one covers.

#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use xenmig::blocks::layout::{Align, Layout, Segment};
use xenmig::copy::source::{self, LiveOptions, SourceOptions};
use xenmig::copy::target::{self, TargetOptions};
use xenmig::copy::Progress;
use xenmig::wire::protocol::{
    read_message, Message, Role, CAP_DELTA_BATCH, CAP_LIVE, CAP_SHORT_SUB_HASHES, CAP_SUB_DELTA, CAP_SUB_GROUPS,
    CAP_ZSTD_STREAM, VERSION,
};
use xenmig::wire::transport::Link;

/// A fuzz target's body: one input, any bytes.
pub type Body = fn(&[u8]);

/// Every target: its name (the directory under fuzz/corpus/ and
/// fuzz/regressions/) and its body.
pub const TARGETS: &[(&str, Body)] = &[
    ("frames", frames),
    ("target_end", target_end),
    ("source_end", source_end),
    ("hashfile", hashfile),
    ("index", index),
    ("layout", layout),
    ("xenstore", xenstore),
    ("lvm", lvm),
];

/// Largest image the target end is allowed to create from a fuzzed
/// ImageInfo. The target keeps ~40 bytes of state per block of the size the
/// source declares (see docs/fuzzing.md, "findings"), so an unbounded
/// declared size only measures how fast the machine runs out of memory.
pub const TARGET_MAX_SIZE: u64 = 64 << 20;
pub const TARGET_MAX_BLOCKS: u64 = 1 << 14;

/// Temporary files go to tmpfs when there is one: cheaper per execution.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new().prefix("xenmig-fuzz").tempdir_in(shm) {
            return d;
        }
    }
    tempfile::Builder::new().prefix("xenmig-fuzz").tempdir().expect("a temporary directory")
}

/// Target 1: the frame decoder, over a stream of arbitrary bytes, until
/// it fails or the stream ends.
pub fn frames(data: &[u8]) {
    let mut r = data;
    // Every successful frame consumes at least its 5-byte header, so this
    // ends; the bound is belt and braces.
    for _ in 0..=data.len() {
        match read_message(&mut r, "fuzz") {
            Ok(m) => {
                // What decodes re-encodes to a frame that decodes the same.
                let bytes = m.encode();
                let back = read_message(&mut &bytes[..], "fuzz re-encode").expect("a decoded frame re-decodes");
                assert_eq!(back, m, "a decoded frame re-encodes differently");
            }
            Err(_) => return,
        }
    }
    panic!("read_message returned Ok without consuming input");
}

/// A reader over the fuzz input behind a fixed prefix, then EOF.
fn input_reader(prefix: Vec<u8>, data: &[u8]) -> impl Read + Send + 'static {
    io::Cursor::new(prefix).chain(io::Cursor::new(data.to_vec()))
}

/// A writer that takes and forgets everything (the peer never reads).
struct Discard;
impl Write for Discard {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn hello(role: Role, caps: u32) -> Vec<u8> {
    Message::Hello { version: VERSION, role, caps }.encode()
}

/// Whether the input's first frame is an ImageInfo too large to run (see
/// [`TARGET_MAX_SIZE`]).
fn oversized_image_info(data: &[u8]) -> bool {
    match read_message(&mut &data[..], "fuzz") {
        Ok(Message::ImageInfo { layout, .. }) => {
            layout.size > TARGET_MAX_SIZE || layout.block_count() > TARGET_MAX_BLOCKS
        }
        _ => false,
    }
}

/// Target 2a: the target end of a copy, fed the fuzz input as everything
/// the source says after a valid source Hello, onto a new DST in an empty
/// directory. Whatever happens, nothing but DST may appear there, and DST
/// may not be larger than the size the source declared.
pub fn target_end(data: &[u8]) {
    if oversized_image_info(data) {
        return;
    }
    let dir = scratch();
    let dst = dir.path().join("dst.img");
    let link = Link::new(input_reader(hello(Role::Source, CAP_LIVE | CAP_ZSTD_STREAM), data), Discard);
    let r = target::run(&dst, &TargetOptions::default(), link, &Progress::hidden());
    let names: Vec<PathBuf> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(names.iter().all(|p| p == &dst), "the target wrote beside DST: {names:?}");
    if let Ok(Message::ImageInfo { layout, .. }) = read_message(&mut &data[..], "fuzz") {
        if let Ok(m) = std::fs::metadata(&dst) {
            assert!(m.len() <= layout.size, "DST grew past the declared size");
        }
    }
    if let Ok(report) = r {
        assert!(report.verified, "the target returned Ok without verifying");
    }
}

/// The fixed image the source end serves: an MBR with a partition at
/// sector 63 (so the layout has three segments), some data, some zeros;
/// about 1.1 MiB, two groups at 4 KiB blocks.
pub fn source_image() -> Vec<u8> {
    let size = 63 * 512 + 260 * 4096 + 1000;
    let mut img = vec![0u8; size];
    let lba = 63u32;
    let sectors = (260 * 4096 / 512) as u32;
    let e = &mut img[446..462];
    e[4] = 0x83;
    e[8..12].copy_from_slice(&lba.to_le_bytes());
    e[12..16].copy_from_slice(&sectors.to_le_bytes());
    img[510] = 0x55;
    img[511] = 0xAA;
    // Data in some blocks, a repeated block, zeros elsewhere.
    let mut x: u32 = 0x1234_5678;
    for b in [1usize, 2, 3, 9, 100, 255, 256, 259] {
        let off = 63 * 512 + b * 4096;
        for byte in &mut img[off..off + 4096] {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *byte = x as u8;
        }
    }
    let (a, b) = (63 * 512 + 4096, 63 * 512 + 20 * 4096);
    let copy = img[a..a + 4096].to_vec();
    img[b..b + 4096].copy_from_slice(&copy);
    let tail = img.len() - 700;
    img[tail..tail + 300].fill(7);
    img
}

/// The source options byte 0 of a source-end input selects.
pub fn source_options(flags: u8) -> SourceOptions {
    let mut o = SourceOptions::default();
    if flags & 1 != 0 {
        o.live = Some(LiveOptions { max_passes: 3, converge_blocks: 16, ..LiveOptions::default() });
    }
    if flags & 2 != 0 {
        o.align = Align::Flat;
    }
    o.compress = match (flags >> 2) & 3 {
        0 => xenmig::wire::compress::Choice::Auto,
        1 => "none".parse().unwrap(),
        2 => "lz4".parse().unwrap(),
        _ => "zstd".parse().unwrap(),
    };
    o
}

/// Target 2b: the source end serving [`source_image`], fed everything the
/// target says after a valid target Hello. Byte 0 picks the options (see
/// [`source_options`]); the rest is the stream. The image must be left
/// unchanged.
pub fn source_end(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else { return };
    let dir = scratch();
    let path = dir.path().join("src.img");
    let img = source_image();
    std::fs::write(&path, &img).unwrap();
    let caps = CAP_LIVE | CAP_ZSTD_STREAM | CAP_SUB_DELTA | CAP_SUB_GROUPS | CAP_SHORT_SUB_HASHES | CAP_DELTA_BATCH;
    let link = Link::new(input_reader(hello(Role::Target, caps), rest), Discard);
    let _ = source::run(&path, &source_options(flags), link, &Progress::hidden());
    assert!(std::fs::read(&path).unwrap() == img, "the source changed its image");
    let names: Vec<PathBuf> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(names, vec![path], "the source wrote beside its image");
}

/// A persisted file with a valid checksum: the input followed by its
/// BLAKE3, so that the fuzzer reaches the body parser instead of stopping
/// at the checksum (a single comparison, also exercised: an input of under
/// 42 bytes, or one whose magic is wrong, is refused before it).
fn with_checksum(dir: &Path, data: &[u8]) -> PathBuf {
    let p = dir.join("f");
    let mut b = data.to_vec();
    b.extend_from_slice(blake3::hash(data).as_bytes());
    std::fs::write(&p, b).unwrap();
    p
}

/// Target 3a: the hash file reader.
pub fn hashfile(data: &[u8]) {
    let dir = scratch();
    let p = with_checksum(dir.path(), data);
    if let Ok(map) = xenmig::formats::hashfile::read(&p) {
        assert_eq!(map.digests.len() as u64, map.layout.block_count());
        assert_eq!(map.zero.len(), map.digests.len());
        assert_eq!(map.groups.len() as u64, map.layout.group_count());
    }
}

/// Target 3b: the index reader.
pub fn index(data: &[u8]) {
    let dir = scratch();
    let p = with_checksum(dir.path(), data);
    if let Ok(idx) = xenmig::formats::index::Index::read(&p) {
        let _ = idx.find_block(&[0; xenmig::blocks::digest::KEY_LEN]);
        let _ = idx.find_group(&[0xff; xenmig::blocks::digest::KEY_LEN]);
    }
}

struct Bytes<'a>(&'a [u8]);
impl Bytes<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

/// Check what a layout promises, on a sample of its blocks (a fuzzed
/// layout may have 2^44 of them).
fn check_layout(l: &Layout) {
    let n = l.block_count();
    let covered: u64 = l.segments.iter().map(|s| s.len).sum();
    assert_eq!(covered, l.size, "segments do not cover the image");
    if n == 0 {
        assert_eq!(l.size, 0);
        return;
    }
    let mut sample: Vec<u64> = vec![0, 1, n / 2, n.saturating_sub(2), n - 1];
    // The first and last block of every segment.
    let bs = l.block_size as u64;
    let mut first = 0u64;
    for s in l.segments.iter().take(64) {
        let count = s.len.div_ceil(bs);
        sample.extend([first, first + count - 1]);
        first += count;
    }
    for i in sample.into_iter().filter(|&i| i < n) {
        let (off, len) = l.extent(i);
        assert!(len > 0 && len as u64 <= bs, "block {i} has length {len}");
        let end = off.checked_add(len as u64).expect("an extent wraps around");
        assert!(end <= l.size, "block {i} ends at {end}, past {}", l.size);
        assert_eq!(l.block_at(off), i, "block_at does not invert extent at block {i}");
        assert_eq!(l.block_at(end - 1), i, "block_at does not invert extent at the end of block {i}");
        let g = i / l.group_blocks();
        assert!(g < l.group_count());
        let (a, b) = l.group_range(g);
        assert!(a <= i && i < b && b <= n);
    }
}

/// Target 4: partition-table detection and explicit layouts. Byte 0
/// picks the entry point; then the numbers.
pub fn layout(data: &[u8]) {
    let mut b = Bytes(data);
    let mode = b.u8();
    let size = b.u64();
    let bs_raw = b.u32();
    // Mostly valid block sizes, sometimes anything.
    let bs = if mode & 0x80 != 0 { bs_raw } else { 512u32 << (bs_raw % 12) };
    let l = if mode & 1 == 0 {
        let mut sector = [0u8; 512];
        let rest = b.0;
        let n = rest.len().min(512);
        // The table is what matters: put short inputs at its offset.
        if n <= 66 {
            sector[446..446 + n].copy_from_slice(&rest[..n]);
            if mode & 2 != 0 {
                sector[510] = 0x55;
                sector[511] = 0xAA;
            }
        } else {
            sector[..n].copy_from_slice(&rest[..n]);
        }
        let align = if mode & 4 != 0 { Align::Flat } else { Align::Partitions };
        if let Some(parts) = xenmig::blocks::layout::mbr_partitions(&sector, size) {
            for p in &parts {
                assert!(p.start + p.len <= size, "a partition past the image");
            }
        }
        Layout::detect(&sector, size, bs, align)
    } else {
        let nseg = (b.u8() % 17) as usize;
        let mut segs = Vec::with_capacity(nseg);
        for _ in 0..nseg {
            segs.push(Segment { start: b.u64(), len: b.u64() });
        }
        // Half the time make the segments tile from 0 (only the lengths
        // are fuzzed), or the fuzzer rarely gets past the first check.
        if mode & 2 != 0 {
            let mut pos = 0u64;
            for s in &mut segs {
                s.start = pos;
                pos = pos.wrapping_add(s.len);
            }
        }
        Layout::from_segments(size, bs, segs)
    };
    if let Ok(l) = l {
        check_layout(&l);
    }
}

/// Target 5: the xenstore disk records: a `xenstore-ls -f` dump, disks of
/// a few domains, and the params and backend-path parsers on every value
/// and path of the dump.
pub fn xenstore(data: &[u8]) {
    use xenmig::xen::disk::{disks_of, parse_backend_path, parse_params, MemStore, XenstoreRead};
    let text = String::from_utf8_lossy(data);
    let xs = MemStore::from_xenstore_ls(&text);
    for domid in [0, 1, 3, u32::MAX] {
        for d in disks_of(&xs, domid) {
            let _ = d.lv.as_ref().map(|lv| lv.dev_path());
        }
    }
    let _ = xs.list("/");
    let _ = xs.list("/local/domain");
    for (k, v) in xs.0.iter().take(256) {
        let _ = parse_backend_path(k);
        let _ = parse_params(v);
        let _ = xs.list(k);
        let _ = xenmig::storage::lvm::LvRef::from_device_path(v);
    }
    for line in text.lines().take(256) {
        let _ = parse_params(line);
        let _ = parse_backend_path(line);
    }
}

/// Target 6: lvm's JSON reports (`lvs`, `vgs`) and what is derived from
/// an LV record.
pub fn lvm(data: &[u8]) {
    use xenmig::storage::lvm::{parse_lvs, parse_vgs, LvRef};
    let text = String::from_utf8_lossy(data);
    if let Ok(lvs) = parse_lvs(&text) {
        for lv in &lvs {
            let _ = (lv.is_open(), lv.is_snapshot(), lv.is_active(), lv.lv_ref().dev_path());
            let _ = lv.matches("/dev/vg0/g1");
        }
    }
    let _ = parse_vgs(&text);
    let _ = LvRef::from_dm_name(&text);
    let _ = LvRef::from_device_path(&text);
}
