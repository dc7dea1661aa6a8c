//! A domain's virtual disks, as the toolstack records them in xenstore.
//!
//! libxl writes each virtual block device twice: the frontend directory
//! `/local/domain/<domid>/device/vbd/<devid>` (what the guest sees; its
//! `backend` key points at the other half) and the backend directory
//! `/local/domain/<backend-domid>/backend/<kind>/<domid>/<devid>` with
//! `params` (what backs the disk), `type` (`phy`, `file`...), `mode`
//! (`w`/`r`) and `dev` (`xvda`). xenmig follows the frontend's pointers (so
//! disks served by a driver domain are found too) and falls back to listing
//! dom0's backend directories for a domain whose frontends are not written
//! yet (a domain being restored, paused before its devices connect).
//!
//! Reading goes through the [`XenstoreRead`] trait so that the discovery
//! and parsing here are tested against an in-memory tree on machines
//! without Xen.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::storage::lvm::{LogicalVolume, LvRef};

/// The two xenstore reads disk discovery needs.
pub trait XenstoreRead {
    /// The value at `path`, or `None` if it does not exist.
    fn read(&self, path: &str) -> Option<String>;
    /// The children of `path` (empty if it does not exist).
    fn list(&self, path: &str) -> Vec<String>;
}

/// An in-memory xenstore: path -> value; directories are implied by
/// paths. For tests and for replaying a dump of `xenstore-ls -f`.
#[derive(Debug, Default, Clone)]
pub struct MemStore(pub BTreeMap<String, String>);

impl MemStore {
    /// Reads `xenstore-ls -f` output: lines `/path = "value"`.
    pub fn from_xenstore_ls(text: &str) -> MemStore {
        let mut m = BTreeMap::new();
        for line in text.lines() {
            if let Some((path, value)) = line.split_once(" = ") {
                let v = value.trim();
                let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
                m.insert(path.trim().to_string(), v.to_string());
            }
        }
        MemStore(m)
    }
}

impl XenstoreRead for MemStore {
    fn read(&self, path: &str) -> Option<String> {
        self.0.get(path).cloned()
    }

    fn list(&self, path: &str) -> Vec<String> {
        let prefix = format!("{}/", path.trim_end_matches('/'));
        let mut out: Vec<String> = Vec::new();
        for k in self.0.keys().filter(|k| k.starts_with(&prefix)) {
            let child = k[prefix.len()..].split('/').next().unwrap_or("");
            if !child.is_empty() && out.last().map(String::as_str) != Some(child) {
                out.push(child.to_string());
            }
        }
        out.dedup();
        out
    }
}

/// Whether the guest may write the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    ReadWrite,
    ReadOnly,
}

impl Mode {
    /// xenstore's `mode`: `w` (also `w!`, write even if shared) or `r`.
    pub fn parse(s: &str) -> Option<Mode> {
        match s.trim().chars().next() {
            Some('w') => Some(Mode::ReadWrite),
            Some('r') => Some(Mode::ReadOnly),
            _ => None,
        }
    }

    pub fn letter(self) -> &'static str {
        match self {
            Mode::ReadWrite => "w",
            Mode::ReadOnly => "r",
        }
    }
}

/// One virtual disk of a domain.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Disk {
    /// The device number (`51712` for xvda).
    pub devid: u32,
    /// The guest's name for it (`xvda`), from the backend's `dev`.
    pub vdev: Option<String>,
    /// The backend directory kind: `vbd` (kernel blkback), `qdisk` (QEMU),
    /// `vbd3` (tapdisk).
    pub backend: String,
    pub backend_domid: u32,
    /// xenstore's `type`: `phy`, `file`, `qdisk`...
    pub backend_type: Option<String>,
    /// The raw `params` value.
    pub params: String,
    /// The image format named in `params` (`raw`, `qcow2`, `aio`...), if any.
    pub format: Option<String>,
    /// The device or file that holds the disk.
    pub target: Option<String>,
    pub mode: Option<Mode>,
    /// The logical volume behind `target`, when it is one.
    pub lv: Option<LvRef>,
    /// The backend directory in xenstore.
    pub xenstore: String,
}

