//! LVM through the lvm2 commands.
//!
//! Why commands and not liblvm: liblvm2app is gone from lvm2, and the
//! commands are what every dom0 has and every operator reads. Reports are
//! asked for as JSON with sizes in plain bytes (`--reportformat json --units
//! b --nosuffix`, explicit `-o` field lists), so parsing does not depend on
//! column widths or locale. Errors are classified from lvm's stderr (run
//! with `LC_ALL=C`) into the cases a caller acts on: the volume group does
//! not exist, it has no room, the LV already exists or does not, it is in
//! use, the kernel has no device-mapper, lvm2 is not installed.

use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum LvmError {
    #[error("the lvm2 command `{command}` is not installed (apt-get install lvm2)")]
    NotInstalled { command: String },
    #[error("volume group \"{vg}\" not found")]
    NoSuchVg { vg: String },
    #[error("logical volume \"{lv}\" not found")]
    NoSuchLv { lv: String },
    #[error("logical volume \"{lv}\" already exists in volume group \"{vg}\"")]
    LvExists { vg: String, lv: String },
    #[error("volume group \"{vg}\" has not enough free space: {detail}")]
    NoFreeSpace { vg: String, detail: String },
    #[error("logical volume \"{lv}\" is in use: {detail}")]
    InUse { lv: String, detail: String },
    #[error("the kernel's device-mapper is not available ({detail}): is dm_mod loaded, is this a container?")]
    NoDeviceMapper { detail: String },
    #[error("`{command}` is not permitted here (run as root): {detail}")]
    NotPermitted { command: String, detail: String },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed { command: String, status: String, stderr: String },
    #[error("`{command}` printed a report xenmig cannot read: {detail}")]
    BadReport { command: String, detail: String },
    #[error("cannot run `{command}`: {source}")]
    Io {
        command: String,
        #[source]
        source: io::Error,
    },
}

/// `vg/lv`, the way lvm names a logical volume.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LvRef {
    pub vg: String,
    pub lv: String,
}

impl LvRef {
    pub fn new(vg: impl Into<String>, lv: impl Into<String>) -> LvRef {
        LvRef { vg: vg.into(), lv: lv.into() }
    }

    /// `/dev/VG/LV`, the udev symlink lvm maintains.
    pub fn dev_path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/{}/{}", self.vg, self.lv))
    }

    /// Recognises an LV by its device path alone: `/dev/VG/LV` or
    /// `/dev/mapper/VG-LV` (where a `-` inside either name is doubled).
    /// This is a guess when lvm cannot be asked; [`LogicalVolume::matches`]
    /// is the answer when it can.
    pub fn from_device_path(path: &str) -> Option<LvRef> {
        let rest = path.strip_prefix("/dev/")?;
        if let Some(dm) = rest.strip_prefix("mapper/") {
            return Self::from_dm_name(dm);
        }
        let (vg, lv) = rest.split_once('/')?;
        // Directories udev makes under /dev that are not volume groups.
        const NOT_VGS: &[&str] = &[
            "disk",
            "md",
            "xen",
            "block",
            "char",
            "bus",
            "input",
            "net",
            "pts",
            "shm",
            "snd",
            "dri",
            "cpu",
            "hugepages",
            "mqueue",
            "vfio",
            "loop",
            "nbd",
            "zvol",
            "drbd",
        ];
        if vg.is_empty() || lv.is_empty() || lv.contains('/') || NOT_VGS.contains(&vg) {
            return None;
        }
        Some(LvRef::new(vg, lv))
    }

    /// Splits a device-mapper name `VG-LV` with lvm's escaping (`--` for a
    /// `-` inside a name). Names of lvm's hidden sub-devices (`-real`,
    /// `-cow`, `_tdata`...) come out as such and will not match an LV.
    pub fn from_dm_name(dm: &str) -> Option<LvRef> {
        let bytes = dm.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'-' {
                if bytes.get(i + 1) == Some(&b'-') {
                    i += 2;
                    continue;
                }
                let vg = dm[..i].replace("--", "-");
                let lv = dm[i + 1..].replace("--", "-");
                if vg.is_empty() || lv.is_empty() {
                    return None;
                }
                return Some(LvRef::new(vg, lv));
            }
            i += 1;
        }
        None
    }
}

