//! The target host's part of a migration that is not the disk copy itself:
//! `xenmig migrate-target OP`, run there through the same ssh command as
//! everything else, answering one JSON object on stdout.
//!
//! - `probe`: xenmig's version and protocol, the domains there, the VG's
//!   free space and its LVs with their tags (the preflight and `--dry-run`).
//! - `prepare`: create each LV at the source's size, tagged with the
//!   domain's UUID, or reuse one that carries that tag (a return
//!   migration: only what changed moves); refuse an LV tagged for another
//!   domain or untagged, unless `--force`.
//! - `state`: how the domain looks there now (`NAME`, `NAME--incoming`).
//! - `cleanup`: destroy a `NAME--incoming` left by a failed migration.

use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::storage::lvm::{LvRef, Lvm};

use super::MigrateError;

/// Where `--stop-copy` puts the save image on the target (mode 0700).
pub const INCOMING_DIR: &str = "/var/lib/xenmig/incoming";

/// The tag that marks an LV as holding the disk of domain `uuid`.
pub fn uuid_tag(uuid: &str) -> String {
    format!("xenmig-{uuid}")
}

/// Every answer says who answered.
#[derive(Debug, Serialize, Deserialize)]
pub struct Probe {
    pub version: String,
    pub protocol: u16,
    /// Names of the domains there.
    pub domains: Vec<String>,
    pub vg: Option<VgInfo>,
    pub lvs: Vec<LvInfo>,
    /// `xl info`'s free_memory, in MiB, when it could be read.
    pub free_memory_mib: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VgInfo {
    pub name: String,
    pub size_bytes: u64,
    pub free_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LvInfo {
    pub name: String,
    pub size_bytes: u64,
    pub tags: Vec<String>,
    pub open: bool,
}

/// One LV `prepare` is asked for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LvRequest {
    pub vg: String,
    pub lv: String,
    pub size_bytes: u64,
}

impl LvRequest {
    /// `VG/LV:SIZE`, as it travels on the command line.
    pub fn to_arg(&self) -> String {
        format!("{}/{}:{}", self.vg, self.lv, self.size_bytes)
    }

    pub fn parse(s: &str) -> Result<LvRequest, String> {
        let (name, size) = s.rsplit_once(':').ok_or_else(|| format!("'{s}' is not VG/LV:SIZE"))?;
        let (vg, lv) = name.split_once('/').ok_or_else(|| format!("'{s}' is not VG/LV:SIZE"))?;
        let size_bytes = size.parse().map_err(|_| format!("'{size}' in '{s}' is not a size in bytes"))?;
        if vg.is_empty() || lv.is_empty() {
            return Err(format!("'{s}' is not VG/LV:SIZE"));
        }
        Ok(LvRequest { vg: vg.into(), lv: lv.into(), size_bytes })
    }

