//! xenmig: move a running Xen guest to another host together with its
//! local disk.
//!
//! The library is layered; each layer uses only those listed above it
//! (docs/architecture.md draws the layers and the data flow):
//!
//! - [`blocks`]: digests, how an image is cut into blocks, block maps.
//! - [`formats`]: the persisted hash file and index, and their framing.
//! - [`storage`]: files and block devices, LVM, device-mapper snapshots.
//! - [`wire`]: the copy protocol, compression, transports.
//! - [`copy`]: the two ends of a copy (driven step by step), references,
//!   change tracking, quiescing, the report.
//! - [`xen`]: the hypervisor, its domains and their disks (Xen libraries
//!   loaded at run time; raw bindings in `xen::sys`).
//! - [`migrate`]: a running domain and its LVM disks to another host; the
//!   only layer that uses both `copy` and `xen`, which know nothing of
//!   each other.
//! - [`config`]: the site configuration file (`/etc/xenmig/xenmig.yaml`),
//!   read and checked; merging it with flags is the command line's job.
//!
//! The `xenmig` binary (`src/cli/`) is a thin layer over it.

pub mod blocks;
pub mod config;
pub mod copy;
pub mod formats;
pub mod migrate;
pub mod storage;
pub mod wire;
pub mod xen;

#[cfg(test)]
mod test_data;
#[cfg(test)]
#[path = "../tests/common/script.rs"]
mod test_script;
