//! The configuration file through the binary: precedence (default < file <
//! host section < flag), `xenmig config`, and errors naming file, line and
//! key. Every run names its own file with `--config` or `XENMIG_CONFIG`,
//! never the real /etc/xenmig/xenmig.yaml.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn xenmig(config_env: Option<&Path>, args: &[&str]) -> Output {
    let mut c = Command::new(bin());
    // Empty: no configuration file at all (the real /etc is never read).
    c.env("XENMIG_CONFIG", config_env.map(|p| p.as_os_str().to_owned()).unwrap_or_default());
    c.args(args).output().unwrap()
}

fn write_config(dir: &Path, text: &str) -> std::path::PathBuf {
    let p = dir.join("xenmig.yaml");
    fs::write(&p, text).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    p
}

/// `xenmig config` output as (key, value, origin) rows.
fn rows(out: &Output) -> Vec<(String, String, String)> {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let cols: Vec<&str> = l.splitn(2, "  ").collect();
            let rest = cols[1].trim_start();
            let (value, origin) = rest.split_once("  ").expect("value and origin");
            (cols[0].trim().to_string(), value.trim().to_string(), origin.trim().to_string())
        })
        .collect()
}

fn row(rows: &[(String, String, String)], key: &str) -> (String, String) {
    let r = rows.iter().find(|r| r.0 == key).unwrap_or_else(|| panic!("no row {key}: {rows:?}"));
    (r.1.clone(), r.2.clone())
}

const CONFIG: &str = "\
ssh: ssh -o BatchMode=yes
compress: zstd:5
block_size: 8192
migrate:
  max_passes: 4
hosts:
  host2:
    ssh: ssh -p 2222
    target_vg: vg1
";

/// `migrate --source-reference` takes the file's top-level
/// `source_references` (paths on the source's host, never a host
/// section's), and the flag over it.
#[test]
fn migrate_takes_source_references_from_the_file_or_the_flag() {
    let d = tempfile::tempdir().unwrap();
    let cfg = write_config(d.path(), "source_references: [/dev/vg0/debian12]\n");
    let f = cfg.display().to_string();
    let r = rows(&xenmig(Some(&cfg), &["config", "--", "migrate", "web1", "host2"]));
    assert_eq!(row(&r, "source_references"), ("/dev/vg0/debian12".into(), format!("{f}:1")));
    let r =
        rows(&xenmig(Some(&cfg), &["config", "--", "migrate", "--source-reference", "/dev/vg0/tmpl", "web1", "host2"]));
    assert_eq!(row(&r, "source_references"), ("/dev/vg0/tmpl".into(), "flag".into()));
}

#[test]
fn precedence_default_file_host_flag() {
    let d = tempfile::tempdir().unwrap();
    let cfg = write_config(d.path(), CONFIG);
    let f = cfg.display().to_string();
    // No file: defaults.
    let r = rows(&xenmig(None, &["config", "--host", "host2"]));
    assert_eq!(row(&r, "ssh"), ("ssh".into(), "default".into()));
    // The file's top level, for a host without a section.
    let r = rows(&xenmig(Some(&cfg), &["config", "--host", "host3"]));
    assert_eq!(row(&r, "ssh"), ("ssh -o BatchMode=yes".into(), format!("{f}:1")));
    assert_eq!(row(&r, "compress"), ("zstd:5".into(), format!("{f}:2")));
    assert_eq!(row(&r, "migrate.max_passes"), ("4".into(), format!("{f}:5")));
    assert_eq!(row(&r, "migrate.target_vg").1, "default");
    // The host section over the top level (user@ is not part of the name).
    let r = rows(&xenmig(Some(&cfg), &["config", "--host", "root@host2"]));
    assert_eq!(row(&r, "ssh"), ("ssh -p 2222".into(), format!("host section host2, {f}:8")));
    assert_eq!(row(&r, "migrate.target_vg"), ("vg1".into(), format!("host section host2, {f}:9")));
    assert_eq!(row(&r, "compress").1, format!("{f}:2"));
    // A flag over everything; --config over XENMIG_CONFIG.
    let r = rows(&xenmig(
        None,
        &[
            "--config",
            &f,
            "config",
            "--",
            "migrate",
            "-s",
            "rsh",
            "--target-vg",
            "vg9",
            "--max-passes",
            "3",
            "web1",
            "host2",
        ],
    ));
    assert_eq!(row(&r, "ssh"), ("rsh".into(), "flag".into()));
    assert_eq!(row(&r, "migrate.target_vg"), ("vg9".into(), "flag".into()));
    assert_eq!(row(&r, "migrate.max_passes"), ("3".into(), "flag".into()));
    assert_eq!(row(&r, "compress").1, format!("{f}:2"));
    // A copy's host is its remote end's.
    let r = rows(&xenmig(Some(&cfg), &["config", "--", "copy", "--compress", "lz4", "img", "root@host2:/dev/vg0/x"]));
    assert_eq!(row(&r, "ssh").1, format!("host section host2, {f}:8"));
    assert_eq!(row(&r, "compress"), ("lz4".into(), "flag".into()));
}

