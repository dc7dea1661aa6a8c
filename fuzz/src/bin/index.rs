//! AFL target `index`: see xenmig_fuzz::targets::index and docs/fuzzing.md.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        xenmig_fuzz::targets::index(data);
    });
}
