//! Saving and restoring a domain's CPU and memory through the `xl` command.
//!
//! Why not libxl directly: `libxl_domain_suspend` writes only libxl's
//! migration stream, while `xl save` wraps that stream in xl's own header
//! carrying the domain configuration, and `xl restore` / `xl
//! migrate-receive` need that header to rebuild the domain. Restoring
//! through `libxl_domain_create_restore` would need a complete
//! `libxl_domain_config`, i.e. re-implementing xl's config parser and
//! save-file format, and the result would not be interchangeable with
//! files an operator made with `xl save`. Driving `xl` keeps xenmig's save
//! files identical to xl's (an operator can `xl restore` them and vice
//! versa), and uses the same code path that `xl migrate` uses, which the
//! disk migration will hook into. xl is in `xen-utils-<release>`, always
//! present where the toolstack libraries are used.
//!
//! The program is `xl` from `PATH`, or `$XENMIG_XL` (for tests and unusual
//! installs).

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum XlError {
    #[error(
        "the `xl` command ({program}) is not installed: it comes with Xen's tools (apt-get install xen-utils-4.17)"
    )]
    NotInstalled { program: String },
    #[error("cannot run `{command}`: {source}")]
    Io {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed { command: String, status: String, stderr: String },
}

/// The `xl` program to run.
pub fn program() -> PathBuf {
    std::env::var_os("XENMIG_XL").filter(|p| !p.is_empty()).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("xl"))
}

/// Arguments of `xl save`: `-p` leaves the domain paused after saving
/// instead of destroying it (a checkpoint).
pub fn save_args(domain: &str, file: &Path, leave_paused: bool) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec!["save".into()];
    if leave_paused {
        a.push("-p".into());
    }
    a.push(domain.into());
    a.push(file.into());
    a
}

/// Arguments of `xl restore`: `-p` leaves the restored domain paused.
pub fn restore_args(file: &Path, paused: bool) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec!["restore".into()];
    if paused {
        a.push("-p".into());
    }
    a.push(file.into());
    a
}

/// Runs `program args`, with xl's progress and messages passed to our
/// stderr as they come except for the last lines, which go into the error
/// when it fails.
pub fn run(program: &Path, args: &[OsString]) -> Result<(), XlError> {
    let command = std::iter::once(program.display().to_string())
        .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                XlError::NotInstalled { program: program.display().to_string() }
            } else {
                XlError::Io { command: command.clone(), source: e }
            }
        })?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        for l in stderr.lines() {
            log::info!("xl: {l}");
        }
        return Ok(());
    }
    let tail: Vec<&str> = stderr.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let tail = tail[tail.len().saturating_sub(6)..].join("; ");
    Err(XlError::Failed {
        command,
        status: out.status.to_string(),
        stderr: if tail.is_empty() { "(nothing on stderr)".into() } else { tail },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_follow_xl() {
        assert_eq!(save_args("g1", Path::new("/tmp/g1.save"), false), vec!["save", "g1", "/tmp/g1.save"]);
        assert_eq!(save_args("g1", Path::new("/tmp/g1.save"), true), vec!["save", "-p", "g1", "/tmp/g1.save"]);
        assert_eq!(restore_args(Path::new("/tmp/g1.save"), true), vec!["restore", "-p", "/tmp/g1.save"]);
        assert_eq!(restore_args(Path::new("/tmp/g1.save"), false), vec!["restore", "/tmp/g1.save"]);
    }

    #[test]
    fn missing_xl_is_named() {
        let e = run(Path::new("/nonexistent/xl"), &["list".into()]).unwrap_err();
        assert!(matches!(e, XlError::NotInstalled { .. }), "{e}");
        assert!(e.to_string().contains("xen-utils"), "{e}");
    }

    #[test]
    fn failure_carries_xl_stderr_and_command() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("xl");
        crate::test_script::write_executable(
            &fake,
            "#!/bin/sh\necho \"Saving to $3 new xl format (info 0x3/0x0/1246)\" >&2\necho \"libxl: error: domain $2 not found\" >&2\nexit 3\n",
        );
        let e = run(&fake, &save_args("g1", Path::new("/tmp/g1.save"), false)).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("save g1 /tmp/g1.save"), "{msg}");
        assert!(msg.contains("domain g1 not found"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
    }

    #[test]
    fn success_is_ok() {
        run(Path::new("/bin/true"), &restore_args(Path::new("/x"), true)).unwrap();
    }
}
