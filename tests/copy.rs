//! End-to-end tests of `xenmig copy`, `hash` and `index` through the binary.

mod common;

use common::*;
use std::fs;

#[test]
fn fresh_copy_is_identical_sparse_and_reported() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    let data = sample_image(&a, 1, 2000);
    let v = copy_json(&[s(&a), s(&b)]);
    assert_eq!(fs::read(&b).unwrap(), data);
    assert_eq!(v["blocks_total"], 2000);
    assert_eq!(v["blocks_zero"], 400);
    assert_eq!(v["blocks_fetched"], 1600);
    // Zero blocks stay holes in a fresh file.
    use std::os::unix::fs::MetadataExt;
    let allocated = fs::metadata(&b).unwrap().blocks() * 512;
    assert!(allocated <= 1600 * 4096 + 65536, "{allocated} bytes allocated");
    // With no block shared, digests and framing cost at most 0.4% of an
    // image of incompressible data.
    let c = d.path().join("c.img");
    let dense = common::noise(8, 4096 * 4096);
    fs::write(&a, &dense).unwrap();
    // (--no-direct: a new DST would otherwise go direct, with no wire.)
    let w = copy_json(&["--no-direct", "--compress", "none", s(&a), s(&c)]);
    let overhead = w["bytes_wire"].as_u64().unwrap() - w["bytes_payload_wire"].as_u64().unwrap();
    assert!(overhead * 1000 <= 4 * dense.len() as u64, "overhead {overhead}: {w}");
    fs::write(&a, &data).unwrap();
    // The hash command agrees with the copy's digest.
    let out = run(&["hash", "--json", s(&a)]);
    let h: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(h["digest"], v["digest"]);
}

#[test]
fn copy_onto_an_older_copy_moves_only_what_changed() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    sample_image(&a, 2, 4096);
    copy_json(&[s(&a), s(&b)]);
    change_blocks(&a, 1000, 10, 99);
    let v = copy_json(&["--compress", "none", s(&a), s(&b)]);
    assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
    // (Every changed block fetched: none is found elsewhere.)
    assert_eq!(v["blocks_fetched"], 10, "{v}");
    assert!(v["blocks_in_place"].as_u64().unwrap() >= 4096 - 820 - 10);
    // Unchanged groups travel as group digests only.
    assert!(v["bytes_wire"].as_u64().unwrap() < 10 * 4096 + 20_000, "{v}");
}

/// `--readback` reaches the target end, local or spawned (`serve
/// --target`, here through `-s ""`), and the report says so; without it
/// the report says the target was not read back.
#[test]
fn readback_is_asked_for_and_reported() {
    let d = tempfile::tempdir().unwrap();
    let (a, b, c) = (d.path().join("a.img"), d.path().join("b.img"), d.path().join("c.img"));
    let data = sample_image(&a, 4, 600);
    let v = copy_json(&[s(&a), s(&b)]);
    assert_eq!(v["read_back"], false, "{v}");
    change_blocks(&a, 10, 3, 7);
    let v = copy_json(&["--readback", s(&a), s(&b)]);
    assert_eq!(v["read_back"], true, "{v}");
    let far = format!("h:{}", s(&c));
    let v = copy_json(&["--readback", "-s", "", "--remote-xenmig", s(&bin()), s(&a), &far]);
    assert_eq!(v["read_back"], true, "{v}");
    let want = fs::read(&a).unwrap();
    assert_ne!(want, data);
    assert_eq!(fs::read(&b).unwrap(), want);
    assert_eq!(fs::read(&c).unwrap(), want);
}

#[test]
fn precache_costs_at_most_a_ten_thousandth_of_the_image() {
    let d = tempfile::tempdir().unwrap();
    let (a, r, b) = (d.path().join("a.img"), d.path().join("ref.img"), d.path().join("b.img"));
    let data = sample_image(&a, 3, 16384); // 64 MiB
    fs::write(&r, &data).unwrap();
    // Identical data in a reference...
    let v = copy_json(&["-r", s(&r), s(&a), s(&b)]);
    assert_eq!(fs::read(&b).unwrap(), data);
    assert_eq!(v["blocks_fetched"], 0);
    let wire = v["bytes_wire"].as_u64().unwrap();
    assert!(wire * 10_000 <= data.len() as u64, "{wire} bytes on the wire");
    // ...and already in the target.
    let v = copy_json(&[s(&a), s(&b)]);
    assert!(v["bytes_wire"].as_u64().unwrap() * 10_000 <= data.len() as u64, "{v}");
    assert_eq!(v["blocks_in_place"], 16384 - 3277);
}

