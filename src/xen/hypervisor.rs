//! The open hypervisor: libxenctrl and libxenstore handles over the
//! libraries [`sys`] loaded. All `unsafe` calls of the safe layer are here.

use std::ffi::{CStr, CString};
use std::io;
use std::path::Path;
use std::ptr::{self, NonNull};

use super::disk::{self, XenstoreRead};
use super::domain::{Domain, DomainRef, RawInfo};
use super::sys::{self, Libraries};
use super::{check_dom0, XenError, BINDINGS_RELEASE};

/// How many domains one `xc_domain_getinfolist` call fetches.
const BATCH: usize = 128;

/// An open connection to the hypervisor and xenstore, for one thread.
pub struct Xen {
    libs: Libraries,
    logger: *mut sys::xentoollog_logger,
    xch: NonNull<sys::xc_interface>,
    /// NULL until connected; `xs_close` accepts NULL.
    xsh: *mut sys::xs_handle,
    release: String,
    extra: String,
}

fn last_os_error(what: impl Into<String>) -> XenError {
    XenError::Call { what: what.into(), source: io::Error::last_os_error() }
}

impl Xen {
    /// Opens the hypervisor of this dom0: checks that there is one, loads
    /// the libraries of the release the bindings are for, opens libxenctrl
    /// and refuses a hypervisor of another release, then connects to
    /// xenstore.
    pub fn open() -> Result<Xen, XenError> {
        let built_for = BINDINGS_RELEASE.expect("bindings imply a release");
        check_dom0(Path::new("/"))?;
        Self::open_unchecked(built_for)
    }

    /// [`Xen::open`] without the file-system check (tests use it to reach
    /// `xc_interface_open`'s own failure).
    pub fn open_unchecked(built_for: &str) -> Result<Xen, XenError> {
        let libs = Libraries::load(built_for).map_err(|(which, soname, e)| XenError::Library {
            soname,
            package: which.package(built_for),
            built_for: built_for.to_string(),
            reason: e.to_string(),
        })?;
        // SAFETY: every call below goes through function pointers resolved
        // from the libraries of the release the types were generated for;
        // pointers passed in are valid for the call, and the handles
        // returned are checked for NULL and owned by the returned value.
        unsafe {
            let logger = make_logger(&libs);
            let xch = (libs.ctrl.xc_interface_open)(logger, logger, 0);
            let Some(xch) = NonNull::new(xch) else {
                let source = io::Error::last_os_error();
                let hint = match source.raw_os_error() {
                    Some(libc::EACCES) | Some(libc::EPERM) => ": run xenmig as root",
                    Some(libc::ENOENT) => ": no /dev/xen/privcmd, the kernel is not running under Xen",
                    _ => "",
                };
                destroy_logger(&libs, logger);
                return Err(XenError::Open { source, hint });
            };
            let mut xen = Xen { libs, logger, xch, xsh: ptr::null_mut(), release: String::new(), extra: String::new() };
            // From here on `xen` owns the handles; `Drop` closes them.
            xen.xsh = (xen.libs.store.xs_open)(0);
            if xen.xsh.is_null() {
                return Err(XenError::Xenstore { source: io::Error::last_os_error() });
            }

            let v = (xen.libs.ctrl.xc_version)(xen.xch.as_ptr(), sys::XENVER_version as i32, ptr::null_mut());
            if v < 0 {
                return Err(last_os_error("xc_version"));
            }
            let (major, minor) = ((v as u32) >> 16, (v as u32) & 0xffff);
            xen.release = format!("{major}.{minor}");
            let mut extra: sys::xen_extraversion_t = [0; 16];
            if (xen.libs.ctrl.xc_version)(xen.xch.as_ptr(), sys::XENVER_extraversion as i32, extra.as_mut_ptr().cast())
                >= 0
            {
                extra[15] = 0;
                xen.extra = CStr::from_ptr(extra.as_ptr()).to_string_lossy().into_owned();
            }
            if xen.release != built_for {
                return Err(XenError::VersionMismatch { running: xen.version(), built_for: built_for.to_string() });
            }
            Ok(xen)
        }
    }

    /// The running hypervisor's version, `4.17.3` (release plus extra).
    pub fn version(&self) -> String {
        format!("{}{}", self.release, self.extra)
    }

    /// Run `f` with a fresh libxl context, freed afterwards. Allocated per
    /// call: a context is not cheap to keep and xenmig needs one rarely.
    fn with_libxl<T>(&self, f: impl FnOnce(*mut sys::libxl_ctx) -> Result<T, XenError>) -> Result<T, XenError> {
        // libxl requires a non-NULL logger (it crashes with NULL), which
        // `self.logger` is unless the logger library failed, checked here.
        if self.logger.is_null() {
            return Err(XenError::Libxl("no logger for libxl".into()));
        }
        let mut ctx: *mut sys::libxl_ctx = ptr::null_mut();
        // SAFETY: see `open`; `ctx` is written by libxl_ctx_alloc and checked
        // for NULL before use.
        let rc = unsafe { (self.libs.light.libxl_ctx_alloc)(&mut ctx, sys::LIBXL_VERSION as i32, 0, self.logger) };
        if rc != 0 || ctx.is_null() {
            return Err(XenError::Libxl(format!("libxl_ctx_alloc failed (error {rc})")));
        }
        let out = f(ctx);
        // SAFETY: `ctx` came from libxl_ctx_alloc above and is freed once.
        unsafe { (self.libs.light.libxl_ctx_free)(ctx) };
        out
    }

