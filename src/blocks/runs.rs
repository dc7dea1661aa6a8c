//! Runs of consecutive block or group numbers: the one check every run a
//! peer names passes, and the one way wanted numbers are cut into runs.

/// The end of `first..first + count` if that is a non-empty range inside
/// `0..limit`; `None` for an empty, overflowing or out-of-range run (a
/// peer's numbers are hostile until checked here).
pub fn checked_end(first: u64, count: u32, limit: u64) -> Option<u64> {
    first.checked_add(count as u64).filter(|&end| end <= limit && count > 0)
}

/// Cut ascending `items` into runs of consecutive numbers, each at most
/// `max` long (at least 1), as `(first, count)`.
pub fn runs(items: impl IntoIterator<Item = u64>, max: u32) -> Vec<(u64, u32)> {
    let max = max.max(1);
    let mut out: Vec<(u64, u32)> = Vec::new();
    for i in items {
        match out.last_mut() {
            Some((f, c)) if *f + *c as u64 == i && *c < max => *c += 1,
            _ => out.push((i, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked() {
        assert_eq!(checked_end(0, 4, 4), Some(4));
        assert_eq!(checked_end(1, 4, 4), None);
        assert_eq!(checked_end(3, 0, 4), None);
        assert_eq!(checked_end(u64::MAX, 2, u64::MAX), None);
    }

    #[test]
    fn runs_break_at_gaps_and_at_the_maximum() {
        assert_eq!(runs([1, 2, 3, 5, 6, 9], 8), vec![(1, 3), (5, 2), (9, 1)]);
        assert_eq!(runs(0..5, 2), vec![(0, 2), (2, 2), (4, 1)]);
        assert_eq!(runs([7, 8], 0), vec![(7, 1), (8, 1)]);
        assert!(runs([], 4).is_empty());
    }
}
