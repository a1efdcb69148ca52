//! Canonical UUID texts (`8-4-4-4-12` lowercase hex digits) read as the UUIDs'
//! 128-bit values.
//!
//! Why: key columns of UUIDs often arrive as text (SQLite stores them so, and so do
//! CSV and JSON sources). Matched as text, every key comparison reads 36 bytes
//! stored out of line, which on million-row batches is a cache miss each; as
//! 128-bit values the keys hash cheaply and compare in place, as binary UUID keys do.
//!
//! Only lowercase digits are accepted, so that the map is one-to-one: two texts that
//! differ only in case are different keys and must stay different. (General UUID
//! parsers, such as those of the `uuid` and `uuid-simd` crates, accept both cases,
//! which is right for reading a UUID and wrong for comparing keys.)
//!
//! On x86-64 with SSSE3 (every x86-64 CPU of the last fifteen years) a text is read
//! with a few vector instructions; elsewhere eight digits at a time in a 64-bit word.

use arrow_array::OffsetSizeTrait;

/// Every value of a string or binary column (`offsets` into `data`, no nulls) as the
/// value of its canonical UUID text, in order; None as soon as one is not such a text.
pub(crate) fn parse_all<O: OffsetSizeTrait>(offsets: &[O], data: &[u8]) -> Option<Vec<u128>> {
    let texts = offsets.windows(2).map(|w| &data[w[0].as_usize()..w[1].as_usize()]);
    let mut out = Vec::with_capacity(offsets.len().saturating_sub(1));
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("ssse3") {
        // SAFETY: the CPU has SSSE3, checked just above.
        let all = unsafe { x86::parse_into(texts, &mut out) };
        return all.then_some(out);
    }
    for t in texts {
        out.push(parse_swar(t)?);
    }
    Some(out)
}

/// One text's value, or None (portable: eight digits at a time in a 64-bit word).
pub(crate) fn parse_swar(s: &[u8]) -> Option<u128> {
    let s: &[u8; 36] = s.try_into().ok()?;
    if s[8] != b'-' || s[13] != b'-' || s[18] != b'-' || s[23] != b'-' {
        return None;
    }
    let rd4 = |at: usize| u32::from_le_bytes([s[at], s[at + 1], s[at + 2], s[at + 3]]) as u64;
    let rd8 = |at: usize| {
        u64::from_le_bytes([s[at], s[at + 1], s[at + 2], s[at + 3], s[at + 4], s[at + 5], s[at + 6], s[at + 7]])
    };
    // The 32 digits, eight to a word, in text order (the first in the lowest byte).
    let words = [rd8(0), rd4(9) | rd4(14) << 32, rd4(19) | rd4(24) << 32, rd8(28)];
    let (mut value, mut ok) = (0u128, true);
    for w in words {
        let (v, digits) = hex_word(w);
        ok &= digits;
        value = value << 32 | v as u128;
    }
    ok.then_some(value)
}

