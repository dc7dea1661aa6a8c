//! SIGINT, SIGTERM and SIGHUP as errors.
//!
//! A signal that simply ended the process would leave a frozen source
//! frozen (the thaw runs on the error path) and device-mapper tracking
//! snapshots behind. [`install`] replaces the default action of those
//! signals with a handler that only records the first signal; the copy
//! checks [`check`] between steps and while it waits, and turns it into
//! [`EngineError::Interrupted`], so an interruption takes the same path as
//! any other failure: thaw, snapshots removed, the peer told, exit status 1.
//! Further signals are recorded nowhere and change nothing, so a second
//! Ctrl-C cannot skip the thaw. Hook commands run in their own process
//! group (see `quiesce`), so a terminal's Ctrl-C does not reach them either.

use std::sync::atomic::{AtomicI32, Ordering};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

use super::EngineError;

/// The first signal received (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only an atomic compare-exchange: async-signal-safe.
    let _ = SIGNAL.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
}

/// The signals that interrupt a copy.
pub const SIGNALS: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

/// Catch SIGINT, SIGTERM and SIGHUP for the rest of the process's life.
pub fn install() -> Result<(), EngineError> {
    // SA_RESTART: system calls of other threads that the signal happens to
    // land on resume instead of failing with EINTR.
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::SA_RESTART, SigSet::empty());
    for sig in SIGNALS {
        // SAFETY: the handler only performs an atomic compare-exchange on a
        // static, which is async-signal-safe; it touches no locks, no
        // allocator and no thread-local state.
        unsafe { sigaction(sig, &action) }
            .map_err(|e| EngineError::Signals { signal: sig.as_str(), source: std::io::Error::from(e) })?;
    }
    Ok(())
}

/// The signal received, if any.
pub fn pending() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// `Err(Interrupted)` once a signal was received.
pub fn check() -> Result<(), EngineError> {
    match pending() {
        None => Ok(()),
        Some(signal) => Err(EngineError::Interrupted { signal }),
    }
}

/// `SIGTERM` for 15, and so on.
pub fn signal_name(sig: i32) -> String {
    match Signal::try_from(sig) {
        Ok(s) => s.as_str().to_string(),
        Err(_) => format!("signal {sig}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(signal_name(15), "SIGTERM");
        assert_eq!(signal_name(2), "SIGINT");
        assert_eq!(EngineError::Interrupted { signal: 1 }.to_string(), "interrupted by SIGHUP");
    }
}
