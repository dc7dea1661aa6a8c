//! Replays every seed (fuzz/corpus/<target>/) and every minimised crash
//! (fuzz/regressions/<target>/) through the fuzz target bodies, so that CI
//! runs them without AFL. `generate_seed_corpus` (ignored) rewrites the
//! generated seeds: `cargo test --test fuzz_corpus -- --ignored`.

mod fuzz_targets;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;

use fuzz_targets::TARGETS;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut v: Vec<PathBuf> = rd.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
    v.sort();
    v
}

fn replay(kind: &str) -> usize {
    let mut n = 0;
    for (name, body) in TARGETS {
        for f in files(&root().join(kind).join(name)) {
            let data = std::fs::read(&f).unwrap();
            eprintln!("{kind}/{name}: {}", f.display());
            body(&data);
            n += 1;
        }
    }
    n
}

#[test]
fn every_seed_replays() {
    let n = replay("corpus");
    // Every target has seeds.
    for (name, _) in TARGETS {
        assert!(!files(&root().join("corpus").join(name)).is_empty(), "no seeds for {name}");
    }
    assert!(n >= TARGETS.len());
}

#[test]
fn every_regression_replays() {
    replay("regressions");
}

/// Bodies must also take the degenerate inputs.
#[test]
fn empty_and_tiny_inputs() {
    for (_, body) in TARGETS {
        for d in [&[][..], &[0], &[0xff; 7], &[1, 13, 0, 0, 0]] {
            body(d);
        }
    }
}

// ---- seed generation -------------------------------------------------