impl fmt::Display for LvRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.vg, self.lv)
    }
}

/// One line of `lvs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogicalVolume {
    pub vg: String,
    pub name: String,
    /// lvm's ten attribute letters (`-wi-a-----`).
    pub attr: String,
    pub size_bytes: u64,
    /// The origin of a snapshot.
    pub origin: Option<String>,
    pub path: Option<String>,
    pub dm_path: Option<String>,
    /// lvm tags (`lvchange --addtag`); `migrate` marks a domain's LVs with them.
    pub tags: Vec<String>,
}

impl LogicalVolume {
    /// Open by some process or a guest's block backend (attribute 6 is `o`).
    pub fn is_open(&self) -> bool {
        self.attr.chars().nth(5) == Some('o')
    }

    pub fn lv_ref(&self) -> LvRef {
        LvRef::new(&self.vg, &self.name)
    }

    /// A (thick) snapshot: attribute letter `s`/`S`.
    pub fn is_snapshot(&self) -> bool {
        matches!(self.attr.chars().next(), Some('s' | 'S'))
    }

    /// Its device node exists (attribute 5 is `a`).
    pub fn is_active(&self) -> bool {
        self.attr.chars().nth(4) == Some('a')
    }

    /// Whether `path` names this LV: its `/dev/VG/LV` or `/dev/mapper`
    /// path, or a path that resolves to the same device node.
    pub fn matches(&self, path: &str) -> bool {
        let mine = [self.path.as_deref(), self.dm_path.as_deref()];
        if mine.iter().flatten().any(|p| *p == path) {
            return true;
        }
        if LvRef::from_device_path(path).as_ref() == Some(&self.lv_ref()) {
            return true;
        }
        match std::fs::canonicalize(path) {
            Ok(real) => mine.iter().flatten().any(|p| std::fs::canonicalize(p).ok().as_deref() == Some(real.as_path())),
            Err(_) => false,
        }
    }
}

/// One line of `vgs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeGroup {
    pub name: String,
    pub size_bytes: u64,
    pub free_bytes: u64,
    pub extent_bytes: u64,
    pub lv_count: u64,
    pub pv_count: u64,
}

const LV_FIELDS: &str = "lv_name,vg_name,lv_attr,lv_size,origin,lv_path,lv_dm_path,lv_tags";
const VG_FIELDS: &str = "vg_name,vg_size,vg_free,vg_extent_size,lv_count,pv_count";

#[derive(Deserialize)]
struct Report {
    report: Vec<Section>,
}

#[derive(Deserialize)]
struct Section {
    #[serde(default)]
    lv: Vec<RawLv>,
    #[serde(default)]
    vg: Vec<RawVg>,
}

// lvm prints every field as a string.
#[derive(Deserialize)]
struct RawLv {
    lv_name: String,
    vg_name: String,
    #[serde(default)]
    lv_attr: String,
    lv_size: String,
    #[serde(default)]
    origin: String,
    #[serde(default)]
    lv_path: String,
    #[serde(default)]
    lv_dm_path: String,
    #[serde(default)]
    lv_tags: String,
}

#[derive(Deserialize)]
struct RawVg {
    vg_name: String,
    vg_size: String,
    vg_free: String,
    #[serde(default)]
    vg_extent_size: String,
    #[serde(default)]
    lv_count: String,
    #[serde(default)]
    pv_count: String,
}

