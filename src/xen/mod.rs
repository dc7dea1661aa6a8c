//! xenmig's Xen layer: the hypervisor, its domains, their disks.
//!
//! Which interface for what, and why:
//!
//! | need | interface | why |
//! |---|---|---|
//! | list domains, state, memory, vCPUs | libxenctrl `xc_domain_getinfolist` | one call for all domains, no daemon involved; `xc_domain_getinfo` is gone in Xen 4.18 |
//! | pause, unpause | libxenctrl `xc_domain_pause`/`_unpause` | the hypervisor operation itself, what xl ends up calling for a PV guest |
//! | names, disks | libxenstore `xs_read`/`xs_directory` | the toolstack records both only in xenstore |
//! | toolstack check, version | libxl `libxl_ctx_alloc`, `libxl_get_version_info` | proves the toolstack library of the right release is usable |
//! | save, restore | the `xl` command ([`xl`]) | xl's save-file format wraps libxl's stream with the domain config; see that module |
//! | running Xen version | libxenctrl `xc_version` | refuse a hypervisor of another release than the bindings |
//! | resume after a cancelled suspend | libxl `libxl_domain_resume` | xl has no command for it; `migrate` needs it when xl did not resume |
//! | a domain's UUID | xenstore `/local/domain/<id>/vm` | what migrate tags the domain's LVs with |
//!
//! Nothing is linked against Xen: [`sys`] loads `libxenctrl.so.<release>`,
//! `libxenstore.so.4`, `libxenlight.so.<release>` (and `libxentoollog.so.1`
//! for libxl's logger) by soname at run time, resolving the function types
//! bindgen declared from the headers at build time. A binary built where
//! the headers or libclang were missing has no [`sys`] at all
//! (`cfg(xenmig_no_xen_bindings)`) and every operation says how to get
//! bindings.
//!
//! xenstore is reached through libxenstore rather than the `xenstore-rs`
//! crate: its current release is GPL-3.0-only (xenmig is MIT/Apache-2.0)
//! and earlier releases link libxenstore at build time, which would tie the
//! binary to machines with Xen installed.
//!
//! The pure parts ([`domain`]: state decoding; [`disk`]: xenstore disk
//! records; [`xl`]: the xl command lines) build and are tested everywhere.

pub mod disk;
pub mod domain;
pub mod xl;

#[cfg(not(xenmig_no_xen_bindings))]
pub mod sys;

#[cfg(not(xenmig_no_xen_bindings))]
mod hypervisor;

#[cfg(xenmig_no_xen_bindings)]
#[path = "unbound.rs"]
mod hypervisor;

pub use disk::{Disk, Mode, XenstoreRead};
pub use domain::{Domain, DomainRef, State};
pub use hypervisor::Xen;

use std::io;
use std::path::{Path, PathBuf};

use crate::storage::lvm::LvmError;

/// The Xen release (`major.minor`) the bindings were generated for, if any.
pub const BINDINGS_RELEASE: Option<&str> = option_env!("XENMIG_XEN_VERSION");
/// The package (and full version) whose headers the bindings came from.
pub const BINDINGS_SOURCE: Option<&str> = option_env!("XENMIG_XEN_PACKAGE");
/// Why there are no bindings, when there are none.
pub const NO_BINDINGS_REASON: Option<&str> = option_env!("XENMIG_NO_XEN_REASON");