    /// What libxl reports (`4.17.3`): the toolstack library can make a
    /// context on this host.
    pub fn toolstack_version(&self) -> Result<String, XenError> {
        self.with_libxl(|ctx| {
            // SAFETY: `ctx` is a live context; the returned info is owned by
            // it and only read before it is freed.
            unsafe {
                let info = (self.libs.light.libxl_get_version_info)(ctx);
                if info.is_null() {
                    return Err(XenError::Libxl("libxl_get_version_info returned nothing".into()));
                }
                let i = &*info;
                let extra = if i.xen_version_extra.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(i.xen_version_extra).to_string_lossy().into_owned()
                };
                Ok(format!("{}.{}{}", i.xen_version_major, i.xen_version_minor, extra))
            }
        })
    }

    /// Resume a domain that suspended for a save or migration that did not
    /// complete (`libxl_domain_resume` with `suspend_cancel`: the guest
    /// returns from its suspend hypercall and carries on). xl has no
    /// command for this; `migrate --recover` needs it.
    pub fn resume(&self, domid: u32) -> Result<(), XenError> {
        self.with_libxl(|ctx| {
            // SAFETY: a live context, a synchronous call (NULL ao_how).
            let rc = unsafe { (self.libs.light.libxl_domain_resume)(ctx, domid, 1, ptr::null()) };
            if rc != 0 {
                return Err(XenError::Libxl(format!("libxl_domain_resume of domain {domid} failed (error {rc})")));
            }
            Ok(())
        })
    }

    /// The domain's UUID, from xenstore (`/local/domain/<id>/vm` names
    /// `/vm/<uuid>`).
    pub fn uuid(&self, domid: u32) -> Option<String> {
        let vm = self.read(&format!("/local/domain/{domid}/vm"))?;
        let u = vm.trim().trim_start_matches("/vm/");
        (u.len() == 36 && u.chars().all(|c| c.is_ascii_hexdigit() || c == '-')).then(|| u.to_string())
    }

    /// The hypervisor's raw view of every domain, in domain id order.
    pub fn raw_domains(&self) -> Result<Vec<RawInfo>, XenError> {
        let mut out = Vec::new();
        let mut first: u32 = 0;
        loop {
            let mut buf = vec![sys::xc_domaininfo_t::default(); BATCH];
            // SAFETY: `buf` holds BATCH writable entries.
            let n = unsafe {
                (self.libs.ctrl.xc_domain_getinfolist)(self.xch.as_ptr(), first, BATCH as u32, buf.as_mut_ptr())
            };
            if n < 0 {
                return Err(last_os_error("xc_domain_getinfolist"));
            }
            let n = n as usize;
            for info in &buf[..n.min(BATCH)] {
                out.push(RawInfo {
                    domid: info.domain as u32,
                    flags: info.flags,
                    tot_pages: info.tot_pages,
                    max_pages: info.max_pages,
                    online_vcpus: info.nr_online_vcpus,
                    cpu_time_ns: info.cpu_time,
                });
            }
            match out.last() {
                Some(last) if n == BATCH => first = last.domid + 1,
                _ => break,
            }
        }
        Ok(out)
    }

    /// Every domain, with its name and disks from xenstore.
    pub fn domains(&self) -> Result<Vec<Domain>, XenError> {
        Ok(self.raw_domains()?.into_iter().map(|raw| self.describe(raw)).collect())
    }

    fn describe(&self, raw: RawInfo) -> Domain {
        let name = self.read(&format!("/local/domain/{}/name", raw.domid));
        let mut d = Domain::from_raw(raw, name);
        d.disks = disk::disks_of(self, raw.domid);
        d
    }

    /// The domain `r` names.
    pub fn domain(&self, r: &DomainRef) -> Result<Domain, XenError> {
        let domains = self.domains()?;
        r.select(&domains).cloned().ok_or_else(|| XenError::NoSuchDomain(r.clone()))
    }

    /// Stops scheduling the domain's vCPUs (`xl pause`).
    pub fn pause(&self, r: &DomainRef) -> Result<Domain, XenError> {
        let d = self.domain(r)?;
        // SAFETY: plain call on an open handle.
        if unsafe { (self.libs.ctrl.xc_domain_pause)(self.xch.as_ptr(), d.id) } != 0 {
            return Err(last_os_error(format!("pause {}", d.label())));
        }
        self.domain(&DomainRef::Id(d.id))
    }

    /// Lets the domain run again (`xl unpause`).
    pub fn unpause(&self, r: &DomainRef) -> Result<Domain, XenError> {
        let d = self.domain(r)?;
        // SAFETY: plain call on an open handle.
        if unsafe { (self.libs.ctrl.xc_domain_unpause)(self.xch.as_ptr(), d.id) } != 0 {
            return Err(last_os_error(format!("unpause {}", d.label())));
        }
        self.domain(&DomainRef::Id(d.id))
    }
}