#[test]
fn references_by_index_and_by_image_supply_blocks() {
    let d = tempfile::tempdir().unwrap();
    let (a, r, b, idx) =
        (d.path().join("a.img"), d.path().join("r.img"), d.path().join("b.img"), d.path().join("r.xmi"));
    sample_image(&a, 4, 1000);
    // The reference holds the second half of a, shifted by 3 blocks.
    let data = fs::read(&a).unwrap();
    let mut rdata = common::noise(77, 3 * 4096);
    rdata.extend_from_slice(&data[500 * 4096..]);
    fs::write(&r, &rdata).unwrap();
    let out = run(&["index", "-o", s(&idx), s(&r)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for reference in [&idx, &r] {
        let _ = fs::remove_file(&b);
        let v = copy_json(&["-r", s(reference), s(&a), s(&b)]);
        assert_eq!(fs::read(&b).unwrap(), data);
        assert_eq!(v["blocks_reused"], 400, "{v}");
    }
}

#[test]
fn a_reference_changed_after_indexing_never_corrupts_the_target() {
    let d = tempfile::tempdir().unwrap();
    let (a, r, b, idx) =
        (d.path().join("a.img"), d.path().join("r.img"), d.path().join("b.img"), d.path().join("r.xmi"));
    let data = sample_image(&a, 5, 1000);
    fs::copy(&a, &r).unwrap();
    assert!(run(&["index", "-o", s(&idx), s(&r)]).status.success());
    // Scribble over the reference after indexing it.
    change_blocks(&r, 100, 300, 123);
    let v = copy_json(&["-r", s(&idx), s(&a), s(&b)]);
    assert_eq!(fs::read(&b).unwrap(), data);
    assert!(v["blocks_fetched"].as_u64().unwrap() >= 240, "{v}");
}

#[test]
fn every_codec_digest_and_block_size_round_trips() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a.img");
    // Compressible content with some odd tail.
    let mut data = Vec::new();
    for i in 0..600u32 {
        data.extend_from_slice(format!("line {i} of a text-like disk image block\n").repeat(20).as_bytes());
    }
    data.extend_from_slice(&[1, 2, 3]);
    fs::write(&a, &data).unwrap();
    let cases: &[&[&str]] = &[
        &["--compress", "none"],
        &["--compress", "lz4"],
        &["--compress", "zstd:5"],
        &["--compress", "zlib:9"],
        &["--compress", "auto"],
        &["--hash", "sha256", "--block-size", "512"],
        &["--hash", "sha1", "--block-size", "65536"],
        &["--block-size", "1048576"],
    ];
    for (i, extra) in cases.iter().enumerate() {
        let b = d.path().join(format!("b{i}.img"));
        // The wire protocol, not a direct copy (b is new): codecs apply.
        let mut args = vec!["--no-direct"];
        args.extend_from_slice(extra);
        args.extend([s(&a), s(&b)]);
        let v = copy_json(&args);
        assert_eq!(fs::read(&b).unwrap(), data, "{extra:?}");
        // The report says which codec the runs travelled with.
        let codecs = v["codecs"].as_object().unwrap();
        let fetched = v["bytes_fetched"].as_u64().unwrap();
        assert_eq!(codecs.values().map(|b| b.as_u64().unwrap()).sum::<u64>(), fetched, "{v}");
        if let Some(name) = extra[1].split(':').next().filter(|n| ["lz4", "zstd", "zlib"].contains(n)) {
            // Both ends are this build: zstd runs go through the copy's stream.
            let name = if name == "zstd" { "zstd-stream" } else { name };
            assert!(codecs.contains_key(name), "{extra:?}: {v}");
        }
        if extra[1].starts_with("zstd") || extra[1].starts_with("zlib") || extra[1] == "lz4" {
            assert!(
                v["bytes_payload_wire"].as_u64().unwrap() * 4 < v["bytes_fetched"].as_u64().unwrap(),
                "{extra:?} did not compress: {v}"
            );
        }
    }
}

#[test]
fn a_partition_at_sector_63_dedups_against_an_aligned_copy() {
    let d = tempfile::tempdir().unwrap();
    let (disk, fsimg, b) = (d.path().join("disk.img"), d.path().join("fs.img"), d.path().join("b.img"));
    // A "file system" of 1000 blocks, on its own (aligned) ...
    let fsdata = common::noise(6, 1000 * 4096);
    fs::write(&fsimg, &fsdata).unwrap();
    // ... and inside a disk with a legacy MBR partition starting at sector 63.
    let mut disk_data = vec![0u8; 63 * 512];
    let e = &mut disk_data[446..462];
    e[4] = 0x83;
    e[8..12].copy_from_slice(&63u32.to_le_bytes());
    e[12..16].copy_from_slice(&((fsdata.len() / 512) as u32).to_le_bytes());
    disk_data[510] = 0x55;
    disk_data[511] = 0xAA;
    disk_data.extend_from_slice(&fsdata);
    disk_data.extend_from_slice(&[0u8; 8192]);
    fs::write(&disk, &disk_data).unwrap();
    let v = copy_json(&["-r", s(&fsimg), s(&disk), s(&b)]);
    assert_eq!(fs::read(&b).unwrap(), disk_data);
    assert_eq!(v["blocks_reused"], 1000, "{v}");
    // Cut flat, almost nothing would have matched.
    let _ = fs::remove_file(&b);
    let v = copy_json(&["--align", "flat", "-r", s(&fsimg), s(&disk), s(&b)]);
    assert!(v["blocks_reused"].as_u64().unwrap() < 10, "{v}");
}

#[test]
fn hash_and_index_files_round_trip_and_damage_is_named() {
    let d = tempfile::tempdir().unwrap();
    let (a, h, i) = (d.path().join("a.img"), d.path().join("a.xmh"), d.path().join("a.xmi"));
    sample_image(&a, 7, 300);
    assert!(run(&["hash", "-o", s(&h), s(&a)]).status.success());
    assert!(run(&["index", "-o", s(&i), s(&a)]).status.success());
    let shown = run(&["show", s(&h)]);
    assert!(shown.status.success());
    assert!(String::from_utf8_lossy(&shown.stdout).contains("300 4096-byte blocks (60 zero)"));
    for f in [&h, &i] {
        let bytes = fs::read(f).unwrap();
        fs::write(f, &bytes[..bytes.len() - 7]).unwrap();
        let out = run(&["show", s(f)]);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(s(f)) && err.contains("truncated or corrupt"), "{err}");
    }
    // A damaged index given as a reference stops the copy before any write.
    let b = d.path().join("b.img");
    let out = run(&["copy", "-r", s(&i), s(&a), s(&b)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("a.xmi"));
}

#[test]
fn usage_errors_exit_2_and_help_teaches() {
    let out = run(&["copy", "--block-size", "3000", "a", "b"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("power of two"));
    let out = run(&["copy", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("[user@]host:path") && help.contains("--reference"));
    let out = run(&["copy", "/nonexistent/src.img", "/tmp/never.img"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/src.img"));
}

#[test]
fn similarity_counts_blocks_found_in_references_and_zeros_apart() {
    let d = tempfile::tempdir().unwrap();
    let (a, r) = (d.path().join("a.img"), d.path().join("r.img"));
    let data = sample_image(&a, 41, 1000);
    // The reference holds blocks 0..500 of a, then noise.
    let mut rdata = data[..500 * 4096].to_vec();
    rdata.extend_from_slice(&common::noise(42, 300 * 4096));
    fs::write(&r, &rdata).unwrap();
    let out = run(&["similarity", "--json", s(&a), "-r", s(&r)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["blocks_total"], 1000);
    assert_eq!(v["blocks_zero"], 200);
    assert_eq!(v["blocks_found"], 400);
    assert_eq!(v["blocks_missing"], 400);
    assert_eq!(v["found_percent_of_nonzero"], 50.0);
}