/// A short description of the bindings for messages and `--version` style
/// output: `Xen 4.17 (libxen-dev 4.17.7...)` or why there are none.
pub fn bindings_description() -> String {
    match (BINDINGS_RELEASE, BINDINGS_SOURCE) {
        (Some(r), Some(s)) => format!("Xen {r} (headers from {s})"),
        (Some(r), None) => format!("Xen {r}"),
        _ => format!("no Xen bindings ({})", NO_BINDINGS_REASON.unwrap_or("unknown reason")),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum XenError {
    #[error("this xenmig was built without Xen bindings ({reason}): install libxen-dev and libclang-dev and rebuild")]
    NoBindings { reason: String },
    #[error("no Xen hypervisor here: {detail}; xenmig's Xen commands run in dom0 of a Xen {built_for} host")]
    NoHypervisor { detail: String, built_for: String },
    #[error("this machine is a Xen guest (domU), not dom0: {detail}; run xenmig in dom0")]
    NotDom0 { detail: String },
    #[error("cannot load {soname} (Debian package {package}; xenmig's bindings are for Xen {built_for}): {reason}")]
    Library { soname: String, package: String, built_for: String, reason: String },
    #[error("cannot open the hypervisor interface (xc_interface_open): {source}{hint}")]
    Open { source: io::Error, hint: &'static str },
    #[error("the hypervisor runs Xen {running}, but this xenmig's bindings are for Xen {built_for}: rebuild xenmig on this host (with its libxen-dev)")]
    VersionMismatch { running: String, built_for: String },
    #[error("cannot connect to xenstore (xs_open): {source}; is xenstored running? (/etc/init.d/xen start)")]
    Xenstore { source: io::Error },
    #[error("libxl: {0}")]
    Libxl(String),
    #[error("{what}: {source}")]
    Call {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("no {0} on this host (see `xenmig domains`)")]
    NoSuchDomain(DomainRef),
    #[error("{domain}: {source}")]
    Xl {
        domain: String,
        #[source]
        source: xl::XlError,
    },
    #[error("save file {path}: {source}")]
    SaveFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Lvm(#[from] LvmError),
}

/// Files whose presence shows a Xen hypervisor with this kernel as dom0.
pub const PRIVCMD_PATHS: &[&str] = &["/dev/xen/privcmd", "/proc/xen/privcmd"];

/// Checks, from the file system alone, that this is dom0 of a running Xen:
/// before loading any library, so a plain Linux machine gets a plain
/// answer. `root` is `/` except in tests.
pub fn check_dom0(root: &Path) -> Result<(), XenError> {
    let at = |p: &str| root.join(p.trim_start_matches('/'));
    let built_for = BINDINGS_RELEASE.unwrap_or("(none)").to_string();
    let caps = std::fs::read_to_string(at("/proc/xen/capabilities")).ok();
    let privcmd = PRIVCMD_PATHS.iter().any(|p| at(p).exists());
    let hyp_type = std::fs::read_to_string(at("/sys/hypervisor/type")).ok().map(|s| s.trim().to_string());
    match (&caps, privcmd) {
        (Some(c), _) if c.contains("control_d") => Ok(()),
        (Some(_), _) => Err(XenError::NotDom0 { detail: "/proc/xen/capabilities lacks control_d".into() }),
        (None, true) => Ok(()),
        (None, false) => {
            if hyp_type.as_deref() == Some("xen") {
                Err(XenError::NotDom0 {
                    detail:
                        "/sys/hypervisor/type is xen but there is no /dev/xen/privcmd (is xenfs mounted on /proc/xen?)"
                            .into(),
                })
            } else {
                Err(XenError::NoHypervisor {
                    detail: "neither /dev/xen/privcmd nor /proc/xen exists (this kernel is not running under Xen)"
                        .into(),
                    built_for,
                })
            }
        }
    }
}

/// Saves `domain`'s CPU and memory to `file` with `xl save` (see [`xl`]);
/// the domain is destroyed afterwards unless `leave_paused`. Checks first,
/// through the hypervisor, that the domain exists, so that the error names
/// it rather than whatever xl prints.
pub fn save(xen: &Xen, domain: &DomainRef, file: &Path, leave_paused: bool) -> Result<Domain, XenError> {
    let d = xen.domain(domain)?;
    if d.id == 0 {
        return Err(XenError::Call {
            what: format!("save {}", d.label()),
            source: io::Error::new(io::ErrorKind::InvalidInput, "dom0 cannot be saved"),
        });
    }
    if let Some(dir) = file.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(XenError::SaveFile {
                path: file.to_path_buf(),
                source: io::Error::new(io::ErrorKind::NotFound, format!("directory {} does not exist", dir.display())),
            });
        }
    }
    xl::run(&xl::program(), &xl::save_args(&d.id.to_string(), file, leave_paused))
        .map_err(|source| XenError::Xl { domain: format!("save {} to {}", d.label(), file.display()), source })?;
    Ok(d)
}

/// Restores a domain saved by [`save`] or `xl save`, and returns it as
/// the hypervisor lists it afterwards (the domain that appeared).
pub fn restore(xen: &Xen, file: &Path, paused: bool) -> Result<Option<Domain>, XenError> {
    std::fs::File::open(file).map_err(|source| XenError::SaveFile { path: file.to_path_buf(), source })?;
    let before: Vec<u32> = xen.domains()?.iter().map(|d| d.id).collect();
    xl::run(&xl::program(), &xl::restore_args(file, paused))
        .map_err(|source| XenError::Xl { domain: format!("restore from {}", file.display()), source })?;
    Ok(xen.domains()?.into_iter().filter(|d| !before.contains(&d.id)).max_by_key(|d| d.id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_linux_has_no_hypervisor() {
        let root = tempfile::tempdir().unwrap();
        let e = check_dom0(root.path()).unwrap_err();
        assert!(matches!(e, XenError::NoHypervisor { .. }), "{e}");
        assert!(e.to_string().contains("/dev/xen/privcmd"), "{e}");
    }

    #[test]
    fn dom0_and_domu_are_told_apart() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("proc/xen")).unwrap();
        std::fs::write(root.path().join("proc/xen/capabilities"), "").unwrap();
        let e = check_dom0(root.path()).unwrap_err();
        assert!(matches!(e, XenError::NotDom0 { .. }), "{e}");

        std::fs::write(root.path().join("proc/xen/capabilities"), "control_d\n").unwrap();
        check_dom0(root.path()).unwrap();

        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("sys/hypervisor")).unwrap();
        std::fs::write(root.path().join("sys/hypervisor/type"), "xen\n").unwrap();
        let e = check_dom0(root.path()).unwrap_err();
        assert!(e.to_string().contains("xenfs"), "{e}");

        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("dev/xen")).unwrap();
        std::fs::write(root.path().join("dev/xen/privcmd"), "").unwrap();
        check_dom0(root.path()).unwrap();
    }

    #[test]
    fn bindings_are_described() {
        let d = bindings_description();
        match BINDINGS_RELEASE {
            Some(r) => assert!(d.starts_with(&format!("Xen {r}")), "{d}"),
            None => assert!(d.starts_with("no Xen bindings"), "{d}"),
        }
    }

    #[test]
    fn errors_name_what_is_missing() {
        let e = XenError::Library {
            soname: "libxenctrl.so.4.17".into(),
            package: "libxenmisc4.17".into(),
            built_for: "4.17".into(),
            reason: "cannot open shared object file".into(),
        };
        let m = e.to_string();
        assert!(m.contains("libxenctrl.so.4.17") && m.contains("Xen 4.17"), "{m}");
        let e = XenError::VersionMismatch { running: "4.18".into(), built_for: "4.17".into() };
        assert!(e.to_string().contains("runs Xen 4.18"), "{e}");
        let e = XenError::NoBindings { reason: "x".into() };
        assert!(e.to_string().contains("install libxen-dev and libclang-dev and rebuild"));
        let e = XenError::NoSuchDomain(DomainRef::parse("g9"));
        assert!(e.to_string().contains("domain 'g9'"), "{e}");
    }
}
