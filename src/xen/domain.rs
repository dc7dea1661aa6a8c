//! What xenmig knows about a domain, decoded from the hypervisor's
//! `XEN_DOMINF_*` flags and page counts.
//!
//! Pure data and decoding, with no Xen calls, so that it builds and is
//! tested on machines without Xen. The flag values are part of Xen's stable
//! domctl ABI; `sys.rs` asserts at compile time that they equal the ones in
//! the headers the bindings were generated from.

use serde::Serialize;

use super::disk::Disk;

/// Bits of `xen_domctl_getdomaininfo.flags` and the shutdown codes.
pub mod flags {
    pub const DYING: u32 = 1 << 0;
    pub const HVM: u32 = 1 << 1;
    pub const SHUTDOWN: u32 = 1 << 2;
    pub const PAUSED: u32 = 1 << 3;
    pub const BLOCKED: u32 = 1 << 4;
    pub const RUNNING: u32 = 1 << 5;
    /// The guest-supplied shutdown code sits in these bits when SHUTDOWN is set.
    pub const SHUTDOWN_SHIFT: u32 = 16;
    pub const SHUTDOWN_MASK: u32 = 0xff;

    pub const REASON_POWEROFF: u32 = 0;
    pub const REASON_REBOOT: u32 = 1;
    pub const REASON_SUSPEND: u32 = 2;
    pub const REASON_CRASH: u32 = 3;
    pub const REASON_WATCHDOG: u32 = 4;
    pub const REASON_SOFT_RESET: u32 = 5;
}

/// Xen's page size on the architectures xenmig supports (x86, arm64 with
/// 4 KiB granules): page counts times this are bytes.
pub const PAGE_KIB: u64 = 4;

/// One word for what a domain is doing, in the order of precedence used
/// when several flags are set: a dying domain is dying whatever else it
/// says; a paused domain that is also blocked is shown paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Dying,
    Crashed,
    Shutdown,
    Paused,
    Running,
    Blocked,
    /// None of the above: a domain built but never unpaused looks like this
    /// only briefly; `xl list` shows `------`.
    Idle,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Dying => "dying",
            State::Crashed => "crashed",
            State::Shutdown => "shutdown",
            State::Paused => "paused",
            State::Running => "running",
            State::Blocked => "blocked",
            State::Idle => "idle",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a domain shut down (only meaningful with the SHUTDOWN flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownReason {
    Poweroff,
    Reboot,
    /// Suspended for save or migration: the guest will be restored.
    Suspend,
    Crash,
    Watchdog,
    SoftReset,
    Unknown(u32),
}

impl ShutdownReason {
    pub fn from_code(code: u32) -> ShutdownReason {
        use flags::*;
        match code {
            REASON_POWEROFF => ShutdownReason::Poweroff,
            REASON_REBOOT => ShutdownReason::Reboot,
            REASON_SUSPEND => ShutdownReason::Suspend,
            REASON_CRASH => ShutdownReason::Crash,
            REASON_WATCHDOG => ShutdownReason::Watchdog,
            REASON_SOFT_RESET => ShutdownReason::SoftReset,
            other => ShutdownReason::Unknown(other),
        }
    }
}

/// The decoded state flags of a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flags(pub u32);

impl Flags {
    fn has(self, bit: u32) -> bool {
        self.0 & bit != 0
    }

    pub fn shutdown_reason(self) -> Option<ShutdownReason> {
        self.has(flags::SHUTDOWN)
            .then(|| ShutdownReason::from_code((self.0 >> flags::SHUTDOWN_SHIFT) & flags::SHUTDOWN_MASK))
    }

    pub fn state(self) -> State {
        if self.has(flags::DYING) {
            State::Dying
        } else if let Some(reason) = self.shutdown_reason() {
            if reason == ShutdownReason::Crash {
                State::Crashed
            } else {
                State::Shutdown
            }
        } else if self.has(flags::PAUSED) {
            State::Paused
        } else if self.has(flags::RUNNING) {
            State::Running
        } else if self.has(flags::BLOCKED) {
            State::Blocked
        } else {
            State::Idle
        }
    }

    pub fn hvm(self) -> bool {
        self.has(flags::HVM)
    }

    /// The six-letter column of `xl list` (`r-----`, `-b----`, `--p---`,
    /// `---s--`, `----c-`, `-----d`): one letter per flag, so operators can
    /// read it as they read xl's.
    pub fn xl_letters(self) -> String {
        let reason = self.shutdown_reason();
        [
            (self.has(flags::RUNNING), 'r'),
            (self.has(flags::BLOCKED), 'b'),
            (self.has(flags::PAUSED), 'p'),
            (reason.is_some(), 's'),
            (reason == Some(ShutdownReason::Crash), 'c'),
            (self.has(flags::DYING), 'd'),
        ]
        .iter()
        .map(|&(set, c)| if set { c } else { '-' })
        .collect()
    }
}

/// One domain as `xenmig domains` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Domain {
    pub id: u32,
    /// From xenstore `/local/domain/<id>/name`; absent for a domain being
    /// built or torn down.
    pub name: Option<String>,
    pub state: State,
    /// `xl list`'s state column.
    pub flags: String,
    pub shutdown_reason: Option<ShutdownReason>,
    pub hvm: bool,
    /// Memory the domain has now.
    pub memory_kib: u64,
    /// Its ceiling; `None` when unlimited (dom0 usually).
    pub max_memory_kib: Option<u64>,
    pub vcpus: u32,
    /// CPU time used, in seconds.
    pub cpu_seconds: f64,
    /// Virtual block devices, from xenstore (empty for dom0).
    pub disks: Vec<Disk>,
}

