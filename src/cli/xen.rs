//! The Xen subcommands (`domains`, `pause`, `unpause`, `save`, `restore`):
//! what they print and their exit codes. The library's `xen` layer prints
//! nothing; failures are its errors, which name the domain, library or
//! file, and become exit status 1.

use std::io::Write;
use std::path::Path;

use serde_json::json;

use xenmig::storage::lvm::Lvm;
use xenmig::xen::disk::resolve_lvs;
use xenmig::xen::domain::{Domain, DomainRef};
use xenmig::xen::{Xen, XenError, BINDINGS_RELEASE};

/// `xenmig domains [DOMAIN] [--json]`.
pub fn domains(only: Option<&str>, json: bool) -> Result<i32, XenError> {
    let xen = Xen::open()?;
    let mut list = match only {
        Some(s) => vec![xen.domain(&DomainRef::parse(s))?],
        None => xen.domains()?,
    };
    // Ask lvm which disk targets really are LVs; without lvm, keep the
    // guesses made from the device paths.
    match Lvm::new().lvs(None) {
        Ok(lvs) => list.iter_mut().for_each(|d| resolve_lvs(&mut d.disks, &lvs)),
        Err(e) => log::info!("LVs guessed from device paths: {e}"),
    }
    let toolstack = xen.toolstack_version();
    if let Err(e) = &toolstack {
        log::warn!("{e}");
    }
    let out = std::io::stdout();
    let mut out = out.lock();
    if json {
        let v = json!({
            "xen_version": xen.version(),
            "toolstack_version": toolstack.ok(),
            "bindings": BINDINGS_RELEASE,
            "domains": list,
        });
        let _ = writeln!(out, "{v}");
    } else {
        let _ = out.write_all(format_table(&list).as_bytes());
    }
    Ok(0)
}

/// The `xl list` table, with each domain's disks indented under it.
pub fn format_table(list: &[Domain]) -> String {
    let mut s = format!("{:<32} {:>5} {:>7} {:>5} {:>8} {:>10}\n", "Name", "ID", "Mem", "VCPUs", "State", "Time(s)");
    for d in list {
        s += &format!(
            "{:<32} {:>5} {:>7} {:>5} {:>8} {:>10.1}\n",
            d.name.as_deref().unwrap_or("(null)"),
            d.id,
            d.memory_kib / 1024,
            d.vcpus,
            d.flags,
            d.cpu_seconds
        );
        for k in &d.disks {
            s += &format!(
                "    {:<6} {:<2} {:<6} {:<32} {}\n",
                k.vdev.as_deref().unwrap_or("?"),
                k.mode.map_or("?", |m| m.letter()),
                k.backend_type.as_deref().unwrap_or(&k.backend),
                k.target.as_deref().unwrap_or(&k.params),
                k.lv.as_ref().map_or_else(|| "(not an LV)".to_string(), |lv| format!("LV {lv}"))
            );
        }
    }
    s
}

/// `xenmig pause DOMAIN` / `xenmig unpause DOMAIN`.
pub fn pause(domain: &str, pause: bool) -> Result<i32, XenError> {
    let xen = Xen::open()?;
    let r = DomainRef::parse(domain);
    let d = if pause { xen.pause(&r)? } else { xen.unpause(&r)? };
    println!("{}: {} ({})", d.label(), d.state, d.flags);
    Ok(0)
}

/// `xenmig save [-p] DOMAIN FILE`.
pub fn save(domain: &str, file: &Path, leave_paused: bool) -> Result<i32, XenError> {
    let xen = Xen::open()?;
    let d = xenmig::xen::save(&xen, &DomainRef::parse(domain), file, leave_paused)?;
    println!(
        "saved {} to {}{}",
        d.label(),
        file.display(),
        if leave_paused { "; the domain is left paused" } else { "" }
    );
    Ok(0)
}

/// `xenmig restore [-p] FILE`.
pub fn restore(file: &Path, paused: bool) -> Result<i32, XenError> {
    let xen = Xen::open()?;
    match xenmig::xen::restore(&xen, file, paused)? {
        Some(d) => println!("restored {} from {}: {} ({})", d.label(), file.display(), d.state, d.flags),
        None => println!("restored {} (xl reported success)", file.display()),
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use xenmig::storage::lvm::LvRef;
    use xenmig::xen::disk::{disks_of, MemStore};
    use xenmig::xen::domain::{flags, RawInfo};

    #[test]
    fn table_looks_like_xl_list() {
        let xs = MemStore::from_xenstore_ls(
            "/local/domain/0/backend/vbd/3/51712/params = \"/dev/vg0/g1\"\n\
             /local/domain/0/backend/vbd/3/51712/type = \"phy\"\n\
             /local/domain/0/backend/vbd/3/51712/mode = \"w\"\n\
             /local/domain/0/backend/vbd/3/51712/dev = \"xvda\"\n",
        );
        let dom0 = Domain::from_raw(
            RawInfo {
                domid: 0,
                flags: flags::RUNNING,
                tot_pages: 524288,
                max_pages: u64::MAX,
                online_vcpus: 2,
                cpu_time_ns: 12_300_000_000,
            },
            Some("Domain-0".into()),
        );
        let mut g1 = Domain::from_raw(
            RawInfo {
                domid: 3,
                flags: flags::BLOCKED,
                tot_pages: 65536,
                max_pages: 65536,
                online_vcpus: 1,
                cpu_time_ns: 4_500_000_000,
            },
            Some("g1".into()),
        );
        g1.disks = disks_of(&xs, 3);
        assert_eq!(g1.disks[0].lv, Some(LvRef::new("vg0", "g1")));
        let t = format_table(&[dom0, g1]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].starts_with("Name") && lines[0].contains("VCPUs"), "{t}");
        let cols: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(cols, ["Domain-0", "0", "2048", "2", "r-----", "12.3"]);
        let cols: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(cols, ["g1", "3", "256", "1", "-b----", "4.5"]);
        let cols: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(cols, ["xvda", "w", "phy", "/dev/vg0/g1", "LV", "vg0/g1"]);
    }
}