/// Splits a `params` value into (format, path). libxl writes a bare path
/// for `phy` disks and `FORMAT:PATH` for QEMU and tapdisk backends;
/// configurations from xm's era carry `phy:`, `file:` or `tap:aio:`.
pub fn parse_params(params: &str) -> (Option<String>, Option<String>) {
    let p = params.trim();
    if p.is_empty() {
        return (None, None);
    }
    if p.starts_with('/') {
        return (None, Some(p.to_string()));
    }
    let mut format = None;
    let mut rest = p;
    // Peel `word:` prefixes (tap:aio:/path has two); keep the innermost
    // format. A prefix is a short word of letters/digits only.
    while let Some((head, tail)) = rest.split_once(':') {
        if head.is_empty() || head.len() > 8 || !head.chars().all(|c| c.is_ascii_alphanumeric()) {
            break;
        }
        match head {
            "phy" | "tap" | "tap2" | "file" => {}
            f => format = Some(f.to_string()),
        }
        rest = tail;
    }
    let path = (!rest.is_empty()).then(|| rest.to_string());
    (format, path)
}

/// `/local/domain/<bd>/backend/<kind>/<domid>/<devid>` -> (bd, kind, domid, devid).
pub fn parse_backend_path(path: &str) -> Option<(u32, String, u32, u32)> {
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    match parts.as_slice() {
        ["", "local", "domain", bd, "backend", kind, domid, devid] => {
            Some((bd.parse().ok()?, kind.to_string(), domid.parse().ok()?, devid.parse().ok()?))
        }
        _ => None,
    }
}

/// Backend kinds that are block devices.
pub const BLOCK_BACKENDS: &[&str] = &["vbd", "qdisk", "vbd3"];

/// Reads the disk whose backend directory is `backend_path`.
pub fn read_disk(xs: &impl XenstoreRead, backend_path: &str) -> Option<Disk> {
    let (backend_domid, backend, _, devid) = parse_backend_path(backend_path)?;
    let key = |k: &str| xs.read(&format!("{backend_path}/{k}"));
    let params = key("params").unwrap_or_default();
    let (format, target) = parse_params(&params);
    let lv = target.as_deref().and_then(LvRef::from_device_path);
    Some(Disk {
        devid,
        vdev: key("dev"),
        backend,
        backend_domid,
        backend_type: key("type"),
        format,
        lv,
        target,
        params,
        mode: key("mode").as_deref().and_then(Mode::parse),
        xenstore: backend_path.to_string(),
    })
}

/// All virtual disks of `domid`, ordered by device number.
pub fn disks_of(xs: &impl XenstoreRead, domid: u32) -> Vec<Disk> {
    let mut backends: Vec<String> = Vec::new();
    let front = format!("/local/domain/{domid}/device/vbd");
    for devid in xs.list(&front) {
        if let Some(b) = xs.read(&format!("{front}/{devid}/backend")) {
            backends.push(b);
        }
    }
    for kind in BLOCK_BACKENDS {
        let dir = format!("/local/domain/0/backend/{kind}/{domid}");
        for devid in xs.list(&dir) {
            let b = format!("{dir}/{devid}");
            if !backends.contains(&b) {
                backends.push(b);
            }
        }
    }
    let mut disks: Vec<Disk> = backends.iter().filter_map(|b| read_disk(xs, b)).collect();
    disks.sort_by_key(|d| d.devid);
    disks
}