    pub fn path(&self) -> String {
        format!("/dev/{}/{}", self.vg, self.lv)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prepared {
    pub path: String,
    pub created: bool,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DomainState {
    /// `xl list`'s state letters of `NAME`, if it exists there.
    pub name: Option<String>,
    /// The same for `NAME--incoming`.
    pub incoming: Option<String>,
}

// ---- target side ----

/// Names and state letters of the domains on this host, from `xl list`
/// (the receiving end of `xl migrate` is xl, so xl's view is the one that
/// counts here).
fn xl_list() -> Result<Vec<(String, String)>, MigrateError> {
    let out = Command::new(crate::xen::xl::program())
        .arg("list")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| MigrateError::Target(format!("cannot run xl list: {e}")))?;
    if !out.status.success() {
        return Err(MigrateError::Target(format!("xl list failed: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(parse_xl_list(&String::from_utf8_lossy(&out.stdout)))
}

/// `xl list` lines: name, id, mem, vcpus, state, time.
pub fn parse_xl_list(text: &str) -> Vec<(String, String)> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 5).then(|| (f[0].to_string(), f[4].to_string()))
        })
        .collect()
}

fn free_memory_mib() -> Option<u64> {
    let out = Command::new(crate::xen::xl::program()).arg("info").stdin(Stdio::null()).output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("free_memory").and_then(|r| r.trim().trim_start_matches(':').trim().parse().ok()))
}

pub fn probe(vg: &str) -> Result<Probe, MigrateError> {
    let lvm = Lvm::new();
    let domains = xl_list()?.into_iter().map(|(n, _)| n).collect();
    let vg_info = lvm
        .vgs(Some(vg))
        .map_err(|e| MigrateError::Target(format!("volume group {vg}: {e}")))?
        .into_iter()
        .next()
        .map(|v| VgInfo { name: v.name, size_bytes: v.size_bytes, free_bytes: v.free_bytes });
    let lvs = lvm
        .lvs(Some(vg))
        .map_err(|e| MigrateError::Target(format!("volume group {vg}: {e}")))?
        .into_iter()
        .map(|l| LvInfo { open: l.is_open(), name: l.name, size_bytes: l.size_bytes, tags: l.tags })
        .collect();
    Ok(Probe {
        version: env!("CARGO_PKG_VERSION").into(),
        protocol: crate::wire::protocol::VERSION,
        domains,
        vg: vg_info,
        lvs,
        free_memory_mib: free_memory_mib(),
    })
}

/// Create or reuse each requested LV (see the module's documentation).
pub fn prepare(uuid: &str, requests: &[LvRequest], force: bool) -> Result<Vec<Prepared>, MigrateError> {
    let lvm = Lvm::new();
    let tag = uuid_tag(uuid);
    // Check every LV before creating any, so that a refusal changes nothing.
    let mut plan = Vec::new();
    for r in requests {
        let existing = lvm
            .lvs(Some(&r.vg))
            .map_err(|e| MigrateError::Target(format!("volume group {}: {e}", r.vg)))?
            .into_iter()
            .find(|l| l.name == r.lv);
        match existing {
            Some(l) => {
                if l.is_open() {
                    return Err(MigrateError::Target(format!(
                        "{}/{} exists and is open (mounted, or a domain's disk): refusing to write it",
                        r.vg, r.lv
                    )));
                }
                if !l.tags.contains(&tag) && !force {
                    let held = if l.tags.is_empty() { "no xenmig tag".to_string() } else { l.tags.join(",") };
                    return Err(MigrateError::Target(format!(
                        "{}/{} exists and is not marked for this domain (tags: {held}); \
                         remove it, or pass --force to overwrite it",
                        r.vg, r.lv
                    )));
                }
                if l.size_bytes < r.size_bytes {
                    return Err(MigrateError::Target(format!(
                        "{}/{} exists with {} bytes, the source disk has {}: lvextend it or remove it",
                        r.vg, r.lv, l.size_bytes, r.size_bytes
                    )));
                }
                plan.push((r, Some(l)));
            }
            None => plan.push((r, None)),
        }
    }
    make_incoming_dir()?;
    let mut out = Vec::new();
    for (r, existing) in plan {
        let lv = LvRef::new(&r.vg, &r.lv);
        let (created, size) = match existing {
            Some(l) => {
                if !l.tags.contains(&tag) {
                    lvm.add_tag(&lv, &tag).map_err(|e| MigrateError::Target(e.to_string()))?;
                }
                (false, l.size_bytes)
            }
            None => {
                let l = lvm.create(&lv, r.size_bytes).map_err(|e| MigrateError::Target(e.to_string()))?;
                lvm.add_tag(&lv, &tag).map_err(|e| MigrateError::Target(e.to_string()))?;
                (true, l.size_bytes)
            }
        };
        out.push(Prepared { path: r.path(), created, size_bytes: size });
    }
    Ok(out)
}

pub fn state(name: &str) -> Result<DomainState, MigrateError> {
    let list = xl_list()?;
    let incoming = format!("{name}--incoming");
    let find = |n: &str| list.iter().find(|(x, _)| x == n).map(|(_, s)| s.clone());
    Ok(DomainState { name: find(name), incoming: find(&incoming) })
}

/// `--stop-copy`: restore the save image FILE (from [`INCOMING_DIR`]) with
/// `xl restore`, remove the file, and report the domain's state.
pub fn restore(name: &str, file: &std::path::Path, paused: bool) -> Result<DomainState, MigrateError> {
    check_incoming(file)?;
    let mut cmd = Command::new(crate::xen::xl::program());
    cmd.arg("restore");
    if paused {
        cmd.arg("-p");
    }
    let st = cmd
        .arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .map_err(|e| MigrateError::Target(format!("cannot run xl restore: {e}")))?;
    let _ = std::fs::remove_file(file);
    if !st.success() {
        return Err(MigrateError::Target(format!("xl restore {} failed ({st})", file.display())));
    }
    state(name)
}

/// Only files in [`INCOMING_DIR`] are restored or removed on a peer's word.
fn check_incoming(file: &std::path::Path) -> Result<(), MigrateError> {
    let ok = file.parent() == Some(std::path::Path::new(INCOMING_DIR))
        && file.file_name().is_some_and(|n| n.to_string_lossy().ends_with(".save"));
    if !ok {
        return Err(MigrateError::Target(format!("{} is not a save image in {INCOMING_DIR}", file.display())));
    }
    Ok(())
}

/// Make [`INCOMING_DIR`] (0700).
pub fn make_incoming_dir() -> Result<(), MigrateError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(INCOMING_DIR)
        .map_err(|e| MigrateError::Target(format!("cannot create {INCOMING_DIR}: {e}")))
}

/// Remove a save image left in [`INCOMING_DIR`].
pub fn remove_incoming(file: &std::path::Path) -> Result<bool, MigrateError> {
    check_incoming(file)?;
    Ok(std::fs::remove_file(file).is_ok())
}

/// Destroy `NAME--incoming` if it exists; true if it did.
pub fn cleanup(name: &str) -> Result<bool, MigrateError> {
    let incoming = format!("{name}--incoming");
    if state(name)?.incoming.is_none() {
        return Ok(false);
    }
    let st = Command::new(crate::xen::xl::program())
        .args(["destroy", &incoming])
        .stdin(Stdio::null())
        .status()
        .map_err(|e| MigrateError::Target(format!("cannot run xl destroy {incoming}: {e}")))?;
    if !st.success() {
        return Err(MigrateError::Target(format!("xl destroy {incoming} failed ({st})")));
    }
    Ok(true)
}

// ---- source side ----

/// How the source reaches the target host: the ssh command (as `-s`), the
/// host, and the xenmig program there.
#[derive(Clone, Debug)]
pub struct TargetHost {
    pub ssh: String,
    pub host: String,
    pub xenmig: String,
}

impl TargetHost {
    /// The shell command that runs `args` on the target (as
    /// [`Link::spawn`](crate::wire::transport::Link::spawn) builds it).
    pub fn command(&self, args: &[String]) -> String {
        let remote = shell_words::join(args);
        if self.ssh.trim().is_empty() {
            remote
        } else {
            format!("{} {} {}", self.ssh, shell_words::quote(&self.host), shell_words::quote(&remote))
        }
    }