/// The raw numbers the hypervisor reports for a domain.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawInfo {
    pub domid: u32,
    pub flags: u32,
    pub tot_pages: u64,
    pub max_pages: u64,
    pub online_vcpus: u32,
    pub cpu_time_ns: u64,
}

impl Domain {
    pub fn from_raw(raw: RawInfo, name: Option<String>) -> Domain {
        let f = Flags(raw.flags);
        // Xen reports "no limit" as an all-ones page count.
        let unlimited = raw.max_pages >= (u64::MAX / PAGE_KIB) || raw.max_pages == u32::MAX as u64;
        Domain {
            id: raw.domid,
            name,
            state: f.state(),
            flags: f.xl_letters(),
            shutdown_reason: f.shutdown_reason(),
            hvm: f.hvm(),
            memory_kib: raw.tot_pages.saturating_mul(PAGE_KIB),
            max_memory_kib: (!unlimited).then(|| raw.max_pages * PAGE_KIB),
            vcpus: raw.online_vcpus,
            cpu_seconds: raw.cpu_time_ns as f64 / 1e9,
            disks: Vec::new(),
        }
    }

    /// The name if known, else `domain <id>`: what error messages say.
    pub fn label(&self) -> String {
        match &self.name {
            Some(n) => format!("{n} (id {})", self.id),
            None => format!("domain {}", self.id),
        }
    }
}

/// How the user named a domain on the command line: like xl, a string of
/// digits is an id, anything else a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainRef {
    Id(u32),
    Name(String),
}

impl DomainRef {
    pub fn parse(s: &str) -> DomainRef {
        match s.parse::<u32>() {
            Ok(id) if !s.starts_with('+') => DomainRef::Id(id),
            _ => DomainRef::Name(s.to_string()),
        }
    }

    /// Picks the one domain this refers to.
    pub fn select<'a>(&self, domains: &'a [Domain]) -> Option<&'a Domain> {
        match self {
            DomainRef::Id(id) => domains.iter().find(|d| d.id == *id),
            DomainRef::Name(n) => domains.iter().find(|d| d.name.as_deref() == Some(n)),
        }
    }
}

