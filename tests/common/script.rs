//! Writing a script that a test then runs, without "Text file busy".
//!
//! Linux refuses to execute a file that some process holds open for
//! writing (ETXTBSY). The tests of one binary run as threads of one
//! process, and a child forked by any thread holds a copy of every
//! descriptor of this process until its exec. A script written here with
//! `std::fs::write` can therefore still be open, in an unrelated child,
//! when the test starts it: CI saw a fake `lvs` fail that way. A separate
//! shell writes the file instead, so its descriptor never exists in this
//! process. The integration tests and the library's unit tests share this
//! one file.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// Writes `text` to `path` with mode 0755, through a child shell.
pub fn write_executable(path: &Path, text: &str) {
    let mut sh = Command::new("sh")
        .args(["-c", "cat > \"$1\" && chmod 755 \"$1\"", "sh"])
        .arg(path)
        .stdin(Stdio::piped())
        .spawn()
        .expect("sh starts");
    sh.stdin.take().expect("piped stdin").write_all(text.as_bytes()).expect("the script reaches sh");
    let status = sh.wait().expect("sh ends");
    assert!(status.success(), "writing {} failed: {status}", path.display());
}
