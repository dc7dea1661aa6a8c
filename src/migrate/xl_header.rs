//! xl's save/migration stream header, and the one change xenmig makes to
//! it: the domain's disk paths, when its LVs land in another volume group
//! on the target (`migrate --target-vg` without `-C`).
//!
//! What `xl migrate` writes first on its stream (Xen 4.17,
//! `tools/xl/xl_saverestore.c`, `save_domain_core_writeconfig`), all
//! integers in the domain's byte order (little-endian on x86):
//!
//! ```text
//!   magic              32 bytes  "Xen saved domain, xl format\n \0 \r"
//!   byteorder          u32       0x01020304
//!   mandatory_flags    u32       STREAMv2 | JSON
//!   optional_flags     u32
//!   optional_data_len  u32       N
//!   optional data      N bytes   u32 config_len, then config_len bytes:
//!                                the libxl domain config as JSON, NUL-ended
//! ```
//!
//! The receiving xl builds the domain from that JSON, so the disks'
//! `pdev_path` values decide which LVs it attaches. [`rewrite`] replaces
//! them and fixes both lengths; nothing else in the config may change, and
//! that is checked by comparing the parsed configs before and after.

use std::io::{self, Read, Write};

use thiserror::Error;

/// The header's magic (`savefileheader_magic` in xl.h).
pub const MAGIC: &[u8; 32] = b"Xen saved domain, xl format\n \0 \r";
const BYTEORDER: u32 = 0x0102_0304;
/// xl's flag: the optional data holds the config as JSON.
const FLAG_JSON: u32 = 1 << 1;
/// More optional data than any domain config needs: refused.
pub const MAX_OPTIONAL_DATA: u32 = 16 << 20;

