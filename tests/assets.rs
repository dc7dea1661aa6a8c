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
    let loaded = Command::new("bash")
        .args(["--norc", "-c", &format!("source {} && complete -p xenmig", bash.display())])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&loaded.stdout);
    assert!(loaded.status.success() && said.contains("_xenmig") && said.trim_end().ends_with(" xenmig"), "{said}");
    let has = |words: &[String], w: &str| words.iter().any(|x| x == w);
    let co = complete(&bash, &["co"]);
    assert!(has(&co, "copy") && has(&co, "config"), "{co:?}");
    assert!(has(&complete(&bash, &["copy", "--bw"]), "--bwlimit"));
    // `xenmig <TAB>` and `xenmig help <TAB>` offer the public commands
    // and none of the hidden ones; hidden flags are not offered either.
    let public = ["migrate", "copy", "config", "hash", "index", "similarity", "show", "domains", "serve", "pause"];
    let hidden = ["assets", "migrate-relay", "migrate-target"];
    for words in [&[""][..], &["help", ""][..]] {
        let offered = complete(&bash, words);
        for c in public {
            assert!(has(&offered, c), "xenmig {words:?}: {c} missing from {offered:?}");
        }
        for c in hidden {
            assert!(!has(&offered, c), "xenmig {words:?}: hidden {c} offered: {offered:?}");
        }
    }
    let serve = complete(&bash, &["serve", "--"]);
    assert!(has(&serve, "--target") && has(&serve, "--bwlimit"), "{serve:?}");
    assert!(!has(&serve, "--allow-open-by"), "{serve:?}");
    // zsh and fish files are there and name the flags too.
    for f in ["_xenmig", "xenmig.fish"] {
        let t = fs::read_to_string(d.path().join("completions").join(f)).unwrap();
        assert!(t.contains("bwlimit") && t.contains("log-format"), "{f}");
        for h in ["assets", "migrate-relay", "migrate-target", "allow-open-by"] {
            assert!(!t.contains(h), "{f} offers hidden {h}");
        }
    }
}

/// What bash completion offers for `xenmig WORDS...` (the last word is the
/// one being completed).
fn complete(script: &std::path::Path, words: &[&str]) -> Vec<String> {
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let cur = quoted.last().unwrap();
    let prev = if words.len() > 1 { quoted[quoted.len() - 2].clone() } else { "xenmig".into() };
    let line = format!(
        "source {} && COMP_WORDS=(xenmig {}) COMP_CWORD={} && _xenmig xenmig {cur} {prev} && printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        quoted.join(" "),
        words.len()
    );
    let r = Command::new("bash").args(["--norc", "-c", &line]).output().unwrap();
    assert!(r.status.success(), "{words:?}: {}", String::from_utf8_lossy(&r.stderr));
    String::from_utf8_lossy(&r.stdout).lines().map(str::to_string).collect()
}
