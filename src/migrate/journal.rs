//! The source's journal of a migration: one small JSON file per domain,
//! rewritten atomically at every phase, so that `xenmig migrate --recover`
//! (run by hand, or at the start of the next migrate of that domain) can
//! finish or roll back a migration whose xenmig was killed.
//!
//! Format versioning: `format` is `major.minor`; a reader refuses a newer
//! major (it cannot know what the phases mean) and reads any minor of its
//! own major (added fields have defaults).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::MigrateError;

pub const FORMAT_MAJOR: u32 = 1;
pub const FORMAT_MINOR: u32 = 0;

/// Where a migration stands. The order matters: everything before
/// [`Phase::Released`] can be undone by resuming the source, because the
/// target was never told it may unpause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Preflight,
    /// LVs created or reused on the target.
    Prepared,
    /// Disk passes while the guest runs.
    PreCopy,
    /// xl migrate runs (memory); the source may be suspended.
    Memory,
    /// The target's READY is held; the last disk delta is being sent.
    FinalDelta,
    /// READY passed on: xl may have sent GO, the target may run the guest.
    Released,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Journal {
    pub format: String,
    pub domain: String,
    pub domid: u32,
    pub uuid: String,
    pub host: String,
    pub ssh: String,
    pub remote_xenmig: String,
    /// The target keeps the domain paused (`-p`).
    #[serde(default)]
    pub paused_on_target: bool,
    pub phase: Phase,
    /// Source LVs (`/dev/VG/LV`) and the target paths they go to.
    pub disks: Vec<(String, String)>,
    pub pid: u32,
    pub started_unix: u64,
}

pub fn default_dir() -> PathBuf {
    std::env::var_os("XENMIG_STATE_DIR")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/xenmig"))
        .join("journal")
}

pub fn path_for(dir: &Path, domain: &str) -> PathBuf {
    // Domain names are xenstore strings; keep the file name tame.
    let safe: String =
        domain.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    dir.join(format!("{safe}.json"))
}

impl Journal {
    /// Write atomically: a new file (mode 0600, never following a link)
    /// renamed over the old one.
    pub fn save(&self, dir: &Path) -> Result<(), MigrateError> {
        let err = |what: &str, e: std::io::Error| MigrateError::Journal(format!("{what} {}: {e}", dir.display()));
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| err("cannot create", e))?;
        let path = path_for(dir, &self.domain);
        let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(|e| err("cannot write a journal in", e))?;
        let body = serde_json::to_vec_pretty(self).expect("journal serialises");
        f.write_all(&body).and_then(|_| f.sync_all()).map_err(|e| err("cannot write a journal in", e))?;
        fs::rename(&tmp, &path).map_err(|e| err("cannot rename the journal in", e))?;
        Ok(())
    }

    pub fn set_phase(&mut self, phase: Phase, dir: &Path) -> Result<(), MigrateError> {
        self.phase = phase;
        self.save(dir)
    }

    /// The journal of `domain`, if there is one.
    pub fn load(dir: &Path, domain: &str) -> Result<Option<Journal>, MigrateError> {
        let path = path_for(dir, domain);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(MigrateError::Journal(format!("{}: {e}", path.display()))),
        };
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| MigrateError::Journal(format!("{} is not a journal: {e}", path.display())))?;
        let format = v.get("format").and_then(|f| f.as_str()).unwrap_or("");
        let major: u32 = format.split('.').next().and_then(|m| m.parse().ok()).unwrap_or(0);
        if major != FORMAT_MAJOR {
            return Err(MigrateError::Journal(format!(
                "{} has format {format:?}; this xenmig reads {FORMAT_MAJOR}.x: use the xenmig that wrote it",
                path.display()
            )));
        }
        serde_json::from_value(v).map(Some).map_err(|e| MigrateError::Journal(format!("{}: {e}", path.display())))
    }

    pub fn remove(dir: &Path, domain: &str) {
        let _ = fs::remove_file(path_for(dir, domain));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Journal {
        Journal {
            format: format!("{FORMAT_MAJOR}.{FORMAT_MINOR}"),
            domain: "g1".into(),
            domid: 3,
            uuid: "u".into(),
            host: "h".into(),
            ssh: "ssh".into(),
            remote_xenmig: "xenmig".into(),
            paused_on_target: false,
            phase: Phase::PreCopy,
            disks: vec![("/dev/vg0/g1".into(), "/dev/vg0/g1".into())],
            pid: 1,
            started_unix: 0,
        }
    }

    #[test]
    fn saved_private_and_read_back() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("j");
        let mut j = sample();
        j.save(&dir).unwrap();
        j.set_phase(Phase::Released, &dir).unwrap();
        let back = Journal::load(&dir, "g1").unwrap().unwrap();
        assert_eq!(back.phase, Phase::Released);
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(path_for(&dir, "g1")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        Journal::remove(&dir, "g1");
        assert!(Journal::load(&dir, "g1").unwrap().is_none());
    }

    #[test]
    fn a_newer_major_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let mut j = sample();
        j.format = "2.0".into();
        j.save(d.path()).unwrap();
        let e = Journal::load(d.path(), "g1").unwrap_err();
        assert!(e.to_string().contains("this xenmig reads 1.x"), "{e}");
        // A newer minor of our major is read.
        j.format = "1.7".into();
        j.save(d.path()).unwrap();
        assert!(Journal::load(d.path(), "g1").unwrap().is_some());
    }

    #[test]
    fn phases_order_the_point_of_no_return() {
        assert!(Phase::FinalDelta < Phase::Released);
        assert!(Phase::Memory < Phase::Released);
    }
}