#[derive(Debug, Error)]
pub enum HeaderError {
    #[error("reading xl's stream header: {0}")]
    Io(#[from] io::Error),
    #[error("xl's stream does not begin with its save header (magic {0:?})")]
    Magic(String),
    #[error("xl's stream header is in another byte order (0x{0:08x}); only little-endian hosts are handled")]
    ByteOrder(u32),
    #[error("xl's stream header carries no JSON domain config (flags 0x{0:x}): its disk paths cannot be rewritten")]
    NoJson(u32),
    #[error("xl's stream header: {0}")]
    Malformed(String),
    #[error("the domain config names {0} outside its disks' paths: not rewritten, use -C")]
    Elsewhere(String),
    #[error("the domain config has no disk at {0}")]
    NoSuchDisk(String),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Read xl's header from `from`, replace each disk path `old` by `new`
/// (`renames`) in its domain config, and write the header with the new
/// lengths to `to`. Returns how many disks were renamed. Nothing is
/// written on error.
pub fn rewrite(from: &mut impl Read, to: &mut impl Write, renames: &[(String, String)]) -> Result<usize, HeaderError> {
    let mut head = [0u8; 48];
    from.read_exact(&mut head)?;
    if &head[..32] != MAGIC {
        return Err(HeaderError::Magic(String::from_utf8_lossy(&head[..32]).into_owned()));
    }
    let order = u32_at(&head, 32);
    if order != BYTEORDER {
        return Err(HeaderError::ByteOrder(order));
    }
    let mandatory = u32_at(&head, 36);
    if mandatory & FLAG_JSON == 0 {
        return Err(HeaderError::NoJson(mandatory));
    }
    let optional_len = u32_at(&head, 44);
    if !(4..=MAX_OPTIONAL_DATA).contains(&optional_len) {
        return Err(HeaderError::Malformed(format!("{optional_len} bytes of optional data")));
    }
    let mut optional = vec![0u8; optional_len as usize];
    from.read_exact(&mut optional)?;
    let config_len = u32_at(&optional, 0) as usize;
    if config_len == 0 || config_len > optional.len() - 4 {
        return Err(HeaderError::Malformed(format!(
            "a config of {config_len} bytes in {optional_len} bytes of optional data"
        )));
    }
    let (config, rest) = optional[4..].split_at(config_len);
    let (new_config, renamed) = rename_disks(config, renames)?;
    let new_optional_len = 4 + new_config.len() + rest.len();
    let mut out = Vec::with_capacity(48 + new_optional_len);
    out.extend_from_slice(&head[..44]);
    out.extend_from_slice(&(new_optional_len as u32).to_le_bytes());
    out.extend_from_slice(&(new_config.len() as u32).to_le_bytes());
    out.extend_from_slice(&new_config);
    out.extend_from_slice(rest);
    to.write_all(&out)?;
    Ok(renamed)
}

/// The NUL-ended JSON `config` with its disks' `pdev_path` renamed. The
/// text is edited in place (xl's own formatting kept) and the result
/// parsed again: it must equal the original with exactly those paths
/// changed.
fn rename_disks(config: &[u8], renames: &[(String, String)]) -> Result<(Vec<u8>, usize), HeaderError> {
    let text = config.strip_suffix(&[0]).unwrap_or(config);
    let text = std::str::from_utf8(text).map_err(|_| HeaderError::Malformed("the config is not UTF-8".into()))?;
    let parse = |t: &str| {
        serde_json::from_str::<serde_json::Value>(t)
            .map_err(|e| HeaderError::Malformed(format!("the config is not JSON: {e}")))
    };
    let before = parse(text)?;
    let mut want = before.clone();
    let mut renamed = 0;
    for (old, new) in renames {
        let disks = want.get_mut("disks").and_then(|d| d.as_array_mut());
        let mut hit = false;
        for d in disks.into_iter().flatten() {
            if d.get("pdev_path").and_then(|p| p.as_str()) == Some(old.as_str()) {
                d["pdev_path"] = serde_json::Value::String(new.clone());
                hit = true;
                renamed += 1;
            }
        }
        if !hit {
            return Err(HeaderError::NoSuchDisk(old.clone()));
        }
    }
    let mut edited = text.to_string();
    for (old, new) in renames {
        let quoted = |s: &str| serde_json::to_string(s).expect("a string serializes");
        edited = edited.replace(&quoted(old), &quoted(new));
    }
    let after = parse(&edited)?;
    if after != want {
        let names: Vec<&str> = renames.iter().map(|(o, _)| o.as_str()).collect();
        return Err(HeaderError::Elsewhere(names.join(", ")));
    }
    let mut out = edited.into_bytes();
    out.push(0);
    Ok((out, renamed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(config: &str, tail: &[u8]) -> Vec<u8> {
        let mut c = config.as_bytes().to_vec();
        c.push(0);
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(&BYTEORDER.to_le_bytes());
        v.extend_from_slice(&(1 | FLAG_JSON).to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        v.extend_from_slice(&((4 + c.len() + tail.len()) as u32).to_le_bytes());
        v.extend_from_slice(&(c.len() as u32).to_le_bytes());
        v.extend_from_slice(&c);
        v.extend_from_slice(tail);
        v
    }

    const CONFIG: &str = r#"{
    "c_info": {
        "name": "g1"
    },
    "disks": [
        {
            "pdev_path": "/dev/vg0/g1",
            "vdev": "xvda"
        },
        {
            "pdev_path": "/dev/vg0/g1-swap",
            "vdev": "xvdb"
        }
    ]
}"#;

    fn ren(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn disk_paths_are_renamed_and_lengths_follow() {
        let stream = [header(CONFIG, b"tail"), b"libxc stream".to_vec()].concat();
        let mut r = &stream[..];
        let mut out = Vec::new();
        let renames = ren(&[("/dev/vg0/g1", "/dev/vgfast/g1"), ("/dev/vg0/g1-swap", "/dev/vgfast/g1-swap")]);
        assert_eq!(rewrite(&mut r, &mut out, &renames).unwrap(), 2);
        // The rest of the stream is left for the caller to copy.
        assert_eq!(r, b"libxc stream");
        let want = header(&CONFIG.replace("/dev/vg0/", "/dev/vgfast/"), b"tail");
        assert_eq!(out, want);
    }

    #[test]
    fn a_path_named_outside_the_disks_is_refused() {
        let config = CONFIG.replace("\"g1\"\n", "\"/dev/vg0/g1\"\n");
        let stream = header(&config, b"");
        let mut out = Vec::new();
        let e = rewrite(&mut &stream[..], &mut out, &ren(&[("/dev/vg0/g1", "/dev/vg1/g1")])).unwrap_err();
        assert!(matches!(e, HeaderError::Elsewhere(_)), "{e}");
        assert!(out.is_empty());
    }

    #[test]
    fn bad_headers_are_named() {
        let good = header(CONFIG, b"");
        let renames = ren(&[("/dev/vg0/g1", "/dev/vg1/g1")]);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"not xl at all, not xl at all, not xl at all, ......".to_vec(), "does not begin"),
            (
                {
                    let mut v = good.clone();
                    v[32..36].copy_from_slice(&0x0403_0201u32.to_le_bytes());
                    v
                },
                "byte order",
            ),
            (
                {
                    let mut v = good.clone();
                    v[36..40].copy_from_slice(&1u32.to_le_bytes());
                    v
                },
                "no JSON",
            ),
            (
                {
                    let mut v = good.clone();
                    v[44..48].copy_from_slice(&u32::MAX.to_le_bytes());
                    v
                },
                "optional data",
            ),
            (
                {
                    let mut v = good.clone();
                    v[48..52].copy_from_slice(&100_000u32.to_le_bytes());
                    v
                },
                "a config of 100000 bytes",
            ),
            (good[..60].to_vec(), "reading xl's stream header"),
            (header("{\"disks\": []}", b""), "no disk at /dev/vg0/g1"),
            (header("{\"disks\": [", b""), "not JSON"),
        ];
        for (stream, want) in cases {
            let mut out = Vec::new();
            let e = rewrite(&mut &stream[..], &mut out, &renames).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
            assert!(out.is_empty());
        }
    }
}