impl XenstoreRead for Xen {
    fn read(&self, path: &str) -> Option<String> {
        let p = CString::new(path).ok()?;
        let mut len: libc::c_uint = 0;
        // SAFETY: xs_read returns a malloc'd buffer of `len` bytes (plus a
        // NUL) or NULL; we copy it out and free it.
        unsafe {
            let v = (self.libs.store.xs_read)(self.xsh, sys::XBT_NULL, p.as_ptr(), &mut len);
            if v.is_null() {
                return None;
            }
            let bytes = std::slice::from_raw_parts(v.cast::<u8>(), len as usize);
            let s = String::from_utf8_lossy(bytes).into_owned();
            libc::free(v);
            Some(s)
        }
    }

    fn list(&self, path: &str) -> Vec<String> {
        let Ok(p) = CString::new(path) else {
            return Vec::new();
        };
        let mut num: libc::c_uint = 0;
        // SAFETY: xs_directory returns one malloc'd block holding `num`
        // pointers followed by the strings they point to, or NULL; one
        // free releases it all.
        unsafe {
            let v = (self.libs.store.xs_directory)(self.xsh, sys::XBT_NULL, p.as_ptr(), &mut num);
            if v.is_null() {
                return Vec::new();
            }
            let out = (0..num as usize).map(|i| CStr::from_ptr(*v.add(i)).to_string_lossy().into_owned()).collect();
            libc::free(v.cast());
            out
        }
    }
}

impl Drop for Xen {
    fn drop(&mut self) {
        // SAFETY: the handles were opened in `open` and are closed once.
        unsafe {
            (self.libs.store.xs_close)(self.xsh);
            (self.libs.ctrl.xc_interface_close)(self.xch.as_ptr());
            destroy_logger(&self.libs, self.logger);
        }
    }
}

/// A libxentoollog logger writing errors to (a duplicate of) stderr: what
/// the Xen libraries report when a call fails, in their own words.
///
/// # Safety
/// `libs` must hold the libxentoollog of the release the bindings were made
/// for (what [`Libraries::load`] returns). The logger returned (or NULL) is
/// the caller's, to be freed once with [`destroy_logger`].
unsafe fn make_logger(libs: &Libraries) -> *mut sys::xentoollog_logger {
    let fd = libc::dup(2);
    if fd < 0 {
        return ptr::null_mut();
    }
    let f = libc::fdopen(fd, c"w".as_ptr());
    if f.is_null() {
        libc::close(fd);
        return ptr::null_mut();
    }
    let l = (libs.toollog.xtl_createlogger_stdiostream)(f.cast(), sys::xentoollog_level_XTL_ERROR, 0);
    // The stdiostream logger begins with the generic logger struct.
    l.cast()
}

/// # Safety
/// `logger` is NULL or came from [`make_logger`] with the same `libs`, and
/// is not used afterwards.
unsafe fn destroy_logger(libs: &Libraries, logger: *mut sys::xentoollog_logger) {
    if !logger.is_null() {
        (libs.toollog.xtl_logger_destroy)(logger);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Past the file-system check, on a machine without Xen the libraries
    /// (installed with libxen-dev) load and `xc_interface_open` itself
    /// fails; that must be an error naming the call, not a crash.
    #[test]
    fn open_without_hypervisor_fails_cleanly() {
        if check_dom0(Path::new("/")).is_ok() {
            return; // a real dom0: nothing to provoke here
        }
        match Xen::open_unchecked(BINDINGS_RELEASE.unwrap()) {
            Err(XenError::Open { .. }) | Err(XenError::Library { .. }) => {}
            Err(e) => panic!("unexpected error: {e}"),
            Ok(_) => panic!("opened a hypervisor that check_dom0 says is absent"),
        }
        let e = Xen::open().err().expect("no hypervisor here");
        assert!(matches!(e, XenError::NoHypervisor { .. } | XenError::NotDom0 { .. }), "{e}");
    }

    #[test]
    fn wrong_release_names_the_library() {
        match Xen::open_unchecked("9.99") {
            Err(XenError::Library { soname, built_for, .. }) => {
                assert!(
                    soname.ends_with(".so.9.99") || soname.ends_with(".so.1") || soname.ends_with(".so.4"),
                    "{soname}"
                );
                assert_eq!(built_for, "9.99");
            }
            Err(e) => panic!("unexpected error: {e}"),
            Ok(_) => panic!("loaded libraries of a Xen release that does not exist"),
        }
    }
}