struct Tee<W> {
    inner: W,
    log: Arc<Mutex<Vec<u8>>>,
}
impl<W: Write> Write for Tee<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        self.log.lock().unwrap().extend_from_slice(&b[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Run a whole local copy of the fuzz source image with `flags` (see
/// `source_options`) and return (what the source sent, what the target
/// sent), each without its Hello frame (the bodies prepend one).
fn record_copy(flags: u8, dst_prefill: Option<&[u8]>) -> (Vec<u8>, Vec<u8>) {
    use std::os::unix::net::UnixStream;
    use xenmig::copy::{source, target, Progress};
    use xenmig::wire::transport::Link;
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    let dst = d.path().join("dst.img");
    std::fs::write(&src, fuzz_targets::source_image()).unwrap();
    if let Some(p) = dst_prefill {
        std::fs::write(&dst, p).unwrap();
    }
    let (a, b) = UnixStream::pair().unwrap();
    let (src_log, tgt_log) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
    let sl = Link::new(a.try_clone().unwrap(), Tee { inner: a, log: src_log.clone() });
    let tl = Link::new(b.try_clone().unwrap(), Tee { inner: b, log: tgt_log.clone() });
    let opts = fuzz_targets::source_options(flags);
    let s = thread::spawn(move || source::run(&src, &opts, sl, &Progress::hidden()));
    target::run(&dst, &Default::default(), tl, &Progress::hidden()).unwrap();
    s.join().unwrap().unwrap();
    let strip = |v: &Arc<Mutex<Vec<u8>>>| {
        let v = v.lock().unwrap().clone();
        let mut r = &v[..];
        let m = xenmig::wire::protocol::read_message(&mut r, "hello").unwrap();
        assert!(matches!(m, xenmig::wire::protocol::Message::Hello { .. }));
        r.to_vec()
    };
    (strip(&src_log), strip(&tgt_log))
}

fn put(target: &str, name: &str, data: &[u8]) {
    let dir = root().join("corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), data).unwrap();
}

#[test]
#[ignore = "rewrites fuzz/corpus; run by hand"]
fn generate_seed_corpus() {
    use xenmig::blocks::blockmap::BlockMap;
    use xenmig::blocks::digest::Algorithm;
    use xenmig::blocks::layout::{Align, Layout};
    use xenmig::storage::image::Image;

    // Frame streams from real local copies: plain, flat, live, zstd (the
    // copy's stream: both ends of a recording take it); onto an empty DST
    // and onto a DST that already holds part of the image.
    let img = fuzz_targets::source_image();
    let mut half = img.clone();
    half[img.len() / 2..].fill(0);
    for (flags, prefill, name) in [
        (0u8, None, "plain"),
        (2 | 4, None, "flat-none"),
        (8, Some(&half[..]), "lz4-partial-dst"),
        (1, None, "live"),
        (12, None, "zstd-stream"),
    ] {
        let (from_source, from_target) = record_copy(flags, prefill);
        put("target_end", name, &from_source);
        let mut s = vec![flags];
        s.extend_from_slice(&from_target);
        put("source_end", name, &s);
        put("frames", &format!("{name}-source"), &from_source);
        put("frames", &format!("{name}-target"), &from_target);
    }

    // A real hash file and a real index of the same image, without their
    // 32-byte checksum (the body appends it).
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("img");
    std::fs::write(&p, &img).unwrap();
    let image = Image::open_read(&p).unwrap();
    for (align, bs, name) in [(Align::Partitions, 4096, "partitioned-4k"), (Align::Flat, 65536, "flat-64k")] {
        let layout = Layout::detect(&img[..512], img.len() as u64, bs, align).unwrap();
        let map = BlockMap::of_image(&image, layout, Algorithm::Blake3).unwrap();
        let h = d.path().join("h");
        xenmig::formats::hashfile::write(&map, &h).unwrap();
        let b = std::fs::read(&h).unwrap();
        put("hashfile", name, &b[..b.len() - 32]);
        let mut idx = xenmig::formats::index::Index::new(Algorithm::Blake3, bs);
        idx.add(p.clone(), &map);
        let i = d.path().join("i");
        idx.write(&i).unwrap();
        let b = std::fs::read(&i).unwrap();
        put("index", name, &b[..b.len() - 32]);
    }

    // Layouts: a sector-63 MBR (mode 0: detect), and explicit segments
    // (mode 3: from_segments, tiled).
    let mut l = vec![0u8];
    l.extend_from_slice(&(img.len() as u64).to_le_bytes());
    l.extend_from_slice(&3u32.to_le_bytes()); // 512 << 3 = 4096
    l.extend_from_slice(&img[..512]);
    put("layout", "mbr-sector-63", &l);
    let mut l = vec![3u8];
    l.extend_from_slice(&(8192u64 + 100).to_le_bytes());
    l.extend_from_slice(&3u32.to_le_bytes());
    l.push(2);
    for (s, n) in [(0u64, 100u64), (100, 8192)] {
        l.extend_from_slice(&s.to_le_bytes());
        l.extend_from_slice(&n.to_le_bytes());
    }
    put("layout", "two-segments", &l);
}

/// The generated seeds replay as complete, successful copies: a recorded
/// stream is a faithful seed only if it drives the end to the finish.
#[test]
fn recorded_streams_drive_a_whole_copy() {
    let dir = root().join("corpus").join("target_end");
    for f in files(&dir) {
        let data = std::fs::read(&f).unwrap();
        let d = tempfile::tempdir().unwrap();
        let mut prefix = xenmig::wire::protocol::Message::Hello {
            version: xenmig::wire::protocol::VERSION,
            role: xenmig::wire::protocol::Role::Source,
            caps: xenmig::wire::protocol::CAP_LIVE | xenmig::wire::protocol::CAP_ZSTD_STREAM,
        }
        .encode();
        prefix.extend_from_slice(&data);
        if f.file_name().unwrap() == "lz4-partial-dst" {
            continue; // recorded against a DST holding half the image
        }
        let link = xenmig::wire::transport::Link::new(std::io::Cursor::new(prefix), std::io::sink());
        let r = xenmig::copy::target::run(
            &d.path().join("dst"),
            &Default::default(),
            link,
            &xenmig::copy::Progress::hidden(),
        );
        let report = r.unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert!(report.verified);
        let mut got = Vec::new();
        std::fs::File::open(d.path().join("dst")).unwrap().read_to_end(&mut got).unwrap();
        assert!(got == fuzz_targets::source_image(), "{}: DST differs from the image", f.display());
    }
}
