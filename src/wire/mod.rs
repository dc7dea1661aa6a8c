//! What crosses between the two ends of a copy.
//!
//! - [`protocol`]: the frames, the exchange, the versioning rule.
//! - [`compress`]: codecs and the `auto` policy.
//! - [`flow`]: how steadily the link drains our writes (spells of blocked writes, busy time).
//! - [`stream`]: one zstd stream per copy, across runs.
//! - [`subdelta`]: a changed block as the sub-blocks that differ from its old version.
//! - [`sketch`]: a resemblance sketch of a block; DST's blocks indexed by it.
//! - [`subgroup`]: a group's keys only where its sub-groups differ from DST's.
//! - [`held`]: the keys a new DST's host holds, so that the source keys only blocks it may find.
//! - [`liveness`]: idle timeouts and keep-alives.
//! - [`receipts`]: the target's receipts of what it read; the source's gate and link clock from them.
//! - [`rate`]: a bandwidth limit as written (`10M`).
//! - [`throttle`]: the token bucket of `--bwlimit`, in front of a link's writer.
//! - [`transport`]: local socket pairs, ssh, byte counting.
//! - [`ssh_cipher`]: AES-GCM first in ssh's cipher list, where the CPU has AES and the operator chose nothing.

pub mod compress;
pub mod flow;
pub mod held;
pub mod liveness;
pub mod protocol;
pub mod rate;
pub mod receipts;
pub mod sketch;
pub mod ssh_cipher;
pub mod stream;
pub mod subdelta;
pub mod subgroup;
pub mod throttle;
pub mod transport;
