//! The cipher xenmig asks ssh for: AES-GCM first on a CPU with AES
//! instructions, unless the operator chose the ciphers.
//!
//! OpenSSH's default list starts with chacha20-poly1305, the right first
//! choice on a CPU without AES instructions, where it is faster and
//! constant-time in software. On a dom0 with them (every x86 server CPU of
//! the last decade), AES-GCM runs in hardware, constant-time, at a fraction
//! of the CPU per byte: the sending side (ssh's client) took 0.32-0.39
//! user CPU-s for 1 GiB with aes128-gcm against 0.74-0.82 with
//! chacha20-poly1305 (loopback, session 23), and sshd decrypts the same
//! bytes at the far end. A copy on a fast link is bound by the CPU that
//! ssh shares with both ends' hashing and compression: a cold copy over
//! loopback took 10% less CPU with it (docs/experiments.md, "ssh's
//! cipher").
//!
//! The operator's choice wins. Nothing is added when the ssh command is
//! not OpenSSH's `ssh` (its program's name), or when `ssh -G HOST` shows a
//! cipher list other than OpenSSH's own default (`ssh -F none -G HOST`):
//! a `-c` or `-o Ciphers=` in the command, a `Ciphers` line in
//! ssh_config, a system-wide crypto policy. The list asked for is the
//! default reordered, AES-GCM first, so that a server without AES-GCM
//! still agrees on what it agreed on before.

use std::process::{Command, Stdio};

/// Put first, in this order, where the CPU has AES instructions.
pub const PREFERRED: [&str; 2] = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"];

/// `ssh_cmd` with `-o Ciphers=...` appended (AES-GCM first) where this
/// CPU has AES instructions and ssh's cipher list for `host` is OpenSSH's
/// default; otherwise `ssh_cmd` unchanged.
pub fn prefer_aes_gcm(ssh_cmd: &str, host: &str) -> String {
    match ask_for(ssh_cmd, host) {
        Some(list) => {
            log::debug!("ssh: asking for {list} (AES instructions here, and ssh's default cipher list for {host})");
            format!("{ssh_cmd} -o Ciphers={list}")
        }
        None => ssh_cmd.to_string(),
    }
}

/// The cipher list to ask for, if any (see the module's doc).
fn ask_for(ssh_cmd: &str, host: &str) -> Option<String> {
    if !cpu_has_aes() {
        return None;
    }
    let argv = shell_words::split(ssh_cmd).ok()?;
    let program = argv.first()?;
    if std::path::Path::new(program).file_name()? != "ssh" {
        return None;
    }
    // Both at once: each is a few milliseconds of a copy's start.
    let chosen = ssh_g(&argv, host);
    let default = ssh_g(&[program.clone(), "-F".into(), "none".into()], host);
    // (both waited for: no zombie left behind)
    let (chosen, default) = (ciphers_of(chosen), ciphers_of(default));
    decide(&chosen?, &default?)
}

/// AES-GCM first in `default`, when `chosen` is the default and the
/// reordering changes it.
fn decide(chosen: &str, default: &str) -> Option<String> {
    if chosen != default {
        return None;
    }
    let listed: Vec<&str> = default.split(',').collect();
    let mut list: Vec<&str> = PREFERRED.iter().copied().filter(|c| listed.contains(c)).collect();
    if list.is_empty() {
        return None;
    }
    list.extend(listed.iter().copied().filter(|c| !PREFERRED.contains(c)));
    let list = list.join(",");
    (list != default).then_some(list)
}

/// `ssh -G` run as `argv` for `host`, started: it prints the
/// configuration ssh would use, without connecting.
fn ssh_g(argv: &[String], host: &str) -> Option<std::process::Child> {
    Command::new(&argv[0])
        .args(&argv[1..])
        .arg("-G")
        .arg("--")
        .arg(host)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}

/// The cipher list a finished `ssh -G` printed: what ssh would offer.
/// None if it failed or printed anything but cipher names (the list goes
/// into a shell command).
fn ciphers_of(child: Option<std::process::Child>) -> Option<String> {
    let out = child?.wait_with_output().ok()?;
    if !out.status.success() {
        return None;
    }
    ciphers_line(&String::from_utf8_lossy(&out.stdout))
}

