//! Build script: Rust bindings to Xen's toolstack libraries.
//!
//! xenmig must build on any machine (CI, a laptop, a dom0), but its Xen
//! commands need bindings generated from the headers of the Xen release
//! they will talk to, because libxenctrl and libxl change their interface
//! with every release. So:
//!
//! - When the Xen headers (Debian: `libxen-dev`) and libclang (`libclang-dev`)
//!   are present, bindgen reads `xen-headers/wrapper.h` and writes, into
//!   `OUT_DIR`, one file of types and constants plus one loader struct per
//!   library (bindgen's dynamic-loading mode: function pointers resolved at
//!   run time with `libloading`). Nothing is linked against Xen.
//! - The Xen release the headers belong to is recorded in the env var
//!   `XENMIG_XEN_VERSION` (`4.17`) and `XENMIG_XEN_PACKAGE` (the full
//!   package version, if known), so the binary can name the sonames to load
//!   and refuse to drive a different hypervisor release.
//! - Otherwise (or with `XENMIG_NO_XEN_BINDINGS=1`, used to test that
//!   path) the crate is built with `cfg(xenmig_no_xen_bindings)` and a cargo
//!   warning; its Xen commands then say how to get bindings.
//!
//! Only the functions and types that `src/xen` uses are allowlisted.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The headers `wrapper.h` includes; all must exist for bindings to be made.
const HEADERS: &[&str] = &["xenctrl.h", "xenstore.h", "libxl.h", "xentoollog.h"];

/// One bindgen run per shared library: the loader struct's name and the
/// functions it resolves.
const LIBRARIES: &[(&str, &str, &[&str])] = &[
    (
        "XenCtrlLib",
        "xenctrl_fns.rs",
        &[
            "xc_interface_open",
            "xc_interface_close",
            "xc_version",
            "xc_domain_getinfolist",
            "xc_domain_pause",
            "xc_domain_unpause",
        ],
    ),
    ("XenStoreLib", "xenstore_fns.rs", &["xs_open", "xs_close", "xs_read", "xs_directory"]),
    (
        "XenLightLib",
        "xenlight_fns.rs",
        &["libxl_ctx_alloc", "libxl_ctx_free", "libxl_get_version_info", "libxl_domain_resume"],
    ),
    ("XenToolLogLib", "xentoollog_fns.rs", &["xtl_createlogger_stdiostream", "xtl_logger_destroy"]),
];

const TYPES: &[&str] = &[
    "xc_interface",
    "xc_domaininfo_t",
    "xs_handle",
    "xs_transaction_t",
    "libxl_ctx",
    "libxl_version_info",
    "libxl_asyncop_how",
    "xentoollog_logger",
    "xentoollog_logger_stdiostream",
    "xentoollog_level",
    "xen_extraversion_t",
    "FILE",
];

const VARS: &[&str] =
    &["XEN_DOMINF_.*", "XENVER_version", "XENVER_extraversion", "XBT_NULL", "LIBXL_VERSION", "SHUTDOWN_.*"];

fn main() {
    println!("cargo:rustc-check-cfg=cfg(xenmig_no_xen_bindings)");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=xen-headers/wrapper.h");
    println!("cargo:rerun-if-env-changed=XENMIG_NO_XEN_BINDINGS");
    println!("cargo:rerun-if-env-changed=XENMIG_XEN_INCLUDE");
    println!("cargo:rerun-if-env-changed=LIBCLANG_PATH");

    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    match generate(&out) {
        Ok(version) => {
            println!("cargo:rustc-env=XENMIG_XEN_VERSION={}", version.release);
            println!("cargo:rustc-env=XENMIG_XEN_PACKAGE={}", version.package);
        }
        Err(why) => {
            println!("cargo:rustc-cfg=xenmig_no_xen_bindings");
            println!("cargo:rustc-env=XENMIG_NO_XEN_REASON={why}");
            println!(
                "cargo:warning=building xenmig without Xen bindings ({why}); \
                 its Xen commands will refuse to run: install libxen-dev and libclang-dev and rebuild"
            );
        }
    }
}

struct XenVersion {
    /// `major.minor`, the part the library sonames and the ABI depend on.
    release: String,
    /// What the package manager calls it, or the release again.
    package: String,
}

