//! Where disks live on a host.
//!
//! - [`image`]: files and block devices, read and written by offset.
//! - [`lvm`]: logical volumes through the lvm2 commands.
//! - [`dmsnap`]: device-mapper snapshot exception tables (what changed).

pub mod dmsnap;
pub mod image;
pub mod lvm;
