//! Reference lists as the operator writes them: paths and glob patterns
//! (`/dev/vg0/debian*`, `/srv/images/*.xmi`), expanded where and when the
//! references are used, on the target's host at the start of a copy, so a
//! template added since the configuration was written is picked up.
//!
//! The rules, in one place:
//! - an entry with `*`, `?` or `[` is a pattern, anything else a path;
//! - a pattern's matches are sorted (by path), so a copy takes its blocks
//!   from the same references in the same order every time (the first
//!   reference holding a block is the one used);
//! - a pattern that matches nothing is a warning naming it, not an error:
//!   a site-wide `debian*` is fine on a host without Debian templates; a
//!   path that does not exist stays an error (when it is opened);
//! - `*` and `?` do not cross `/` and do not match a leading dot, as in the
//!   shell;
//! - a pattern never matches the image the references are for (the DST
//!   being written, or the image `similarity` measures): `/dev/vg0/*` on
//!   the target's VG must not offer the copy its own target;
//! - an entry listed twice (by two patterns, or a pattern and a path) is
//!   used once, where it first appeared.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::EngineError;

/// Whether `entry` is a glob pattern rather than a path.
pub fn is_pattern(entry: &Path) -> bool {
    entry.as_os_str().as_encoded_bytes().iter().any(|b| matches!(b, b'*' | b'?' | b'['))
}

fn options() -> glob::MatchOptions {
    glob::MatchOptions { case_sensitive: true, require_literal_separator: true, require_literal_leading_dot: true }
}

/// The paths `pattern` matches now, sorted. Nothing matched is an empty
/// list (the caller decides whether to warn); a malformed pattern or a
/// directory that cannot be read is an error naming the pattern.
pub fn matches(pattern: &Path) -> Result<Vec<PathBuf>, EngineError> {
    let err = |what: String| EngineError::Reference { path: pattern.to_path_buf(), what };
    let text = pattern.to_str().ok_or_else(|| err("a pattern must be valid UTF-8".into()))?;
    let paths = glob::glob_with(text, options()).map_err(|e| err(format!("bad pattern: {e}")))?;
    let mut found = Vec::new();
    for p in paths {
        found.push(p.map_err(|e| err(format!("cannot read {}: {}", e.path().display(), e.error())))?);
    }
    found.sort();
    Ok(found)
}

/// What one entry stands for: a path itself; a pattern its matches less
/// `exclude` (the image the references are for). Nothing is logged.
pub fn expand_entry(entry: &Path, exclude: Option<&Path>) -> Result<Vec<PathBuf>, EngineError> {
    if !is_pattern(entry) {
        return Ok(vec![entry.to_path_buf()]);
    }
    let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let excluded = exclude.and_then(id);
    let mut found = matches(entry)?;
    if excluded.is_some() {
        found.retain(|p| id(p) != excluded);
    }
    Ok(found)
}

/// The references `entries` name, patterns expanded (see the module's
/// rules); `exclude` is the image they are references for. A pattern
/// matching nothing is logged as a warning.
pub fn expand(entries: &[PathBuf], exclude: Option<&Path>) -> Result<Vec<PathBuf>, EngineError> {
    let mut out: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let found = expand_entry(entry, exclude)?;
        if found.is_empty() {
            log::warn!("reference pattern {} matches nothing; going on without it", entry.display());
        }
        for p in found {
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(dir: &Path, names: &[&str]) {
        for n in names {
            std::fs::write(dir.join(n), b"x").unwrap();
        }
    }

    #[test]
    fn patterns_are_told_from_paths() {
        assert!(is_pattern(Path::new("/dev/vg0/debian*")));
        assert!(is_pattern(Path::new("/srv/img?.raw")));
        assert!(is_pattern(Path::new("/srv/img[12].raw")));
        assert!(!is_pattern(Path::new("/dev/vg0/debian12")));
    }

    #[test]
    fn matches_are_sorted_and_stay_in_their_directory() {
        let d = tempfile::tempdir().unwrap();
        touch(d.path(), &["c.img", "a.img", "b.img", ".hidden.img", "a.txt"]);
        std::fs::create_dir(d.path().join("sub")).unwrap();
        touch(&d.path().join("sub"), &["d.img"]);
        let got = matches(&d.path().join("*.img")).unwrap();
        let want: Vec<PathBuf> = ["a.img", "b.img", "c.img"].iter().map(|n| d.path().join(n)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_pattern_matching_nothing_is_empty_not_an_error() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(expand(&[d.path().join("none*")], None).unwrap(), Vec::<PathBuf>::new());
    }

    #[test]
    fn a_bad_pattern_is_an_error_naming_it() {
        let p = PathBuf::from("/srv/[unclosed");
        let e = expand(&[p], None).unwrap_err().to_string();
        assert!(e.contains("/srv/[unclosed") && e.contains("bad pattern"), "{e}");
    }

    #[test]
    fn paths_pass_unchanged_and_duplicates_go() {
        let d = tempfile::tempdir().unwrap();
        touch(d.path(), &["a.img", "b.img"]);
        let missing = d.path().join("missing.img");
        let list = vec![d.path().join("b.img"), d.path().join("*.img"), missing.clone(), d.path().join("?.img")];
        // A missing path is kept: opening it is the error, where it is used.
        assert_eq!(expand(&list, None).unwrap(), vec![d.path().join("b.img"), d.path().join("a.img"), missing]);
    }

    #[test]
    fn the_image_itself_is_left_out_of_a_pattern() {
        let d = tempfile::tempdir().unwrap();
        touch(d.path(), &["a.img", "dst.img"]);
        // Named by another path to the same file: identity, not spelling.
        let dst = d.path().join(".").join("dst.img");
        assert_eq!(expand(&[d.path().join("*.img")], Some(&dst)).unwrap(), vec![d.path().join("a.img")]);
    }
}
