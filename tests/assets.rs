//! Man pages and completions generated from the clap definitions (`xenmig
//! assets DIR`, what scripts/package.sh installs).

mod common;

use std::fs;
use std::process::Command;

use common::*;

#[test]
fn man_pages_and_completions_follow_the_flags() {
    let d = tempfile::tempdir().unwrap();
    let out = Command::new(bin()).args(["assets", s(d.path())]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let man = d.path().join("man");
    let main = fs::read_to_string(man.join("xenmig.1")).unwrap();
    // Every visible command has its page, named in the main page; hidden
    // ones (serve's helpers, this generator) have none.
    for cmd in ["migrate", "copy", "config", "hash", "index", "similarity", "show", "domains", "save", "restore"] {
        let page = fs::read_to_string(man.join(format!("xenmig-{cmd}.1"))).unwrap();
        assert!(page.contains(&format!(".TH xenmig-{cmd} 1")), "{cmd}");
        assert!(main.contains(&format!("xenmig\\-{cmd}(1)")), "xenmig.1 lacks {cmd}");
    }
    for hidden in ["assets", "migrate-relay", "migrate-target", "help"] {
        assert!(!man.join(format!("xenmig-{hidden}.1")).exists(), "{hidden}");
    }
    // The pages carry the flags as clap has them.
    let copy = fs::read_to_string(man.join("xenmig-copy.1")).unwrap();
    for flag in ["bwlimit", "idle\\-timeout", "compress", "reference"] {
        assert!(copy.contains(&format!("\\-\\-{flag}")), "xenmig-copy.1 lacks --{flag}");
    }
    // groff renders each page without a warning.
    for e in fs::read_dir(&man).unwrap() {
        let p = e.unwrap().path();
        let r = Command::new("groff").args(["-man", "-ww", "-z"]).arg(&p).output().unwrap();
        assert!(r.status.success() && r.stderr.is_empty(), "{}: {}", p.display(), String::from_utf8_lossy(&r.stderr));
    }
    // bash: the completion loads and completes commands and flags.
    let bash = d.path().join("completions/xenmig.bash");
    let script = format!(
        "source {} && complete -p xenmig && COMP_WORDS=(xenmig co) COMP_CWORD=1 && _xenmig xenmig co xenmig && echo \"${{COMPREPLY[@]}}\" \
         && COMP_WORDS=(xenmig copy --bw) COMP_CWORD=2 && _xenmig xenmig --bw copy && echo \"${{COMPREPLY[@]}}\"",
        bash.display()
    );
    let r = Command::new("bash").args(["--norc", "-c", &script]).output().unwrap();
    let said = String::from_utf8_lossy(&r.stdout);
    assert!(r.status.success(), "{said}{}", String::from_utf8_lossy(&r.stderr));
    let lines: Vec<&str> = said.lines().collect();
    assert!(lines[0].contains("_xenmig") && lines[0].ends_with(" xenmig"), "{said}");
    assert!(lines[1].split(' ').any(|w| w == "copy") && lines[1].split(' ').any(|w| w == "config"), "{said}");
    assert!(lines[2].split(' ').any(|w| w == "--bwlimit"), "{said}");
    // zsh and fish files are there and name the flags too.
    for f in ["_xenmig", "xenmig.fish"] {
        let t = fs::read_to_string(d.path().join("completions").join(f)).unwrap();
        assert!(t.contains("bwlimit") && t.contains("log-format"), "{f}");
    }
}
