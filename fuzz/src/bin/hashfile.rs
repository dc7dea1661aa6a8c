//! AFL target `hashfile`: see xenmig_fuzz::targets::hashfile and docs/fuzzing.md.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        xenmig_fuzz::targets::hashfile(data);
    });
}