fn bytes(field: &str, value: &str) -> Result<u64, String> {
    // `--units b --nosuffix` gives plain integers; tolerate a trailing `B`
    // in case a configuration forces suffixes.
    let v = value.trim().trim_end_matches(['B', 'b']);
    if v.is_empty() {
        return Ok(0);
    }
    v.parse().map_err(|_| format!("{field} is \"{value}\", not a number of bytes"))
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// Parses `lvs --reportformat json --units b --nosuffix -o LV_FIELDS`.
pub fn parse_lvs(json: &str) -> Result<Vec<LogicalVolume>, String> {
    let r: Report = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for raw in r.report.into_iter().flat_map(|s| s.lv) {
        out.push(LogicalVolume {
            size_bytes: bytes("lv_size", &raw.lv_size)?,
            vg: raw.vg_name,
            name: raw.lv_name,
            attr: raw.lv_attr,
            origin: non_empty(raw.origin),
            path: non_empty(raw.lv_path),
            dm_path: non_empty(raw.lv_dm_path),
            tags: raw.lv_tags.split(',').map(str::trim).filter(|t| !t.is_empty()).map(String::from).collect(),
        });
    }
    Ok(out)
}

/// Parses `vgs --reportformat json --units b --nosuffix -o VG_FIELDS`.
pub fn parse_vgs(json: &str) -> Result<Vec<VolumeGroup>, String> {
    let r: Report = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for raw in r.report.into_iter().flat_map(|s| s.vg) {
        out.push(VolumeGroup {
            size_bytes: bytes("vg_size", &raw.vg_size)?,
            free_bytes: bytes("vg_free", &raw.vg_free)?,
            extent_bytes: bytes("vg_extent_size", &raw.vg_extent_size)?,
            lv_count: bytes("lv_count", &raw.lv_count)?,
            pv_count: bytes("pv_count", &raw.pv_count)?,
            name: raw.vg_name,
        });
    }
    Ok(out)
}

/// The first double-quoted word after `marker` in `line`.
fn quoted_after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    let at = line.find(marker)? + marker.len();
    let rest = &line[at..];
    let start = rest.find('"')? + 1;
    let len = rest[start..].find('"')?;
    Some(&rest[start..start + len])
}

/// Turns a failed lvm command's stderr into the error a caller can act on.
/// `command` is the command line (for messages); `vg`/`lv` are what the
/// caller asked about, used when lvm's message does not name them.
pub fn classify(command: &str, status: &str, stderr: &str, vg: Option<&str>, lv: Option<&str>) -> LvmError {
    let lines: Vec<&str> =
        stderr.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("File descriptor")).collect();
    let text = lines.join("; ");
    for l in &lines {
        let lower = l.to_ascii_lowercase();
        if lower.contains("already exists in volume group") {
            let name = quoted_after(l, "olume").or(lv).unwrap_or_default().to_string();
            let group = quoted_after(l, "volume group").or(vg).unwrap_or_default().to_string();
            return LvmError::LvExists { vg: group, lv: name };
        }
        if lower.contains("insufficient free space") || lower.contains("insufficient suitable") {
            let group = quoted_after(l, "Volume group").or(vg).unwrap_or_default().to_string();
            return LvmError::NoFreeSpace { vg: group, detail: l.to_string() };
        }
        if lower.starts_with("volume group") && lower.contains("not found") {
            let group = quoted_after(l, "Volume group").or(vg).unwrap_or_default().to_string();
            return LvmError::NoSuchVg { vg: group };
        }
        if lower.contains("failed to find logical volume") {
            let name = quoted_after(l, "logical volume")
                .map(str::to_string)
                .or_else(|| lv.map(|lv| format!("{}/{lv}", vg.unwrap_or(""))))
                .unwrap_or_default();
            return LvmError::NoSuchLv { lv: name };
        }
        if lower.contains(" in use") || lower.contains("is open") {
            let name = lv.map(|lv| format!("{}/{lv}", vg.unwrap_or(""))).unwrap_or_default();
            return LvmError::InUse { lv: name, detail: l.to_string() };
        }
    }
    if text.contains("/dev/mapper/control") || text.contains("device-mapper driver") {
        return LvmError::NoDeviceMapper { detail: lines.first().copied().unwrap_or_default().to_string() };
    }
    if text.contains("Permission denied") || text.contains("non-root user") {
        return LvmError::NotPermitted { command: command.to_string(), detail: text };
    }
    LvmError::Failed {
        command: command.to_string(),
        status: status.to_string(),
        stderr: if text.is_empty() { "(nothing on stderr)".into() } else { text },
    }
}

/// Runs the lvm2 commands, from `PATH` or from one directory.
#[derive(Debug, Clone, Default)]
pub struct Lvm {
    bin_dir: Option<PathBuf>,
}

impl Lvm {
    pub fn new() -> Lvm {
        Lvm::default()
    }