fn generate(out: &Path) -> Result<XenVersion, String> {
    if env::var_os("XENMIG_NO_XEN_BINDINGS").is_some_and(|v| !v.is_empty() && v != "0") {
        return Err("XENMIG_NO_XEN_BINDINGS is set".into());
    }
    let include = find_include_dir()?;
    for h in HEADERS {
        println!("cargo:rerun-if-changed={}", include.join(h).display());
    }
    let version = xen_version(&include)?;

    let clang_args = [format!("-I{}", include.display())];
    let wrapper = "xen-headers/wrapper.h";

    // bindgen (runtime feature) panics when it cannot load libclang; a
    // missing libclang must not fail the build.
    let types = guarded(|| {
        let mut b = bindgen::Builder::default()
            .header(wrapper)
            .clang_args(clang_args.iter())
            .allowlist_recursively(true)
            .opaque_type("_IO_FILE")
            .opaque_type("FILE")
            .layout_tests(true)
            .derive_default(true);
        for t in TYPES {
            b = b.allowlist_type(t);
        }
        for v in VARS {
            b = b.allowlist_var(v);
        }
        b.generate().map_err(|e| e.to_string())
    })?;
    types.write_to_file(out.join("xen_types.rs")).map_err(|e| format!("cannot write bindings: {e}"))?;

    for (lib, file, functions) in LIBRARIES {
        let fns = guarded(|| {
            let mut b = bindgen::Builder::default()
                .header(wrapper)
                .clang_args(clang_args.iter())
                .allowlist_recursively(false)
                .dynamic_library_name(*lib)
                .dynamic_link_require_all(true);
            for f in *functions {
                b = b.allowlist_function(f);
            }
            b.generate().map_err(|e| e.to_string())
        })?;
        fns.write_to_file(out.join(file)).map_err(|e| format!("cannot write bindings: {e}"))?;
    }
    Ok(version)
}

/// Runs a bindgen step, turning both its errors and its panics (libclang
/// missing) into a reason for building without bindings.
fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("bindgen failed on the Xen headers: {e}")),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!("bindgen could not run, libclang is probably missing: {}", msg.lines().next().unwrap_or("")))
        }
    }
}

fn find_include_dir() -> Result<PathBuf, String> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(dir) = env::var_os("XENMIG_XEN_INCLUDE") {
        candidates.push(dir.into());
    }
    candidates.push("/usr/include".into());
    candidates.push("/usr/local/include".into());
    for dir in &candidates {
        if HEADERS.iter().all(|h| dir.join(h).is_file()) {
            return Ok(dir.clone());
        }
    }
    for dir in &candidates {
        println!("cargo:rerun-if-changed={}", dir.join("xenctrl.h").display());
    }
    Err(format!(
        "Xen headers ({}) not found in {}",
        HEADERS.join(", "),
        candidates.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
    ))
}

/// The Xen release the headers come from. Xen's public headers carry no
/// version macro (libxl.h only documents LIBXL_API_VERSION), so ask the
/// package manager, then look at the development symlink `libxenctrl.so`,
/// which points at the versioned soname installed with these headers.
fn xen_version(include: &Path) -> Result<XenVersion, String> {
    if include == Path::new("/usr/include") {
        if let Ok(o) = Command::new("dpkg-query").args(["-W", "-f=${Version}", "libxen-dev"]).output() {
            let full = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if o.status.success() {
                if let Some(release) = major_minor(&full) {
                    return Ok(XenVersion { release, package: format!("libxen-dev {full}") });
                }
            }
        }
    }
    let lib_dirs =
        ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"];
    for dir in lib_dirs {
        if let Ok(target) = fs::read_link(Path::new(dir).join("libxenctrl.so")) {
            let name = target.to_string_lossy().to_string();
            if let Some(v) = name.strip_prefix("libxenctrl.so.") {
                if let Some(release) = major_minor(v) {
                    return Ok(XenVersion { package: format!("libxenctrl.so.{v}"), release });
                }
            }
        }
    }
    Err("cannot tell which Xen release the headers are from (no dpkg record of libxen-dev, no libxenctrl.so symlink)"
        .into())
}

/// `4.17.7+13-g2445b30a44-0+deb12u1` -> `4.17`.
fn major_minor(v: &str) -> Option<String> {
    // A Debian epoch (`1:`) is not part of the upstream version.
    let v = v.split_once(':').map_or(v, |(_, rest)| rest);
    let mut parts = v.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next()?.parse().ok()?;
    Some(format!("{major}.{minor}"))
}
