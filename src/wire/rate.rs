//! A bandwidth limit as operators write it (`--bwlimit 10M`, `bwlimit: 500K`
//! in the config): the one place that parses and prints one.

use std::fmt;
use std::str::FromStr;

/// Bytes per second; 0 means no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rate(pub u64);

impl Rate {
    /// The limit in bytes per second, None when there is none.
    pub fn limit(self) -> Option<u64> {
        (self.0 > 0).then_some(self.0)
    }
}

/// Suffixes as rsync's `--bwlimit`: K, M, G (and KiB, MiB, GiB) are powers
/// of 1024; KB, MB, GB powers of 1000. Unlike rsync, a bare number is
/// bytes, not KiB: the config and the report both speak bytes per second.
impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, suffix) = t.split_at(split);
        let n: u64 = digits.parse().map_err(|_| format!("bad rate '{s}' (expected e.g. 500K, 10M or 0 for none)"))?;
        let mult: u64 = match suffix.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "m" | "mib" => 1 << 20,
            "g" | "gib" => 1 << 30,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            _ => return Err(format!("bad rate '{s}': unknown suffix '{suffix}' (K, M, G, KB, MB, GB)")),
        };
        n.checked_mul(mult).map(Rate).ok_or_else(|| format!("rate '{s}' is too large"))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => f.write_str("none"),
            n if n % (1 << 30) == 0 => write!(f, "{}G", n >> 30),
            n if n % (1 << 20) == 0 => write!(f, "{}M", n >> 20),
            n if n % (1 << 10) == 0 => write!(f, "{}K", n >> 10),
            n => write!(f, "{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rsync_suffixes() {
        assert_eq!("500K".parse::<Rate>().unwrap(), Rate(500 * 1024));
        assert_eq!("10M".parse::<Rate>().unwrap(), Rate(10 << 20));
        assert_eq!("10mib".parse::<Rate>().unwrap(), Rate(10 << 20));
        assert_eq!("2G".parse::<Rate>().unwrap(), Rate(2 << 30));
        assert_eq!("5MB".parse::<Rate>().unwrap(), Rate(5_000_000));
        assert_eq!("1234".parse::<Rate>().unwrap(), Rate(1234));
        assert_eq!("0".parse::<Rate>().unwrap().limit(), None);
    }

    #[test]
    fn refuses_garbage_and_overflow() {
        for bad in ["", "M", "10X", "-5M", "1.5M", "99999999999999999999", "18446744073709551615G"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn prints_what_parses_back() {
        for r in [Rate(0), Rate(10 << 20), Rate(500 << 10), Rate(3 << 30), Rate(1234)] {
            let s = r.to_string();
            if r.0 > 0 {
                assert_eq!(s.parse::<Rate>().unwrap(), r);
            } else {
                assert_eq!(s, "none");
            }
        }
    }
}
