//! The fuzz target bodies, shared with the main crate's corpus replay test
//! (`tests/fuzz_corpus.rs`), which includes the same file.

#[path = "../../tests/fuzz_targets/mod.rs"]
pub mod targets;
