//! Stable hashing for policies: the same client maps to the same value in
//! every instance and every version, unlike std's randomly keyed hasher.

use crate::IpAddress;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a over bytes, then a final avalanche so that nearby inputs
/// (consecutive client ports) spread over the whole range.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h = FNV_OFFSET;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    mix(h)
}

/// Hash of a client address (ignoring the port): what ClientIP-style
/// stickiness and Maglev key on.
pub fn client_hash(client: IpAddress) -> u64 {
    match client {
        IpAddress::V4(a) => stable_hash(&a.to_be_bytes()),
        IpAddress::V6((hi, lo)) => {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&hi.to_be_bytes());
            b[8..].copy_from_slice(&lo.to_be_bytes());
            stable_hash(&b)
        }
    }
}

/// Hash of a client address and port: one value per flow.
pub fn flow_hash(client: IpAddress, port: u16) -> u64 {
    mix(client_hash(client) ^ u64::from(port).wrapping_mul(FNV_PRIME))
}

/// splitmix64's finaliser.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_stable_and_spread() {
        // Fixed value: changing the function would reshuffle every client.
        assert_eq!(stable_hash(b""), mix(FNV_OFFSET));
        let a = flow_hash(IpAddress::V4(0x0a00_0001), 1000);
        assert_eq!(a, flow_hash(IpAddress::V4(0x0a00_0001), 1000));
        assert_ne!(a, flow_hash(IpAddress::V4(0x0a00_0001), 1001));
        // Consecutive ports land in both halves of a 2-bucket split.
        let odd = (0..1000u16)
            .filter(|p| flow_hash(IpAddress::V4(1), *p) % 2 == 1)
            .count();
        assert!((400..600).contains(&odd), "{odd}");
    }
}
