//! xenmig: move a running Xen guest to another host together with its
//! local disk.
//!
//! The disk half is a library; the `xenmig` binary is a thin CLI over it.
//!
//! - [`digest`]: block digest algorithms and the short wire key.
//! - [`layout`]: how an image is cut into blocks (partition-aware).
//! - [`image`]: files and block devices, read and written by offset.
//! - [`blockmap`]: per-block, per-group and whole-image digests, hashed on all cores.
//! - [`fileformat`], [`hashfile`], [`index`]: the persisted hash list and index.
//! - [`compress`]: codecs and the `auto` policy.
//! - [`protocol`]: frames exchanged by the two ends, and the exchange itself.
//! - [`transport`]: local socket pairs, ssh, and byte counting.
//! - [`engine`]: the source and target ends of a copy, and its report.
//! - [`xen`]: the hypervisor, its domains and their disks (Xen libraries loaded at run time).
//! - [`lvm`]: logical volumes through the lvm2 commands.
//! - [`migrate`]: a running domain and its LVM disks to another host (above `engine` and `xen`).

pub mod blockmap;
pub mod compress;
pub mod digest;
pub mod dmsnap;
pub mod engine;
pub mod fileformat;
pub mod hashfile;
pub mod image;
pub mod index;
pub mod layout;
pub mod lvm;
pub mod migrate;
pub mod protocol;
pub mod transport;
pub mod xen;
