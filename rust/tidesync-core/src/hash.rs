//! The 64-bit hash of byte strings that digests and key tables use.
//!
//! A multiply-fold hash in the style of wyhash: a string of up to 16 bytes is its two
//! 8-byte words (masked to its length) multiplied once, 17 to 64 bytes take one such
//! multiply per 16-byte piece (2, 3 or 4), and every string ends with one more
//! multiply that folds in its length; longer strings go through `xxh3_64`.
//! Digests hash every key and node id of a table, so this is their hot loop: a 36-byte
//! UUID text costs four multiplies and no branch on its length, where `xxh3_64` costs
//! about twice as much and branches on the length of short strings (node ids of mixed
//! lengths mispredict). `xxhash-rust`'s and `rapidhash`'s short-string paths both
//! branch; hence this small function of our own. Not cryptographic: it finds
//! differences between honest copies, not forgeries. Its values are part of the
//! digest definition (docs/semantics.md): changing it changes every digest.

use xxhash_rust::xxh3::xxh3_64;

/// Arbitrary 64-bit constants with about half their bits set.
const S: [u64; 10] = [
    0xe220_a839_7b1d_cdaf,
    0x6e78_9e6a_a1b9_65f4,
    0x06c4_5d18_8009_454f,
    0xf88b_b8a8_724c_81ec,
    0xd1b5_4a32_d192_ed03,
    0xaef0_3ee4_62c7_dad9,
    0x2545_f491_4f6c_dd1d,
    0x9e37_79b9_7f4a_7c15,
    0xbf58_476d_1ce4_e5b9,
    0x94d0_49bb_1331_11eb,
];

/// `MASK_LOW[len]` keeps the first `min(len, 8)` bytes of a little-endian word;
/// `MASK_HIGH[len]` the first `len - 8` bytes of the next (strings of up to 16 bytes).
pub(crate) const MASK_LOW: [u64; 17] = {
    let mut m = [u64::MAX; 17];
    let mut len = 0;
    while len < 8 {
        m[len] = (1u64 << (8 * len)) - 1;
        len += 1;
    }
    m
};
pub(crate) const MASK_HIGH: [u64; 17] = {
    let mut m = [0u64; 17];
    let mut len = 9;
    while len <= 16 {
        m[len] = if len == 16 { u64::MAX } else { (1u64 << (8 * (len - 8))) - 1 };
        len += 1;
    }
    m
};

/// The 128-bit product of two words, folded to 64 bits.
#[inline(always)]
pub(crate) fn mum(a: u64, b: u64) -> u64 {
    let r = a as u128 * b as u128;
    r as u64 ^ (r >> 64) as u64
}

#[inline(always)]
fn word(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[inline(always)]
fn finish(acc: u64, len: usize) -> u64 {
    mum(acc ^ S[8], len as u64 ^ S[9])
}

/// The hash of a string of up to 16 bytes given as its two words, zero past its end.
#[inline(always)]
pub(crate) fn short(low: u64, high: u64, len: usize) -> u64 {
    finish(mum(low ^ S[0], high ^ S[1]), len)
}

/// Sixteen bytes as two words, mixed with two of the constants.
#[inline(always)]
fn pair(b: &[u8; 16], s0: u64, s1: u64) -> u64 {
    mum(word(b, 0) ^ s0, word(b, 8) ^ s1)
}

/// 17 to 64 bytes (`b.len()`): 16-byte pieces from the start, the last of them
/// replaced by the last 16 bytes (which may overlap the piece before it), so that a
/// 36-byte UUID text takes three pieces.
#[inline(always)]
fn medium(b: &[u8]) -> u64 {
    let n = b.len();
    let (Some(first), Some(last)) = (b.first_chunk::<16>(), b.last_chunk::<16>()) else {
        unreachable!("medium strings have 17 to 64 bytes")
    };
    let mut acc = pair(first, S[0], S[1]) ^ pair(last, S[2], S[3]);
    if n > 32 {
        let Some(second) = b[16..].first_chunk::<16>() else { unreachable!("more than 32 bytes") };
        acc ^= pair(second, S[4], S[5]);
    }
    if n > 48 {
        let Some(third) = b[32..].first_chunk::<16>() else { unreachable!("more than 48 bytes") };
        acc ^= pair(third, S[6], S[7]);
    }
    finish(acc, n)
}

/// The hash of a byte string.
#[inline]
pub(crate) fn hash_bytes(b: &[u8]) -> u64 {
    match b.len() {
        0..=16 => {
            let mut bytes = [0u8; 16];
            bytes[..b.len()].copy_from_slice(b);
            short(word(&bytes, 0), word(&bytes, 8), b.len())
        }
        17..=64 => medium(b),
        _ => xxh3_64(b),
    }
}

/// `hash_bytes(&data[from..to])`, for the values of a string or binary array: a
/// short string is read as two whole words, past its end but within `data`, and
/// masked, so that strings of mixed short lengths take no branch on their length.
#[inline(always)]
pub(crate) fn hash_in(data: &[u8], from: usize, to: usize) -> u64 {
    // One bounds check per string (`get` and `first_chunk`), not one per word read.
    let len = to.wrapping_sub(from);
    if len <= 16 {
        if let Some(b) = data.get(from..).and_then(<[u8]>::first_chunk::<16>) {
            return short(word(b, 0) & MASK_LOW[len], word(b, 8) & MASK_HIGH[len], len);
        }
    } else if len <= 64 {
        if let Some(b) = data.get(from..to) {
            return medium(b);
        }
    }
    hash_bytes(&data[from..to])
}

/// The hash of a 64-bit value (as its 8 little-endian bytes would hash).
#[inline(always)]
pub(crate) fn hash_u64(v: u64) -> u64 {
    short(v, 0, 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_in_place_gives_the_hash_of_the_bytes() {
        // Every length up to 80, at every position of a buffer, including its end.
        let data: Vec<u8> = (0..200u32).map(|i| (i * 37 + 11) as u8).collect();
        for len in 0..=80 {
            for from in 0..=data.len() - len {
                assert_eq!(hash_in(&data, from, from + len), hash_bytes(&data[from..from + len]), "{from}+{len}");
            }
        }
        assert_eq!(hash_u64(0x0102_0304_0506_0708), hash_bytes(&0x0102_0304_0506_0708u64.to_le_bytes()));
    }

    #[test]
    fn every_byte_and_the_length_count() {
        let mut seen = std::collections::HashSet::new();
        for len in 0..=70usize {
            let base = vec![0u8; len];
            assert!(seen.insert(hash_bytes(&base)), "zeros of length {len}");
            for at in 0..len {
                for bit in [0x01, 0x80] {
                    let mut b = base.clone();
                    b[at] ^= bit;
                    assert!(seen.insert(hash_bytes(&b)), "length {len}, byte {at}, bit {bit:#x}");
                }
            }
        }
    }

    #[test]
    fn top_bits_spread_over_buckets() {
        // Digest buckets are the hash's top bits: UUID-like texts fill 64 buckets evenly.
        let mut counts = [0u32; 64];
        for i in 0..64_000u64 {
            let key = format!("0190a5e2-7c3b-7def-8a01-{i:012x}");
            counts[(hash_bytes(key.as_bytes()) >> 58) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (850..1150).contains(&c)), "{counts:?}");
    }
}