    /// Run `xenmig migrate-target OP ARGS...` there and parse its JSON.
    pub fn call<T: serde::de::DeserializeOwned>(&self, op: &str, args: &[String]) -> Result<T, MigrateError> {
        let mut v = vec![self.xenmig.clone(), "migrate-target".into(), op.into()];
        v.extend_from_slice(args);
        let command = self.command(&v);
        let out = Command::new("sh")
            .arg("-c")
            .arg(&command)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| MigrateError::Unreachable(format!("{command}: {e}")))?;
        let stderr = crate::copy::sanitize(&String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            // 255 is ssh's own failure; 127 a missing program.
            return Err(match out.status.code() {
                Some(255) => MigrateError::Unreachable(format!("{}: {}", self.host, stderr.trim())),
                Some(127) => MigrateError::Unreachable(format!(
                    "{}: no '{}' there ({}); install xenmig on the target or pass --remote-xenmig",
                    self.host,
                    self.xenmig,
                    stderr.trim()
                )),
                _ => MigrateError::Target(format!("{} ({op}): {}", self.host, own_words(&stderr))),
            });
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            MigrateError::Target(format!(
                "{} ({op}) answered something that is not its JSON ({e}); a different xenmig version there?",
                self.host
            ))
        })
    }
}

/// What the target's `migrate-target` said when it failed, without the
/// prefixes this end adds again ("xenmig: error: on the target: ..." came
/// out as "on the target: HOST (prepare): xenmig: error: on the target:
/// ..."). Lines before the error (warnings) are kept.
fn own_words(stderr: &str) -> String {
    stderr
        .trim()
        .lines()
        .map(|l| {
            let l = l.strip_prefix("xenmig: error: ").unwrap_or(l);
            l.strip_prefix("on the target: ").unwrap_or(l)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_targets_error_is_said_once() {
        assert_eq!(
            own_words("xenmig: error: on the target: volume group vg9: not found\n"),
            "volume group vg9: not found"
        );
        assert_eq!(own_words("warning: x\nxenmig: error: lvcreate failed"), "warning: x\nlvcreate failed");
        assert_eq!(own_words("sh: 1: oops"), "sh: 1: oops");
    }

    #[test]
    fn lv_requests_round_trip() {
        let r = LvRequest { vg: "vg0".into(), lv: "g1-disk".into(), size_bytes: 33554432 };
        assert_eq!(LvRequest::parse(&r.to_arg()).unwrap(), r);
        assert!(LvRequest::parse("vg0:12").is_err());
        assert!(LvRequest::parse("vg0/x:twelve").is_err());
        assert!(LvRequest::parse("/x:1").is_err());
    }

    #[test]
    fn xl_list_is_read() {
        let t = "Name                                        ID   Mem VCPUs\tState\tTime(s)\n\
                 Domain-0                                     0  1024     2     r-----      12.0\n\
                 g1--incoming                                 3   128     1     --p---       0.0\n";
        let l = parse_xl_list(t);
        assert_eq!(l, vec![("Domain-0".into(), "r-----".into()), ("g1--incoming".into(), "--p---".into())]);
    }

    #[test]
    fn the_command_quotes_like_the_copy_transport() {
        let t = TargetHost { ssh: "ssh -p 22".into(), host: "h".into(), xenmig: "xenmig".into() };
        // Compared as the shell reads it: shell-words 1.1.1 quotes a quote
        // as '\'' where earlier versions wrote '"'"'.
        let words = shell_words::split(&t.command(&["xenmig".into(), "a b".into()])).unwrap();
        assert_eq!(words[..4], ["ssh", "-p", "22", "h"]);
        assert_eq!(words.len(), 5);
        assert_eq!(shell_words::split(&words[4]).unwrap(), ["xenmig", "a b"]);
        let t = TargetHost { ssh: "".into(), host: "h".into(), xenmig: "xenmig".into() };
        assert_eq!(t.command(&["xenmig".into(), "x".into()]), "xenmig x");
    }
}
