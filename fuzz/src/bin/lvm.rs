//! AFL target `lvm`: see xenmig_fuzz::targets::lvm and docs/fuzzing.md.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        xenmig_fuzz::targets::lvm(data);
    });
}
