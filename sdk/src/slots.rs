//! Slot tables for kernel modes: a table of `size` entries, each naming an
//! endpoint index; the kernel hashes a flow into a slot.

use crate::hash::stable_hash;

/// Maglev lookup table (Eisenbud et al., NSDI '16): each backend fills the
/// slots of its own permutation in turn, giving near-equal shares and
/// minimal disruption when a backend comes or goes. `size` should be a
/// prime well above the number of backends. Backends are named by a stable
/// key (e.g. "10.0.0.1:8080"), so the table depends on who they are, not on
/// their order.
pub fn maglev(backends: &[String], size: usize) -> Vec<u32> {
    let n = backends.len();
    if n == 0 || size == 0 {
        return Vec::new();
    }
    let m = size as u64;
    let perms: Vec<(u64, u64)> = backends
        .iter()
        .map(|b| {
            let offset = stable_hash(b.as_bytes()) % m;
            let skip = if m > 1 {
                stable_hash(format!("skip:{b}").as_bytes()) % (m - 1) + 1
            } else {
                1
            };
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; n];
    let mut table = vec![u32::MAX; size];
    let mut filled = 0;
    while filled < size {
        for (i, (offset, skip)) in perms.iter().enumerate() {
            let mut slot = ((offset + next[i] * skip) % m) as usize;
            while table[slot] != u32::MAX {
                next[i] += 1;
                slot = ((offset + next[i] * skip) % m) as usize;
            }
            table[slot] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == size {
                break;
            }
        }
    }
    table
}

/// A table of `size` slots shared out by weight (largest remainder), in
/// runs so that kernel rules stay short. Zero weights get no slot.
pub fn weighted(weights: &[u32], size: usize) -> Vec<u32> {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    if total == 0 || size == 0 {
        return Vec::new();
    }
    let mut shares: Vec<(usize, u64, u64)> = weights
        .iter()
        .enumerate()
        .map(|(i, w)| {
            (
                i,
                u64::from(*w) * size as u64 / total,
                u64::from(*w) * size as u64 % total,
            )
        })
        .collect();
    let given: u64 = shares.iter().map(|s| s.1).sum();
    let mut by_remainder: Vec<usize> = (0..shares.len()).filter(|i| weights[*i] > 0).collect();
    by_remainder.sort_by_key(|i| std::cmp::Reverse(shares[*i].2));
    for i in by_remainder
        .iter()
        .cycle()
        .take((size as u64 - given) as usize)
    {
        shares[*i].1 += 1;
    }
    shares
        .iter()
        .flat_map(|(i, n, _)| std::iter::repeat_n(*i as u32, *n as usize))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:80")).collect()
    }

    #[test]
    fn maglev_shares_are_near_equal() {
        let t = maglev(&names(5), 251);
        assert_eq!(t.len(), 251);
        for b in 0..5 {
            let c = t.iter().filter(|s| **s == b).count();
            assert!((48..=53).contains(&c), "backend {b} has {c} slots");
        }
    }

    #[test]
    fn removing_one_of_n_moves_about_one_nth() {
        let all = names(10);
        let before = maglev(&all, 1009);
        let mut fewer = all.clone();
        fewer.remove(3);
        let after = maglev(&fewer, 1009);
        // Compare by backend name: indices shift when one is removed.
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| all[**b as usize] != fewer[**a as usize])
            .count();
        let share = moved as f64 / 1009.0;
        // The removed backend's ~10% must move; Maglev keeps the rest mostly put.
        assert!(share < 0.16, "moved {share:.3}");
        assert!(share >= 0.09, "moved {share:.3}");
    }

    #[test]
    fn weighted_tables_follow_weights() {
        let t = weighted(&[3, 1, 0], 8);
        assert_eq!(t, [0, 0, 0, 0, 0, 0, 1, 1]);
        assert_eq!(weighted(&[1, 1, 1], 4).len(), 4);
        assert!(weighted(&[0, 0], 4).is_empty());
    }
}
