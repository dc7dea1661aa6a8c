//! Where disks live on a host.
//!
//! - [`disk`]: what the copy engine reads and writes (the `Disk` trait).
//! - [`image`]: files and block devices, read and written by offset.
//! - [`faulty`]: a test double of a disk that injects faults.
//! - [`lvm`]: logical volumes through the lvm2 commands.
//! - [`dmsnap`]: device-mapper snapshot exception tables (what changed).
//! - [`writeback`]: written ranges sent to the device while a copy runs.

pub mod disk;
pub mod dmsnap;
pub mod faulty;
pub mod image;
pub mod lvm;
pub mod writeback;