    /// Looks for the lvm2 commands only in `dir` (tests; unusual installs).
    pub fn with_bin_dir(dir: impl Into<PathBuf>) -> Lvm {
        Lvm { bin_dir: Some(dir.into()) }
    }

    fn run<S: AsRef<OsStr>>(
        &self,
        cmd: &str,
        args: &[S],
        vg: Option<&str>,
        lv: Option<&str>,
    ) -> Result<Output, LvmError> {
        let program: PathBuf = match &self.bin_dir {
            Some(d) => d.join(cmd),
            None => PathBuf::from(cmd),
        };
        let line = std::iter::once(cmd.to_string())
            .chain(args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(" ");
        let out = Command::new(&program)
            .args(args)
            .env("LC_ALL", "C")
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    LvmError::NotInstalled { command: cmd.to_string() }
                } else {
                    LvmError::Io { command: line.clone(), source: e }
                }
            })?;
        if !out.status.success() {
            return Err(classify(&line, &out.status.to_string(), &String::from_utf8_lossy(&out.stderr), vg, lv));
        }
        Ok(out)
    }

    /// Logical volumes, of one VG or all.
    pub fn lvs(&self, vg: Option<&str>) -> Result<Vec<LogicalVolume>, LvmError> {
        let mut args = vec!["--reportformat", "json", "--units", "b", "--nosuffix", "-o", LV_FIELDS];
        args.extend(vg);
        let out = self.run("lvs", &args, vg, None)?;
        parse_lvs(&String::from_utf8_lossy(&out.stdout))
            .map_err(|detail| LvmError::BadReport { command: "lvs".into(), detail })
    }

    /// One logical volume.
    pub fn lv(&self, r: &LvRef) -> Result<LogicalVolume, LvmError> {
        let name = r.to_string();
        let out = self.run(
            "lvs",
            &["--reportformat", "json", "--units", "b", "--nosuffix", "-o", LV_FIELDS, &name],
            Some(&r.vg),
            Some(&r.lv),
        )?;
        parse_lvs(&String::from_utf8_lossy(&out.stdout))
            .map_err(|detail| LvmError::BadReport { command: "lvs".into(), detail })?
            .into_iter()
            .next()
            .ok_or(LvmError::NoSuchLv { lv: name })
    }

    /// Volume groups, or one.
    pub fn vgs(&self, vg: Option<&str>) -> Result<Vec<VolumeGroup>, LvmError> {
        let mut args = vec!["--reportformat", "json", "--units", "b", "--nosuffix", "-o", VG_FIELDS];
        args.extend(vg);
        let out = self.run("vgs", &args, vg, None)?;
        parse_vgs(&String::from_utf8_lossy(&out.stdout))
            .map_err(|detail| LvmError::BadReport { command: "vgs".into(), detail })
    }

    /// Creates `vg/lv` of at least `size_bytes` (lvm rounds up to whole
    /// extents). `--yes` answers lvm's "wipe signature?" question: the new
    /// LV is about to be overwritten anyway.
    pub fn create(&self, r: &LvRef, size_bytes: u64) -> Result<LogicalVolume, LvmError> {
        let size = format!("{size_bytes}b");
        self.run("lvcreate", &["--yes", "-n", &r.lv, "-L", &size, &r.vg], Some(&r.vg), Some(&r.lv))?;
        self.lv(r)
    }

    /// Creates snapshot `vg/name` of `origin` with `cow_bytes` of room for
    /// changes: a stable view of a disk while its guest keeps writing.
    pub fn snapshot(&self, origin: &LvRef, name: &str, cow_bytes: u64) -> Result<LogicalVolume, LvmError> {
        let size = format!("{cow_bytes}b");
        let o = origin.to_string();
        self.run("lvcreate", &["--yes", "-s", "-n", name, "-L", &size, &o], Some(&origin.vg), Some(name))?;
        self.lv(&LvRef::new(&origin.vg, name))
    }

    /// Adds tag `tag` to `vg/lv`.
    pub fn add_tag(&self, r: &LvRef, tag: &str) -> Result<(), LvmError> {
        let name = r.to_string();
        self.run("lvchange", &["--addtag", tag, &name], Some(&r.vg), Some(&r.lv))?;
        Ok(())
    }

    /// Removes `vg/lv` (it must not be open).
    pub fn remove(&self, r: &LvRef) -> Result<(), LvmError> {
        let name = r.to_string();
        self.run("lvremove", &["--yes", &name], Some(&r.vg), Some(&r.lv))?;
        Ok(())
    }

    /// The LV a device path names, asking lvm (so `/dev/dm-3` and symlinks
    /// resolve too).
    pub fn lv_for_path(&self, path: &Path) -> Result<Option<LogicalVolume>, LvmError> {
        let p = path.to_string_lossy();
        Ok(self.lvs(None)?.into_iter().find(|lv| lv.matches(&p)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As lvm2 2.03 prints it: indented, every value a string, sizes in
    /// bytes, one section per report.
    const LVS: &str = r#"  {
      "report": [
          {
              "lv": [
                  {"lv_name":"debian12", "vg_name":"vg0", "lv_attr":"owi-a-s---", "lv_size":"4294967296", "origin":"", "lv_path":"/dev/vg0/debian12", "lv_dm_path":"/dev/mapper/vg0-debian12"},
                  {"lv_name":"g1", "vg_name":"vg0", "lv_attr":"-wi-ao----", "lv_size":"33554432", "origin":"", "lv_path":"/dev/vg0/g1", "lv_dm_path":"/dev/mapper/vg0-g1"},
                  {"lv_name":"g1-snap", "vg_name":"vg0", "lv_attr":"swi-a-s---", "lv_size":"8388608", "origin":"debian12", "lv_path":"/dev/vg0/g1-snap", "lv_dm_path":"/dev/mapper/vg0-g1--snap"},
                  {"lv_name":"web", "vg_name":"data-vg", "lv_attr":"-wi-------", "lv_size":"1073741824", "origin":"", "lv_path":"/dev/data-vg/web", "lv_dm_path":"/dev/mapper/data--vg-web"}
              ]
          }
      ]
  }
"#;

    const VGS: &str = r#"  {
      "report": [
          {
              "vg": [
                  {"vg_name":"data-vg", "vg_size":"8585740288", "vg_free":"7511998464", "vg_extent_size":"4194304", "lv_count":"1", "pv_count":"1"},
                  {"vg_name":"vg0", "vg_size":"8585740288", "vg_free":"4248829952", "vg_extent_size":"4194304", "lv_count":"3", "pv_count":"1"}
              ]
          }
      ]
  }
"#;

    #[test]
    fn parses_lvs_report() {
        let lvs = parse_lvs(LVS).unwrap();
        assert_eq!(lvs.len(), 4);
        let g1 = &lvs[1];
        assert_eq!(g1.lv_ref(), LvRef::new("vg0", "g1"));
        assert_eq!(g1.size_bytes, 32 << 20);
        assert!(g1.is_active());
        assert!(!g1.is_snapshot());
        assert_eq!(g1.origin, None);
        let snap = &lvs[2];
        assert!(snap.is_snapshot());
        assert_eq!(snap.origin.as_deref(), Some("debian12"));
        assert!(!lvs[3].is_active());
        assert_eq!(lvs[3].vg, "data-vg");
    }

    #[test]
    fn parses_empty_and_vg_reports() {
        let empty = "{\n\"report\": [ { \"lv\": [ ] } ] }";
        assert!(parse_lvs(empty).unwrap().is_empty());
        let vgs = parse_vgs(VGS).unwrap();
        assert_eq!(vgs.len(), 2);
        assert_eq!(vgs[1].name, "vg0");
        assert_eq!(vgs[1].free_bytes, 4248829952);
        assert_eq!(vgs[1].extent_bytes, 4 << 20);
        assert_eq!(vgs[1].lv_count, 3);
    }

    #[test]
    fn rejects_malformed_reports() {
        assert!(parse_lvs("not json").is_err());
        let bad_size = r#"{"report":[{"lv":[{"lv_name":"a","vg_name":"b","lv_size":"12.5g"}]}]}"#;
        let e = parse_lvs(bad_size).unwrap_err();
        assert!(e.contains("lv_size"), "{e}");
    }

    #[test]
    fn device_paths_name_lvs() {
        assert_eq!(LvRef::from_device_path("/dev/vg0/g1"), Some(LvRef::new("vg0", "g1")));
        assert_eq!(LvRef::from_device_path("/dev/mapper/vg0-g1"), Some(LvRef::new("vg0", "g1")));
        assert_eq!(LvRef::from_device_path("/dev/mapper/data--vg-my--web"), Some(LvRef::new("data-vg", "my-web")));
        assert_eq!(LvRef::from_device_path("/dev/sda1"), None);
        assert_eq!(LvRef::from_device_path("/dev/md/root"), None);
        assert_eq!(LvRef::from_device_path("/dev/disk/by-id/x"), None);
        assert_eq!(LvRef::from_device_path("/srv/xen/g1.img"), None);
        assert_eq!(LvRef::from_dm_name("nodash"), None);
        assert_eq!(LvRef::new("vg0", "g1").dev_path(), Path::new("/dev/vg0/g1"));
    }

    #[test]
    fn lv_matches_its_paths() {
        let lvs = parse_lvs(LVS).unwrap();
        assert!(lvs[1].matches("/dev/vg0/g1"));
        assert!(lvs[1].matches("/dev/mapper/vg0-g1"));
        assert!(!lvs[1].matches("/dev/vg0/g2"));
        assert!(lvs[3].matches("/dev/mapper/data--vg-web"));
    }

    #[test]
    fn classifies_lvm_stderr() {
        // lvm2 2.03.16, verbatim shapes (a missing VG was captured on this
        // machine; the others are lvm2's message formats).
        let e = classify(
            "vgs vg9",
            "exit status: 5",
            "  Volume group \"vg9\" not found\n  Cannot process volume group vg9\n",
            Some("vg9"),
            None,
        );
        assert!(matches!(&e, LvmError::NoSuchVg { vg } if vg == "vg9"), "{e}");

        let e = classify(
            "lvcreate",
            "exit status: 5",
            "  Logical Volume \"g1\" already exists in volume group \"vg0\"\n",
            Some("vg0"),
            Some("g1"),
        );
        assert!(matches!(&e, LvmError::LvExists { vg, lv } if vg == "vg0" && lv == "g1"), "{e}");

        let e = classify(
            "lvcreate",
            "exit status: 5",
            "  Volume group \"vg0\" has insufficient free space (10 extents): 256 required.\n",
            Some("vg0"),
            Some("big"),
        );
        assert!(matches!(&e, LvmError::NoFreeSpace { vg, .. } if vg == "vg0"), "{e}");
        assert!(e.to_string().contains("256 required"));

        let e = classify(
            "lvremove",
            "exit status: 5",
            "  Failed to find logical volume \"vg0/nope\"\n",
            Some("vg0"),
            Some("nope"),
        );
        assert!(matches!(&e, LvmError::NoSuchLv { lv } if lv == "vg0/nope"), "{e}");

        let e = classify("lvremove", "exit status: 5", "  Logical volume vg0/g1 in use.\n", Some("vg0"), Some("g1"));
        assert!(matches!(&e, LvmError::InUse { .. }), "{e}");

        // Captured on this machine (a container without device-mapper).
        let e = classify(
            "lvcreate",
            "exit status: 3",
            "File descriptor 10 (/dev/null) leaked on lvcreate invocation. Parent PID 1: bash\n  /dev/mapper/control: open failed: No such device\n  Failure to communicate with kernel device-mapper driver.\n",
            Some("vg0"),
            Some("g1"),
        );
        assert!(matches!(&e, LvmError::NoDeviceMapper { .. }), "{e}");

        let e = classify("lvs", "exit status: 5", "  something new\n", None, None);
        match e {
            LvmError::Failed { stderr, .. } => assert_eq!(stderr, "something new"),
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn missing_lvm2_is_not_installed() {
        let lvm = Lvm::with_bin_dir("/nonexistent/xenmig-test/sbin");
        match lvm.lvs(None) {
            Err(LvmError::NotInstalled { command }) => assert_eq!(command, "lvs"),
            other => panic!("expected NotInstalled, got {other:?}"),
        }
        let e = lvm.create(&LvRef::new("vg0", "x"), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("apt-get install lvm2"), "{e}");
    }
}
