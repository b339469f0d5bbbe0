//! Sizes as people write them: `64M`, `1G`, `65536K` or plain bytes, one
//! syntax for the pair file and `tandem run --mem`; each caller words its
//! own error.

/// Why a text is not a size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeError {
    /// Not digits with an optional K, M or G.
    NotASize,
    /// More bytes than a u64 holds.
    TooLarge,
}

/// The bytes `text` says (surrounding blanks ignored).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let s = text.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 10),
        Some((i, 'M' | 'm')) => (&s[..i], 20),
        Some((i, 'G' | 'g')) => (&s[..i], 30),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| SizeError::NotASize)?;
    n.checked_mul(1 << shift).ok_or(SizeError::TooLarge)
}