impl std::fmt::Display for DomainRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DomainRef::Id(id) => write!(f, "domain id {id}"),
            DomainRef::Name(n) => write!(f, "domain '{n}'"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::flags::*;
    use super::*;

    fn shutdown(code: u32) -> u32 {
        SHUTDOWN | (code << SHUTDOWN_SHIFT)
    }

    #[test]
    fn single_flags_decode_to_their_state() {
        assert_eq!(Flags(RUNNING).state(), State::Running);
        assert_eq!(Flags(BLOCKED).state(), State::Blocked);
        assert_eq!(Flags(PAUSED).state(), State::Paused);
        assert_eq!(Flags(DYING).state(), State::Dying);
        assert_eq!(Flags(0).state(), State::Idle);
        assert_eq!(Flags(shutdown(REASON_POWEROFF)).state(), State::Shutdown);
        assert_eq!(Flags(shutdown(REASON_CRASH)).state(), State::Crashed);
    }

    #[test]
    fn precedence_when_flags_combine() {
        // `xl pause` on a blocked guest: shown paused.
        assert_eq!(Flags(PAUSED | BLOCKED).state(), State::Paused);
        // Suspended for save and paused by the toolstack: shut down.
        assert_eq!(Flags(PAUSED | shutdown(REASON_SUSPEND)).state(), State::Shutdown);
        // Being destroyed after a crash: dying wins.
        assert_eq!(Flags(DYING | shutdown(REASON_CRASH)).state(), State::Dying);
        // HVM does not change the state.
        assert_eq!(Flags(HVM | RUNNING).state(), State::Running);
        assert!(Flags(HVM | RUNNING).hvm());
    }

    #[test]
    fn shutdown_reason_is_read_only_with_the_shutdown_flag() {
        // Stray bits in the reason field without SHUTDOWN mean nothing.
        assert_eq!(Flags(3 << SHUTDOWN_SHIFT | RUNNING).shutdown_reason(), None);
        assert_eq!(Flags(shutdown(REASON_SUSPEND)).shutdown_reason(), Some(ShutdownReason::Suspend));
        assert_eq!(Flags(shutdown(REASON_WATCHDOG)).shutdown_reason(), Some(ShutdownReason::Watchdog));
        assert_eq!(Flags(shutdown(77)).shutdown_reason(), Some(ShutdownReason::Unknown(77)));
    }

    #[test]
    fn xl_letters_match_xl_list_columns() {
        assert_eq!(Flags(RUNNING).xl_letters(), "r-----");
        assert_eq!(Flags(BLOCKED).xl_letters(), "-b----");
        assert_eq!(Flags(PAUSED | BLOCKED).xl_letters(), "-bp---");
        assert_eq!(Flags(shutdown(REASON_POWEROFF)).xl_letters(), "---s--");
        assert_eq!(Flags(shutdown(REASON_CRASH)).xl_letters(), "---sc-");
        assert_eq!(Flags(DYING).xl_letters(), "-----d");
        assert_eq!(Flags(0).xl_letters(), "------");
    }

    #[test]
    fn raw_numbers_become_kib_and_seconds() {
        let d = Domain::from_raw(
            RawInfo {
                domid: 3,
                flags: BLOCKED,
                tot_pages: 65536,
                max_pages: 65792,
                online_vcpus: 2,
                cpu_time_ns: 1_500_000_000,
            },
            Some("g1".into()),
        );
        assert_eq!(d.memory_kib, 256 * 1024);
        assert_eq!(d.max_memory_kib, Some(65792 * 4));
        assert_eq!(d.vcpus, 2);
        assert!((d.cpu_seconds - 1.5).abs() < 1e-9);
        assert_eq!(d.state, State::Blocked);
        assert_eq!(d.label(), "g1 (id 3)");
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["state"], "blocked");
        assert_eq!(json["flags"], "-b----");
        assert_eq!(json["name"], "g1");
    }

    #[test]
    fn unlimited_max_memory_is_none() {
        let d = Domain::from_raw(
            RawInfo {
                domid: 0,
                flags: RUNNING,
                tot_pages: 524288,
                max_pages: u64::MAX,
                online_vcpus: 2,
                cpu_time_ns: 0,
            },
            None,
        );
        assert_eq!(d.max_memory_kib, None);
        assert_eq!(d.label(), "domain 0");
    }

    #[test]
    fn domain_refs_follow_xl() {
        assert_eq!(DomainRef::parse("7"), DomainRef::Id(7));
        assert_eq!(DomainRef::parse("0"), DomainRef::Id(0));
        assert_eq!(DomainRef::parse("g1"), DomainRef::Name("g1".into()));
        assert_eq!(DomainRef::parse("+7"), DomainRef::Name("+7".into()));
        assert_eq!(DomainRef::parse("1g"), DomainRef::Name("1g".into()));
        let mk = |id, name: &str| Domain::from_raw(RawInfo { domid: id, ..Default::default() }, Some(name.into()));
        let doms = vec![mk(0, "Domain-0"), mk(4, "g1"), mk(5, "g2")];
        assert_eq!(DomainRef::parse("g2").select(&doms).unwrap().id, 5);
        assert_eq!(DomainRef::parse("4").select(&doms).unwrap().name.as_deref(), Some("g1"));
        assert!(DomainRef::parse("g3").select(&doms).is_none());
        assert!(DomainRef::parse("9").select(&doms).is_none());
    }
}
