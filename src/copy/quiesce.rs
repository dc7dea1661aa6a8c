//! Freeze and thaw hooks of a live copy.
//!
//! The freeze is whatever makes the source stop changing: `fsfreeze -f` on a
//! mounted file system in tests, a domain suspend when the Xen migrate
//! command drives the engine. The thaw always runs once the freeze was
//! attempted, on success and on every failure (also when the freeze command
//! itself failed half-way), because a guest left frozen is a guest lost.

use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::EngineError;

/// Run `cmd` through `sh -c`; its output goes to our stderr, never to
/// stdout, which may be the protocol stream of `xenmig serve`.
pub fn run_hook(what: &str, cmd: &str) -> Result<(), EngineError> {
    let stderr = std::io::stderr().as_fd().try_clone_to_owned();
    let out = match stderr {
        Ok(fd) => Stdio::from(fd),
        Err(_) => Stdio::null(),
    };
    let status = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(out)
        .status()
        .map_err(|e| EngineError::Other(format!("cannot run the {what} command '{cmd}': {e}")))?;
    if !status.success() {
        return Err(EngineError::Other(format!("the {what} command '{cmd}' failed ({status})")));
    }
    Ok(())
}

/// A frozen source; thaws on [`Freeze::thaw`] or, failing that, on drop.
pub struct Freeze {
    thaw_cmd: Option<String>,
    started: Instant,
    thawed: bool,
}

impl Freeze {
    /// Run the freeze command. If it fails, the thaw command runs too.
    pub fn run(freeze_cmd: Option<&str>, thaw_cmd: Option<String>) -> Result<Freeze, EngineError> {
        let guard = Freeze { thaw_cmd, started: Instant::now(), thawed: false };
        if let Some(cmd) = freeze_cmd {
            log::info!("freezing the source: {cmd}");
            run_hook("freeze", cmd)?;
        }
        Ok(guard)
    }

    /// Thaw now; returns how long the source was frozen.
    pub fn thaw(mut self) -> Result<Duration, EngineError> {
        self.thawed = true;
        let frozen = self.started.elapsed();
        if let Some(cmd) = &self.thaw_cmd {
            log::info!("thawing the source: {cmd}");
            run_hook("thaw", cmd)?;
        }
        Ok(frozen)
    }
}

impl Drop for Freeze {
    fn drop(&mut self) {
        if !self.thawed {
            if let Some(cmd) = &self.thaw_cmd {
                if let Err(e) = run_hook("thaw", cmd) {
                    log::error!("{e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_freeze_still_thaws() {
        let d = tempfile::tempdir().unwrap();
        let mark = d.path().join("thawed");
        let thaw = format!("touch {}", mark.display());
        let e = Freeze::run(Some("exit 4"), Some(thaw)).err().expect("freeze fails");
        assert!(e.to_string().contains("freeze command 'exit 4' failed"), "{e}");
        assert!(mark.exists(), "thaw did not run after a failed freeze");
    }

    #[test]
    fn thaw_runs_once_and_reports_failure() {
        let d = tempfile::tempdir().unwrap();
        let count = d.path().join("count");
        let f = Freeze::run(Some("true"), Some(format!("echo x >> {}", count.display()))).unwrap();
        f.thaw().unwrap();
        assert_eq!(std::fs::read_to_string(&count).unwrap(), "x\n");
        let f = Freeze::run(None, Some("false".into())).unwrap();
        assert!(f.thaw().is_err());
    }
}
