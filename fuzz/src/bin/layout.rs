//! AFL target `layout`: see xenmig_fuzz::targets::layout and docs/fuzzing.md.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        xenmig_fuzz::targets::layout(data);
    });
}
