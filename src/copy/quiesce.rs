//! Freeze and thaw hooks of a live copy.
//!
//! The freeze is whatever makes the source stop changing: `fsfreeze -f` on a
//! mounted file system in tests, a domain suspend when the Xen migrate
//! command drives the engine. The thaw always runs once the freeze was
//! attempted, on success and on every failure (also when the freeze command
//! itself failed half-way), because a guest left frozen is a guest lost.

use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{interrupt, EngineError};

/// How long a freeze command may take by default (`--freeze-timeout`).
pub const DEFAULT_FREEZE_TIMEOUT: Duration = Duration::from_secs(60);

/// Run `cmd` through `sh -c` to its end; its output goes to our stderr,
/// never to stdout, which may be the protocol stream of `xenmig serve`.
pub fn run_hook(what: &'static str, cmd: &str) -> Result<(), EngineError> {
    run_hook_limited(what, cmd, None, false)
}

/// Run `cmd` as [`run_hook`] does, in a process group of its own (so that a
/// terminal's Ctrl-C meant for xenmig does not kill a thaw half-way). With
/// `limit`, a command still running after it is killed (its whole group)
/// and the result is [`EngineError::HookTimeout`]; with `interruptible`, a
/// signal caught by [`interrupt`] kills it too.
pub fn run_hook_limited(
    what: &'static str,
    cmd: &str,
    limit: Option<Duration>,
    interruptible: bool,
) -> Result<(), EngineError> {
    let stderr = std::io::stderr().as_fd().try_clone_to_owned();
    let out = match stderr {
        Ok(fd) => Stdio::from(fd),
        Err(_) => Stdio::null(),
    };
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(out)
        .process_group(0)
        .spawn()
        .map_err(|e| EngineError::Hook { what, command: cmd.into(), detail: format!("cannot be run: {e}") })?;
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => {
                kill_group(&mut child);
                return Err(EngineError::Hook {
                    what,
                    command: cmd.into(),
                    detail: format!("cannot be waited for: {e}"),
                });
            }
        }
        if interruptible {
            if let Err(e) = interrupt::check() {
                log::warn!("{e}: killing the {what} command '{cmd}'");
                kill_group(&mut child);
                return Err(e);
            }
        }
        if let Some(limit) = limit {
            if started.elapsed() >= limit {
                kill_group(&mut child);
                return Err(EngineError::HookTimeout { what, command: cmd.to_string(), seconds: limit.as_secs() });
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if !status.success() {
        return Err(EngineError::Hook { what, command: cmd.into(), detail: format!("failed ({status})") });
    }
    Ok(())
}

/// Kill a hook and everything it started (it leads its own process group),
/// then reap it.
fn kill_group(child: &mut Child) {
    let pgid = child.id() as libc::pid_t;
    // SAFETY: kill(2) with a negative pid signals the process group `pgid`;
    // the child leads that group and is not reaped yet, so the id cannot
    // have been reused by an unrelated group.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let _ = child.wait();
}

/// What makes a live source stop changing, and undoes it: shell commands
/// ([`ShellHooks`], `copy --live --freeze-cmd/--thaw-cmd`), or anything a
/// caller plugs in (a test double; a domain pause). `thaw` must be safe
/// after a failed or partial `freeze`: [`Freeze`] calls it in every case.
pub trait Quiesce: Send {
    fn freeze(&mut self) -> Result<(), EngineError>;
    fn thaw(&mut self) -> Result<(), EngineError>;
}

/// Freeze and thaw by shell commands on the source's host; the freeze
/// command is killed after `limit` or on a signal ([`interrupt`]). While
/// frozen, a [`ThawGuardian`] stands by to thaw if xenmig dies.
pub struct ShellHooks {
    freeze_cmd: Option<String>,
    thaw_cmd: Option<String>,
    limit: Duration,
    guardian: Option<ThawGuardian>,
}

impl ShellHooks {
    pub fn new(freeze_cmd: Option<String>, thaw_cmd: Option<String>, limit: Duration) -> ShellHooks {
        ShellHooks { freeze_cmd, thaw_cmd, limit, guardian: None }
    }
}

impl Quiesce for ShellHooks {
    fn freeze(&mut self) -> Result<(), EngineError> {
        if let Some(cmd) = &self.freeze_cmd {
            if let Some(thaw) = &self.thaw_cmd {
                // Before the freeze: a kill during the freeze command must
                // thaw too (the thaw is safe after a partial freeze).
                self.guardian = Some(ThawGuardian::start(thaw)?);
            }
            log::info!("freezing the source: {cmd}");
            run_hook_limited("freeze", cmd, Some(self.limit), true)?;
        }
        Ok(())
    }

    /// Runs to its end whatever signals arrive meanwhile.
    fn thaw(&mut self) -> Result<(), EngineError> {
        if let Some(g) = self.guardian.take() {
            g.stand_down();
        }
        if let Some(cmd) = &self.thaw_cmd {
            log::info!("thawing the source: {cmd}");
            run_hook("thaw", cmd)?;
        }
        Ok(())
    }
}

/// A process that runs the thaw command if xenmig dies while the source is
/// frozen. SIGKILL (or the OOM killer) ends xenmig without any of its error
/// paths, and a frozen guest or file system would stay frozen. The guardian
/// is a shell in a process group of its own (out of reach of a signal to
/// xenmig's group) reading a pipe from xenmig: "thawing" makes it exit
/// quietly; end of file, which the kernel delivers when xenmig dies, makes
/// it run the thaw. The thaw command itself also runs in a group of its
/// own, so one that xenmig started finishes even if xenmig is killed
/// meanwhile, and the guardian, told first, does not run it twice.
struct ThawGuardian {
    child: Child,
}

/// The guardian's script: `$1` is the thaw command.
const GUARDIAN: &str = r#"IFS= read -r word; [ "$word" = thawing ] || exec sh -c "$1""#;

impl ThawGuardian {
    fn start(thaw_cmd: &str) -> Result<ThawGuardian, EngineError> {
        let stderr = std::io::stderr().as_fd().try_clone_to_owned();
        let out = match stderr {
            Ok(fd) => Stdio::from(fd),
            Err(_) => Stdio::null(),
        };
        // The pipe's write end is close-on-exec in xenmig: no other child
        // holds it open, so xenmig's death is its end of file.
        let child = Command::new("sh")
            .args(["-c", GUARDIAN, "xenmig-thaw-guardian", thaw_cmd])
            .stdin(Stdio::piped())
            .stdout(out)
            .process_group(0)
            .spawn()
            .map_err(|e| EngineError::Hook {
                what: "thaw",
                command: thaw_cmd.into(),
                detail: format!("cannot be guarded (the guardian shell did not start: {e})"),
            })?;
        Ok(ThawGuardian { child })
    }

    /// xenmig thaws by itself: the guardian exits without running anything.
    fn stand_down(mut self) {
        use std::io::Write;
        if let Some(mut pipe) = self.child.stdin.take() {
            let _ = pipe.write_all(b"thawing\n");
        }
        let _ = self.child.wait();
    }
}

/// A frozen source; thaws on [`Freeze::thaw`] or, failing that, on drop.
pub struct Freeze {
    quiesce: Box<dyn Quiesce>,
    started: Instant,
    thawed: bool,
}

impl Freeze {
    /// Freeze through `quiesce`. If freezing fails, it is thawed too.
    pub fn begin(quiesce: Box<dyn Quiesce>) -> Result<Freeze, EngineError> {
        let mut guard = Freeze { quiesce, started: Instant::now(), thawed: false };
        // On error the guard drops here, and Drop thaws.
        guard.quiesce.freeze()?;
        Ok(guard)
    }

    /// Run the freeze command (at most [`DEFAULT_FREEZE_TIMEOUT`]). If it
    /// fails, the thaw command runs too.
    pub fn run(freeze_cmd: Option<&str>, thaw_cmd: Option<String>) -> Result<Freeze, EngineError> {
        Self::run_limited(freeze_cmd, thaw_cmd, DEFAULT_FREEZE_TIMEOUT)
    }

    /// Run the freeze command, killing it after `limit` or on a signal; if
    /// it fails, times out or is interrupted, the thaw command runs too.
    pub fn run_limited(
        freeze_cmd: Option<&str>,
        thaw_cmd: Option<String>,
        limit: Duration,
    ) -> Result<Freeze, EngineError> {
        Self::begin(Box::new(ShellHooks::new(freeze_cmd.map(String::from), thaw_cmd, limit)))
    }

    /// Thaw now; returns how long the source was frozen.
    pub fn thaw(mut self) -> Result<Duration, EngineError> {
        self.thawed = true;
        let frozen = self.started.elapsed();
        self.quiesce.thaw()?;
        Ok(frozen)
    }
}

impl Drop for Freeze {
    fn drop(&mut self) {
        if !self.thawed {
            if let Err(e) = self.quiesce.thaw() {
                log::error!("{e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test double: counts calls, fails the freeze when told to.
    struct Counting {
        fail_freeze: bool,
        log: std::sync::Arc<std::sync::Mutex<Vec<&'static str>>>,
    }

    impl Quiesce for Counting {
        fn freeze(&mut self) -> Result<(), EngineError> {
            self.log.lock().unwrap().push("freeze");
            if self.fail_freeze {
                return Err(EngineError::Hook { what: "freeze", command: "test".into(), detail: "failed".into() });
            }
            Ok(())
        }
        fn thaw(&mut self) -> Result<(), EngineError> {
            self.log.lock().unwrap().push("thaw");
            Ok(())
        }
    }

    #[test]
    fn any_quiesce_is_thawed_once_on_every_path() {
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let f = Freeze::begin(Box::new(Counting { fail_freeze: false, log: log.clone() })).unwrap();
        f.thaw().unwrap();
        assert_eq!(*log.lock().unwrap(), ["freeze", "thaw"]);
        log.lock().unwrap().clear();
        assert!(Freeze::begin(Box::new(Counting { fail_freeze: true, log: log.clone() })).is_err());
        assert_eq!(*log.lock().unwrap(), ["freeze", "thaw"], "a failed freeze is thawed");
        log.lock().unwrap().clear();
        drop(Freeze::begin(Box::new(Counting { fail_freeze: false, log: log.clone() })).unwrap());
        assert_eq!(*log.lock().unwrap(), ["freeze", "thaw"], "a dropped freeze is thawed");
    }

    /// The guardian thaws when its pipe ends without word from xenmig (what
    /// xenmig's death looks like to it), and only then.
    #[test]
    fn the_guardian_thaws_only_when_xenmig_is_gone() {
        let d = tempfile::tempdir().unwrap();
        let mark = d.path().join("thawed");
        let thaw = format!("echo x >> {}", mark.display());
        ThawGuardian::start(&thaw).unwrap().stand_down();
        assert!(!mark.exists(), "a guardian told 'thawing' ran the thaw");
        let g = ThawGuardian::start(&thaw).unwrap();
        let mut child = g.child;
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success());
        assert_eq!(std::fs::read_to_string(&mark).unwrap(), "x\n", "the guardian did not thaw once");
    }

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

    #[test]
    fn a_freeze_that_hangs_is_killed_and_thawed() {
        let d = tempfile::tempdir().unwrap();
        let mark = d.path().join("thawed");
        let child_mark = d.path().join("late");
        let t = Instant::now();
        // The sleep is a grandchild: the whole group must go.
        let freeze = format!("sleep 2; touch {}", child_mark.display());
        let e =
            Freeze::run_limited(Some(&freeze), Some(format!("touch {}", mark.display())), Duration::from_millis(300))
                .err()
                .expect("freeze times out");
        assert!(matches!(e, EngineError::HookTimeout { what: "freeze", .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3));
        assert!(mark.exists(), "no thaw after a timed-out freeze");
        std::thread::sleep(Duration::from_millis(2500).saturating_sub(t.elapsed()));
        assert!(!child_mark.exists(), "the freeze command's children kept running");
    }
}