/// Eight lowercase hex digits (the first in the lowest byte) as their 32-bit value,
/// and whether all eight were such digits.
#[inline]
fn hex_word(w: u64) -> (u32, bool) {
    const LOW: u64 = 0x0f0f_0f0f_0f0f_0f0f;
    const BIT6: u64 = 0x4040_4040_4040_4040;
    // Each byte's would-be digit value: the low nibble, plus 9 for letters (bit 6).
    let v = (w & LOW) + ((w & BIT6) >> 6) * 9;
    // A byte is a digit iff its value is below 16 and writing that value back as a
    // lowercase digit gives the byte again: no byte carries into the next here.
    let letter = (v + 0x7676_7676_7676_7676) & 0x8080_8080_8080_8080; // value >= 10
    let text = v + 0x3030_3030_3030_3030 + (letter >> 7) * 0x27;
    let ok = v & !LOW == 0 && text == w;
    // Pack the nibbles, first digit highest.
    let v = v.swap_bytes();
    let v = (v | v >> 4) & 0x00ff_00ff_00ff_00ff;
    let v = (v | v >> 8) & 0x0000_ffff_0000_ffff;
    let v = (v | v >> 16) & 0xffff_ffff;
    (v as u32, ok)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Parse every key into `out`; false as soon as one is not a canonical text.
    #[target_feature(enable = "ssse3")]
    pub(super) unsafe fn parse_into<'a>(keys: impl Iterator<Item = &'a [u8]>, out: &mut Vec<u128>) -> bool {
        for k in keys {
            match parse(k) {
                Some(v) => out.push(v),
                None => return false,
            }
        }
        true
    }

    #[inline]
    #[target_feature(enable = "ssse3")]
    fn parse(s: &[u8]) -> Option<u128> {
        if s.len() != 36 || s[8] != b'-' || s[13] != b'-' || s[18] != b'-' || s[23] != b'-' {
            return None;
        }
        const Z: i8 = -128; // a shuffle index that gives 0
                            // SAFETY: `s` has 36 bytes, so the loads at 0, 16 and 20 (16 bytes each) stay in it.
        let (a, b, c) = unsafe {
            let p = s.as_ptr();
            (
                _mm_loadu_si128(p as *const __m128i),
                _mm_loadu_si128(p.add(16) as *const __m128i),
                _mm_loadu_si128(p.add(20) as *const __m128i),
            )
        };
        // The 32 digits without the hyphens: text 0-7, 9-12, 14-17 and 19-22, 24-35.
        let first = _mm_or_si128(
            _mm_shuffle_epi8(a, _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15, Z, Z)),
            _mm_shuffle_epi8(b, _mm_setr_epi8(Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, 0, 1)),
        );
        let second = _mm_or_si128(
            _mm_shuffle_epi8(b, _mm_setr_epi8(3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, Z, Z, Z, Z)),
            _mm_shuffle_epi8(c, _mm_setr_epi8(Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, 12, 13, 14, 15)),
        );
        let (v0, ok0) = nibbles(first);
        let (v1, ok1) = nibbles(second);
        if !(ok0 && ok1) {
            return None;
        }
        // Pairs of nibbles into bytes (high * 16 + low), then the 16 bytes in order.
        let weights = _mm_setr_epi8(16, 1, 16, 1, 16, 1, 16, 1, 16, 1, 16, 1, 16, 1, 16, 1);
        let bytes = _mm_packus_epi16(_mm_maddubs_epi16(v0, weights), _mm_maddubs_epi16(v1, weights));
        let mut out = [0u8; 16];
        // SAFETY: `out` has 16 bytes.
        unsafe { _mm_storeu_si128(out.as_mut_ptr() as *mut __m128i, bytes) };
        Some(u128::from_be_bytes(out))
    }

    /// Sixteen lowercase hex digits as their values, and whether all were digits
    /// (the same test as `hex_word`: write the value back and compare).
    #[inline]
    #[target_feature(enable = "ssse3")]
    fn nibbles(h: __m128i) -> (__m128i, bool) {
        let bit6 = _mm_set1_epi8(0x40);
        let letter = _mm_cmpeq_epi8(_mm_and_si128(h, bit6), bit6);
        let v = _mm_add_epi8(_mm_and_si128(h, _mm_set1_epi8(0x0f)), _mm_and_si128(letter, _mm_set1_epi8(9)));
        // v <= 24, so signed compares are right.
        let above_9 = _mm_cmpgt_epi8(v, _mm_set1_epi8(9));
        let text = _mm_add_epi8(_mm_add_epi8(v, _mm_set1_epi8(0x30)), _mm_and_si128(above_9, _mm_set1_epi8(0x27)));
        let good = _mm_andnot_si128(_mm_cmpgt_epi8(v, _mm_set1_epi8(15)), _mm_cmpeq_epi8(text, h));
        (v, _mm_movemask_epi8(good) == 0xffff)
    }

    #[cfg(test)]
    pub(super) fn parse_one(s: &[u8]) -> Option<u128> {
        assert!(std::arch::is_x86_feature_detected!("ssse3"));
        // SAFETY: checked just above.
        unsafe { parse(s) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain definition: the shape, lowercase hex digits, and their value.
    fn reference(s: &[u8]) -> Option<u128> {
        if s.len() != 36 {
            return None;
        }
        let mut digits = String::new();
        for (i, &c) in s.iter().enumerate() {
            if [8, 13, 18, 23].contains(&i) {
                if c != b'-' {
                    return None;
                }
            } else if c.is_ascii_digit() || (b'a'..=b'f').contains(&c) {
                digits.push(c as char);
            } else {
                return None;
            }
        }
        u128::from_str_radix(&digits, 16).ok()
    }

    fn check(s: &[u8]) {
        let want = reference(s);
        assert_eq!(parse_swar(s), want, "swar {:?}", String::from_utf8_lossy(s));
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("ssse3") {
            assert_eq!(x86::parse_one(s), want, "ssse3 {:?}", String::from_utf8_lossy(s));
        }
    }

    #[test]
    fn canonical_texts_give_their_value() {
        let s = b"0190a5e2-7c3b-7def-8a01-23456789abcf";
        assert_eq!(parse_swar(s), Some(0x0190a5e2_7c3b_7def_8a01_23456789abcf));
        check(s);
        check(b"00000000-0000-0000-0000-000000000000");
        check(b"ffffffff-ffff-ffff-ffff-ffffffffffff");
        assert_eq!(
            parse_all(&[0i32, 36, 72], &[s.as_slice(), b"00000000-0000-0000-0000-000000000001"].concat()),
            Some(vec![0x0190a5e2_7c3b_7def_8a01_23456789abcf, 1])
        );
    }

    #[test]
    fn every_byte_at_every_position_is_checked() {
        // Each position, set to each byte value: exactly the right ones parse.
        let base = *b"0123abcd-4567-89ef-a0b1-c2d3e4f5a6b7";
        for pos in 0..36 {
            for byte in 0..=255u8 {
                let mut s = base;
                s[pos] = byte;
                check(&s);
            }
        }
    }

    #[test]
    fn other_texts_are_refused() {
        for s in [
            "0190A5E2-7C3B-7DEF-8A01-23456789ABCF", // uppercase: a different key
            "0190a5e2-7c3b-7def-8a01-23456789abc",
            "0190a5e2-7c3b-7def-8a01-23456789abcf0",
            "0190a5e27c3b7def8a0123456789abcf",
            "{0190a5e2-7c3b-7def-8a01-23456789abc}",
            "",
        ] {
            check(s.as_bytes());
            assert_eq!(parse_swar(s.as_bytes()), None, "{s}");
        }
        let data = [b"0190a5e2-7c3b-7def-8a01-23456789abcf".as_slice(), b"x"].concat();
        assert_eq!(parse_all(&[0i64, 36, 37], &data), None);
    }
}