fn ciphers_line(g: &str) -> Option<String> {
    let list = g.lines().find_map(|l| l.strip_prefix("ciphers "))?.trim();
    let plain = |c: char| c.is_ascii_alphanumeric() || "@.,-".contains(c);
    (!list.is_empty() && list.chars().all(plain)).then(|| list.to_string())
}

/// Whether this CPU runs AES and GCM's carry-less multiply in hardware.
fn cpu_has_aes() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        // (std's "aes" is FEAT_AES with FEAT_PMULL)
        std::arch::is_aarch64_feature_detected!("aes")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: &str =
        "chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr,aes128-gcm@openssh.com,aes256-gcm@openssh.com";

    #[test]
    fn the_default_list_is_reordered_aes_gcm_first() {
        assert_eq!(
            decide(DEFAULT, DEFAULT).as_deref(),
            Some(
                "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr"
            )
        );
    }

    #[test]
    fn a_chosen_list_or_one_without_gcm_or_already_first_is_left_alone() {
        assert_eq!(decide("aes256-ctr", DEFAULT), None);
        assert_eq!(decide("chacha20-poly1305@openssh.com", "chacha20-poly1305@openssh.com"), None);
        let gcm_first = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,aes128-ctr";
        assert_eq!(decide(gcm_first, gcm_first), None);
        // Only one of them offered: that one first.
        let one = "chacha20-poly1305@openssh.com,aes256-gcm@openssh.com";
        assert_eq!(decide(one, one).as_deref(), Some("aes256-gcm@openssh.com,chacha20-poly1305@openssh.com"));
    }

    #[test]
    fn only_cipher_names_are_taken_from_ssh_g() {
        assert_eq!(ciphers_line("user root\nciphers a,b-c@d.e\nport 22\n").as_deref(), Some("a,b-c@d.e"));
        assert_eq!(ciphers_line("ciphers a;touch /tmp/x\n"), None);
        assert_eq!(ciphers_line("ciphers \n"), None);
        assert_eq!(ciphers_line("port 22\n"), None);
    }

    /// A stand-in `ssh` that answers `-G` as OpenSSH would: its default
    /// list, or the list given with `-c`.
    fn fake_ssh(dir: &std::path::Path) -> String {
        let p = dir.join("ssh");
        crate::test_script::write_executable(
            &p,
            &format!(
                "#!/bin/sh\nc={DEFAULT}\nwhile [ $# -gt 0 ]; do [ \"$1\" = -c ] && c=$2; shift; done\necho \"user root\"\necho \"ciphers $c\"\n"
            ),
        );
        p.to_str().unwrap().to_string()
    }

    #[test]
    fn the_operators_choice_and_other_programs_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let ssh = fake_ssh(dir.path());
        let chosen = format!("{ssh} -p 2222 -c aes256-ctr");
        assert_eq!(prefer_aes_gcm(&chosen, "root@h"), chosen);
        // Not ssh: a wrapper's options are unknown.
        let wrapper = dir.path().join("my-ssh");
        std::fs::copy(&ssh, &wrapper).unwrap();
        let w = wrapper.to_str().unwrap();
        assert_eq!(prefer_aes_gcm(w, "h"), w);
        // The default list: reordered where the CPU runs AES.
        let plain = format!("{ssh} -p 2222");
        let got = prefer_aes_gcm(&plain, "h");
        if cpu_has_aes() {
            assert_eq!(got, format!("{plain} -o Ciphers={}", decide(DEFAULT, DEFAULT).unwrap()));
        } else {
            assert_eq!(got, plain);
        }
    }

    /// With the installed OpenSSH (scripts/test.sh installs it): what is
    /// added is an option it takes, and it puts AES-GCM first.
    #[test]
    fn the_installed_ssh_takes_the_option() {
        let out = Command::new("ssh").arg("-V").stderr(Stdio::piped()).output();
        assert!(out.expect("OpenSSH's ssh installed (scripts/test.sh installs it)").status.success());
        let cmd = prefer_aes_gcm("ssh", "h.example");
        let argv = shell_words::split(&cmd).unwrap();
        let ciphers = ciphers_of(ssh_g(&argv, "h.example")).expect("ssh -G with the option");
        if cmd != "ssh" {
            assert!(ciphers.starts_with("aes128-gcm@openssh.com,"), "{ciphers}");
        }
        assert_eq!(prefer_aes_gcm("ssh -c aes256-ctr", "h.example"), "ssh -c aes256-ctr");
    }
}
