//! AFL target `xenstore`: see xenmig_fuzz::targets::xenstore and docs/fuzzing.md.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        xenmig_fuzz::targets::xenstore(data);
    });
}