/// Replaces the path-based guess of each disk's LV with lvm's answer:
/// the LV whose paths match the disk's target, or none if no LV does
/// (a partition, an md device, a file).
pub fn resolve_lvs(disks: &mut [Disk], lvs: &[LogicalVolume]) {
    for d in disks {
        d.lv = d.target.as_deref().and_then(|t| lvs.iter().find(|lv| lv.matches(t))).map(LogicalVolume::lv_ref);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `xenstore-ls -f` shows on a Xen 4.17 dom0 for a PV guest made
    /// from `disk = ['phy:/dev/vg0/g1,xvda,w', 'phy:/dev/vg0/g1-swap,xvdb,w']`
    /// plus a read-only QEMU-backed ISO (abridged to the keys that matter).
    const TREE: &str = r#"
/local/domain/0/name = "Domain-0"
/local/domain/3/name = "g1"
/local/domain/3/device/vbd/51712/backend = "/local/domain/0/backend/vbd/3/51712"
/local/domain/3/device/vbd/51712/backend-id = "0"
/local/domain/3/device/vbd/51712/state = "4"
/local/domain/3/device/vbd/51712/virtual-device = "51712"
/local/domain/3/device/vbd/51728/backend = "/local/domain/0/backend/vbd/3/51728"
/local/domain/3/device/vbd/51728/state = "4"
/local/domain/3/device/vbd/51744/backend = "/local/domain/0/backend/qdisk/3/51744"
/local/domain/0/backend/vbd/3/51712/frontend = "/local/domain/3/device/vbd/51712"
/local/domain/0/backend/vbd/3/51712/params = "/dev/vg0/g1"
/local/domain/0/backend/vbd/3/51712/script = "/etc/xen/scripts/block"
/local/domain/0/backend/vbd/3/51712/type = "phy"
/local/domain/0/backend/vbd/3/51712/mode = "w"
/local/domain/0/backend/vbd/3/51712/dev = "xvda"
/local/domain/0/backend/vbd/3/51712/physical-device = "fe:1"
/local/domain/0/backend/vbd/3/51712/physical-device-path = "/dev/dm-1"
/local/domain/0/backend/vbd/3/51728/params = "phy:/dev/mapper/vg0-g1--swap"
/local/domain/0/backend/vbd/3/51728/type = "phy"
/local/domain/0/backend/vbd/3/51728/mode = "w"
/local/domain/0/backend/vbd/3/51728/dev = "xvdb"
/local/domain/0/backend/qdisk/3/51744/params = "raw:/srv/iso/debian.iso"
/local/domain/0/backend/qdisk/3/51744/type = "qdisk"
/local/domain/0/backend/qdisk/3/51744/mode = "r"
/local/domain/0/backend/qdisk/3/51744/dev = "xvdc"
/local/domain/0/backend/vbd/5/51712/params = "/dev/vg0/g2"
/local/domain/0/backend/vbd/5/51712/type = "phy"
/local/domain/0/backend/vbd/5/51712/mode = "w"
/local/domain/0/backend/vbd/5/51712/dev = "xvda"
"#;

    #[test]
    fn params_values() {
        assert_eq!(parse_params("/dev/vg0/g1"), (None, Some("/dev/vg0/g1".into())));
        assert_eq!(parse_params("phy:/dev/vg0/g1"), (None, Some("/dev/vg0/g1".into())));
        assert_eq!(parse_params("qcow2:/srv/xen/g1.qcow2"), (Some("qcow2".into()), Some("/srv/xen/g1.qcow2".into())));
        assert_eq!(parse_params("tap:aio:/srv/xen/g1.img"), (Some("aio".into()), Some("/srv/xen/g1.img".into())));
        assert_eq!(parse_params("file:/srv/xen/g1.img"), (None, Some("/srv/xen/g1.img".into())));
        assert_eq!(parse_params(""), (None, None));
        // An empty CD drive: format only.
        assert_eq!(parse_params("raw:"), (Some("raw".into()), None));
        // A relative target is kept as it is.
        assert_eq!(parse_params("g1.img"), (None, Some("g1.img".into())));
    }

    #[test]
    fn backend_paths() {
        assert_eq!(parse_backend_path("/local/domain/0/backend/vbd/3/51712"), Some((0, "vbd".into(), 3, 51712)));
        assert_eq!(parse_backend_path("/local/domain/7/backend/qdisk/12/768/"), Some((7, "qdisk".into(), 12, 768)));
        assert_eq!(parse_backend_path("/local/domain/0/backend/vbd/3"), None);
        assert_eq!(parse_backend_path("/local/domain/x/backend/vbd/3/1"), None);
    }

    #[test]
    fn modes() {
        assert_eq!(Mode::parse("w"), Some(Mode::ReadWrite));
        assert_eq!(Mode::parse("w!"), Some(Mode::ReadWrite));
        assert_eq!(Mode::parse("r"), Some(Mode::ReadOnly));
        assert_eq!(Mode::parse(""), None);
    }

    #[test]
    fn discovers_disks_through_frontends() {
        let xs = MemStore::from_xenstore_ls(TREE);
        let disks = disks_of(&xs, 3);
        assert_eq!(disks.len(), 3);
        let (a, b, c) = (&disks[0], &disks[1], &disks[2]);
        assert_eq!(a.devid, 51712);
        assert_eq!(a.vdev.as_deref(), Some("xvda"));
        assert_eq!(a.backend, "vbd");
        assert_eq!(a.backend_type.as_deref(), Some("phy"));
        assert_eq!(a.target.as_deref(), Some("/dev/vg0/g1"));
        assert_eq!(a.mode, Some(Mode::ReadWrite));
        assert_eq!(a.lv, Some(LvRef::new("vg0", "g1")));
        assert_eq!(b.lv, Some(LvRef::new("vg0", "g1-swap")));
        assert_eq!(c.backend, "qdisk");
        assert_eq!(c.format.as_deref(), Some("raw"));
        assert_eq!(c.target.as_deref(), Some("/srv/iso/debian.iso"));
        assert_eq!(c.mode, Some(Mode::ReadOnly));
        assert_eq!(c.lv, None);
    }

    #[test]
    fn falls_back_to_backend_directories() {
        // Domain 5 has no frontend entries yet (restored, paused).
        let xs = MemStore::from_xenstore_ls(TREE);
        let disks = disks_of(&xs, 5);
        assert_eq!(disks.len(), 1);
        assert_eq!(disks[0].lv, Some(LvRef::new("vg0", "g2")));
        assert_eq!(disks[0].xenstore, "/local/domain/0/backend/vbd/5/51712");
        // A domain without disks (dom0) has none.
        assert!(disks_of(&xs, 0).is_empty());
    }

    #[test]
    fn lvm_decides_which_targets_are_lvs() {
        let xs = MemStore::from_xenstore_ls(TREE);
        let mut disks = disks_of(&xs, 3);
        let lvs = vec![LogicalVolume {
            vg: "vg0".into(),
            name: "g1".into(),
            attr: "-wi-ao----".into(),
            size_bytes: 32 << 20,
            origin: None,
            path: Some("/dev/vg0/g1".into()),
            dm_path: Some("/dev/mapper/vg0-g1".into()),
            tags: Vec::new(),
        }];
        resolve_lvs(&mut disks, &lvs);
        assert_eq!(disks[0].lv, Some(LvRef::new("vg0", "g1")));
        // lvm knows no g1-swap: the guess is dropped.
        assert_eq!(disks[1].lv, None);
        assert_eq!(disks[2].lv, None);
    }

    #[test]
    fn mem_store_lists_children_once() {
        let xs = MemStore::from_xenstore_ls(TREE);
        assert_eq!(xs.list("/local/domain/3/device/vbd"), vec!["51712", "51728", "51744"]);
        assert_eq!(xs.list("/local/domain"), vec!["0", "3"]);
        assert_eq!(xs.read("/local/domain/3/name").as_deref(), Some("g1"));
        assert!(xs.list("/nope").is_empty());
    }
}