#[test]
fn a_real_copy_uses_the_file_and_flags_override_it() {
    let d = tempfile::tempdir().unwrap();
    let cfg = write_config(d.path(), "block_size: 8192\nhash: sha256\n");
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    sample_image(&a, 3, 256);
    // block_size 8192 from the file: 128 blocks of the 1 MiB image.
    let out = xenmig(Some(&cfg), &["copy", "--json", s(&a), s(&b)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["blocks_total"], 128);
    assert_eq!(v["algorithm"], "sha256");
    // The flag wins.
    fs::remove_file(&b).unwrap();
    let out = xenmig(Some(&cfg), &["copy", "--json", "--block-size", "4096", s(&a), s(&b)]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["blocks_total"], 256);
    assert_eq!(v["algorithm"], "sha256");
}

#[test]
fn errors_name_file_line_and_key() {
    let d = tempfile::tempdir().unwrap();
    let cases = [
        ("ssh: ssh\nbwlimt: 5M\n", ":2: bwlimt: unknown key"),
        ("hosts:\n  h2:\n    compress: lz4\n", ":3: hosts.h2.compress: unknown key"),
        ("migrate:\n  max_passes: lots\n", ":2: migrate.max_passes: invalid"),
        ("block_size: 1000\n", ":1: block_size: "),
        ("hash: md5\n", ":1: hash: unknown digest"),
        ("compress: zstd:99\n", ":1: compress: zstd level 99"),
        ("migrate:\n  rescan: never\n", ":2: migrate.rescan: unknown rescan"),
        ("references: /dev/vg0/a\n", ":1: references: "),
        ("hosts:\n  h2:\n    bwlimit: 3Q\n", ":3: hosts.h2.bwlimit: bad rate"),
    ];
    for (text, want) in cases {
        let cfg = write_config(d.path(), text);
        for args in [&["copy", "a", "b"][..], &["migrate", "web1", "h2"], &["config"]] {
            let out = xenmig(Some(&cfg), args);
            assert_eq!(out.status.code(), Some(1), "{text}");
            let err = String::from_utf8_lossy(&out.stderr);
            let want = format!("config {}{want}", cfg.display());
            assert!(err.contains(&want), "{text}: {err} lacks {want}");
        }
    }
    // A named file that is missing is an error; the default one may be absent.
    let out = xenmig(None, &["--config", "/nonexistent/xenmig.yaml", "config"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("config /nonexistent/xenmig.yaml: No such file"));
    let out = xenmig(Some(Path::new("/nonexistent/x.yaml")), &["config"]);
    assert_eq!(out.status.code(), Some(1));
    // A file others may write is refused: its ssh command would run as root.
    let cfg = write_config(d.path(), "ssh: ssh\n");
    fs::set_permissions(&cfg, fs::Permissions::from_mode(0o664)).unwrap();
    let out = xenmig(Some(&cfg), &["config"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("writable by group or others"));
}

#[test]
fn reference_globs_expand_at_use_time_sorted_without_the_target() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (src, dst) = (dir.join("web.img"), dir.join("tmpl-dst.img"));
    // The guest's disk is a template's clone: everything can come from it.
    let data = sample_image(&src, 7, 64);
    fs::write(dir.join("tmpl-b.img"), &data).unwrap();
    sample_image(&dir.join("tmpl-a.img"), 8, 16);
    let cfg = write_config(
        dir,
        &format!(
            "references: ['{0}/tmpl-*.img', '{0}/none-*.img']\nhosts:\n  host2:\n    references: ['{0}/tmpl-*.img']\n",
            dir.display()
        ),
    );
    let f = cfg.display().to_string();
    let pat = format!("{}/tmpl-*.img", dir.display());
    // `xenmig config` shows each pattern and, where the references are
    // used here, what it matches now: sorted, never DST itself.
    let r = rows(&xenmig(Some(&cfg), &["config", "--", "copy", s(&src), s(&dst)]));
    let (value, origin) = row(&r, "references");
    let want = format!("{pat} = [{0}/tmpl-a.img, {0}/tmpl-b.img], {0}/none-*.img (matches nothing)", dir.display());
    assert_eq!((value, origin), (want, format!("{f}:1")));
    // DST on another host: the pattern is expanded there, at copy time.
    let r = rows(&xenmig(Some(&cfg), &["config", "--", "copy", s(&src), "host2:/dev/vg0/web"]));
    assert_eq!(
        row(&r, "references"),
        (format!("{pat} (a pattern, expanded on host2)"), format!("host section host2, {f}:4"))
    );
    // A template added after the file was written is found at use time.
    fs::write(dir.join("tmpl-c.img"), b"").unwrap();
    let r = rows(&xenmig(Some(&cfg), &["config", "--", "copy", s(&src), s(&dst)]));
    assert!(row(&r, "references").0.contains("tmpl-b.img, ") && row(&r, "references").0.contains("/tmpl-c.img]"));
    fs::remove_file(dir.join("tmpl-c.img")).unwrap();
    // A real copy takes its blocks from the matches; the empty pattern is
    // a warning naming it, not an error.
    let out = xenmig(Some(&cfg), &["copy", "--json", s(&src), s(&dst)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    check_counters(&v);
    assert_eq!(v["blocks_fetched"], 0, "{v}");
    assert!(v["blocks_reused"].as_u64().unwrap() > 0, "{v}");
    assert!(err.contains(&format!("reference pattern {}/none-*.img matches nothing", dir.display())), "{err}");
    assert_eq!(fs::read(&dst).unwrap(), data);
    // `similarity` expands them the same way (from -r here).
    let out = xenmig(None, &["similarity", "--json", "-r", &pat, s(&src)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let refs: Vec<String> = v["references"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().into()).collect();
    // tmpl-dst.img (the copy just made) matches too; the image itself would not.
    let names = ["tmpl-a.img", "tmpl-b.img", "tmpl-dst.img"];
    assert_eq!(refs, names.iter().map(|n| format!("{}/{n}", dir.display())).collect::<Vec<_>>());
}

#[test]
fn a_missing_explicit_reference_is_still_an_error() {
    let d = tempfile::tempdir().unwrap();
    let (src, dst) = (d.path().join("a.img"), d.path().join("b.img"));
    sample_image(&src, 3, 16);
    let missing = d.path().join("gone.img");
    let cfg = write_config(d.path(), &format!("references: ['{}']\n", missing.display()));
    let out = xenmig(Some(&cfg), &["copy", s(&src), s(&dst)]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&missing.display().to_string()), "{err}");
    assert!(
        !dst.exists() || fs::metadata(&dst).unwrap().len() == 0,
        "nothing written before the references are checked"
    );
    // A malformed pattern is an error naming it.
    let cfg = write_config(d.path(), &format!("references: ['{}/[x']\n", d.path().display()));
    let out = xenmig(Some(&cfg), &["copy", s(&src), s(&dst)]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[x") && err.contains("bad pattern"), "{err}");
}

#[test]
fn hash_and_index_take_digest_and_block_size_from_the_file() {
    let d = tempfile::tempdir().unwrap();
    let cfg = write_config(d.path(), "block_size: 8192\nhash: sha256\n");
    let img = d.path().join("a.img");
    sample_image(&img, 5, 256);
    let out = xenmig(Some(&cfg), &["hash", "--json", s(&img)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["algorithm"].as_str(), v["block_size"].as_u64()), (Some("sha256"), Some(8192)), "{v}");
    // The flag wins over the file.
    let out = xenmig(Some(&cfg), &["hash", "--json", "--hash", "blake3", s(&img)]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["algorithm"].as_str(), v["block_size"].as_u64()), (Some("blake3"), Some(8192)), "{v}");
    // index: the same settings, seen in the file it writes.
    let idx = d.path().join("refs.xmi");
    let out = xenmig(Some(&cfg), &["index", "-o", s(&idx), s(&img)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown = String::from_utf8_lossy(&xenmig(None, &["show", s(&idx)]).stdout).to_string();
    assert!(shown.contains("sha256") && shown.contains("8192"), "{shown}");
    let f = cfg.display().to_string();
    let r = rows(&xenmig(Some(&cfg), &["config", "--", "index", "-o", "x", "--block-size", "4096", "img"]));
    assert_eq!(row(&r, "hash"), ("sha256".into(), format!("{f}:2")));
    assert_eq!(row(&r, "block_size"), ("4096".into(), "flag".into()));
}

#[test]
fn serve_takes_what_its_starter_left_unsaid_from_its_own_file() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (src, dst) = (dir.join("web.img"), dir.join("out/web.img"));
    fs::create_dir(dir.join("out")).unwrap();
    let data = sample_image(&src, 11, 64);
    fs::write(dir.join("tmpl-1.img"), &data).unwrap();
    // The far end's host has its own file (XENMIG_CONFIG, inherited by the
    // `serve` that `-s ''` runs through pipes); the copy's end reads another,
    // empty one (--config), so it passes no -r.
    let far = write_config(dir, &format!("references: ['{}/tmpl-*.img']\nbwlimit: 64M\n", dir.display()));
    let near = dir.join("near.yaml");
    fs::write(&near, "# nothing\n").unwrap();
    let f = far.display().to_string();
    let r = rows(&xenmig(Some(&far), &["config", "--", "serve", "--target", s(&dst)]));
    assert_eq!(row(&r, "references").1, format!("{f}:1"));
    assert_eq!(row(&r, "compress"), ("auto".into(), "default".into()));
    // The limit is the sending end's: a source's, from the file unless a flag says.
    assert!(!r.iter().any(|r| r.0 == "bwlimit"), "{r:?}");
    let r = rows(&xenmig(Some(&far), &["config", "--", "serve", "--source", s(&src)]));
    assert_eq!(row(&r, "bwlimit"), ("64M".into(), format!("{f}:2")));
    assert!(!r.iter().any(|r| r.0 == "references"), "{r:?}");
    let r = rows(&xenmig(Some(&far), &["config", "--", "serve", "--source", s(&src), "--bwlimit", "1M"]));
    assert_eq!(row(&r, "bwlimit"), ("1M".into(), "flag".into()));
    let dst_arg = format!("far:{}", dst.display());
    let out = xenmig(
        Some(&far),
        &["--config", s(&near), "copy", "--json", "-s", "", "--remote-xenmig", s(&bin()), s(&src), &dst_arg],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    check_counters(&v);
    // Every block came from the far host's reference, none over the link.
    assert_eq!(v["blocks_fetched"], 0, "{v}");
    assert_eq!(fs::read(&dst).unwrap(), data);
    // A pull: the far `serve --source` sends, under its own file's limit
    // when the starting end sets none. 1 MiB at 512 KiB/s cannot take
    // less than 2 s (the bucket starts empty); unlimited it takes far less.
    let far = write_config(dir, "bwlimit: 512K\n");
    let big = dir.join("big.img");
    fs::write(&big, noise(12, 1 << 20)).unwrap();
    let src_arg = format!("far:{}", big.display());
    let pulled = dir.join("out/big.img");
    let started = std::time::Instant::now();
    let out = xenmig(
        Some(&far),
        &[
            "--config",
            s(&near),
            "copy",
            "--json",
            "--compress",
            "none",
            "-s",
            "",
            "--remote-xenmig",
            s(&bin()),
            &src_arg,
            s(&pulled),
        ],
    );
    let secs = started.elapsed().as_secs_f64();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(fs::read(&pulled).unwrap(), fs::read(&big).unwrap());
    assert!(secs >= 1.9, "1 MiB in {secs:.2} s: the far end's limit did not apply");
}

#[test]
fn similarity_takes_references_from_the_file() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("a.img");
    let data = sample_image(&img, 9, 32);
    fs::write(d.path().join("ref-1.img"), &data).unwrap();
    let cfg = write_config(d.path(), &format!("references: ['{}/ref-*.img']\n", d.path().display()));
    let out = xenmig(Some(&cfg), &["similarity", "--json", s(&img)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["blocks_missing"], 0, "{v}");
    assert_eq!(v["references"][0].as_str().unwrap(), s(&d.path().join("ref-1.img")));
    // Neither -r nor the file: an error saying both ways.
    let out = xenmig(None, &["similarity", s(&img)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no references"), "{}", String::from_utf8_lossy(&out.stderr));
    // Commands that take nothing from the file say so in `xenmig config`.
    let out = xenmig(Some(&cfg), &["config", "--", "show", "x.xmi"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`show` takes no setting"));
}

#[test]
fn the_log_format_comes_from_the_file_unless_a_flag_says_otherwise() {
    let d = tempfile::tempdir().unwrap();
    let cfg = write_config(d.path(), "block_size: 8192\nlog_format: json\n");
    let img = d.path().join("a.img");
    sample_image(&img, 4, 64);
    let json_lines = |out: &Output| {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!err.trim().is_empty(), "no stderr at all");
        err.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
    };
    // Without a terminal `hash` writes a phase line: JSON, from the file.
    assert!(json_lines(&xenmig(Some(&cfg), &["hash", s(&img)])));
    // The flag wins, before or after the command's name.
    assert!(!json_lines(&xenmig(Some(&cfg), &["--log-format", "text", "hash", s(&img)])));
    assert!(!json_lines(&xenmig(Some(&cfg), &["hash", "--log-format", "text", s(&img)])));
    let f = cfg.display().to_string();
    let r = rows(&xenmig(Some(&cfg), &["config", "--", "serve", "--source", "x"]));
    assert_eq!(row(&r, "log_format"), ("json".into(), format!("{f}:2")));
    // A wrong value names file, line and key, and so the message is text.
    let cfg = write_config(d.path(), "ssh: ssh\nlog_format: xml\n");
    let out = xenmig(Some(&cfg), &["hash", s(&img)]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("config {f}:2: log_format: unknown log format 'xml'")), "{err}");
}
