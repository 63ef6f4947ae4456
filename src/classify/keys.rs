//! Keyed pseudonyms: the private `_key` of every row and the tokens of `hash`.

use std::fmt;

use arrow::array::{Array, FixedSizeBinaryArray, RecordBatch, StringArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use arrow::error::ArrowError;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The name of the private key column. It lives in state only, never in a
/// published file: a pseudonym is still personal data.
pub const KEY_COLUMN: &str = "_key";
/// Bytes in a `_key`.
pub const KEY_BYTES: usize = 32;
/// Bytes of a `hash` token (hex-encoded to twice as many characters).
const TOKEN_BYTES: usize = 16;
/// Shortest secret accepted.
pub const MIN_SECRET_BYTES: usize = 32;
/// Separates key columns in the text that `_key` is computed over.
const KEY_SEPARATOR: u8 = 0x1f;

type HmacSha256 = Hmac<Sha256>;

/// The secret behind `_key` and `hash`. Never printed.
#[derive(Clone)]
pub struct PseudonymKey(Vec<u8>);

impl fmt::Debug for PseudonymKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PseudonymKey(***)")
    }
}

impl PseudonymKey {
    /// A key from secret bytes; at least [`MIN_SECRET_BYTES`].
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, String> {
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "the pseudonym key has {} bytes; it needs at least {MIN_SECRET_BYTES} (e.g. `openssl rand -hex 32`)",
                bytes.len()
            ));
        }
        Ok(Self(bytes))
    }

    /// A fresh random key.
    pub fn generate() -> Result<Self, String> {
        let mut bytes = vec![0u8; MIN_SECRET_BYTES];
        getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for a new key: {e}"))?;
        Ok(Self(bytes))
    }

    /// The key as stored in a key file: hex text.
    pub fn to_hex(&self) -> String {
        hex::encode(&self.0)
    }

    /// Reads a key file's text: hex (as oppen writes it) or any other text of
    /// at least [`MIN_SECRET_BYTES`] bytes.
    pub fn from_text(text: &str) -> Result<Self, String> {
        let text = text.trim();
        match hex::decode(text) {
            Ok(bytes) if bytes.len() >= MIN_SECRET_BYTES => Self::from_bytes(bytes),
            _ => Self::from_bytes(text.as_bytes().to_vec()),
        }
    }

    fn derive(&self, purpose: &[u8]) -> HmacSha256 {
        // Separate keys per purpose, so a published token can never be matched to a `_key`.
        let mut mac = HmacSha256::new_from_slice(&self.0).unwrap_or_else(|_| unreachable_key());
        mac.update(purpose);
        let derived = mac.finalize().into_bytes();
        HmacSha256::new_from_slice(&derived).unwrap_or_else(|_| unreachable_key())
    }
}

fn unreachable_key() -> HmacSha256 {
    // HMAC accepts keys of any length; this cannot happen.
    HmacSha256::new_from_slice(&[0u8; 32]).unwrap_or_else(|_| std::process::abort())
}

/// Computes `_key`s and `hash` tokens with keys derived from one secret.
#[derive(Clone)]
pub struct Keyer {
    row_key: HmacSha256,
    token: HmacSha256,
}

impl fmt::Debug for Keyer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Keyer(***)")
    }
}

impl Keyer {
    /// Keys derived from `key`.
    pub fn new(key: &PseudonymKey) -> Self {
        Self {
            row_key: key.derive(b"oppen/_key/v1"),
            token: key.derive(b"oppen/hash/v1"),
        }
    }

    /// The `_key` of every row: HMAC-SHA-256 over the key columns' text, joined by
    /// the unit separator.
    pub fn keys(
        &self,
        batch: &RecordBatch,
        key_indices: &[usize],
    ) -> Result<FixedSizeBinaryArray, ArrowError> {
        let texts = key_indices
            .iter()
            .map(|&i| cast(batch.column(i), &DataType::Utf8))
            .collect::<Result<Vec<_>, _>>()?;
        let texts: Vec<&StringArray> = texts
            .iter()
            .filter_map(|a| a.as_any().downcast_ref::<StringArray>())
            .collect();
        let mut out = Vec::with_capacity(batch.num_rows() * KEY_BYTES);
        for row in 0..batch.num_rows() {
            let mut mac = self.row_key.clone();
            for (i, text) in texts.iter().enumerate() {
                if i > 0 {
                    mac.update(&[KEY_SEPARATOR]);
                }
                if text.is_valid(row) {
                    mac.update(text.value(row).trim().as_bytes());
                }
            }
            out.extend_from_slice(&mac.finalize().into_bytes());
        }
        FixedSizeBinaryArray::try_new(KEY_BYTES as i32, out.into(), None)
    }

    /// Identifies the key without revealing it: recorded with the state so a
    /// changed key is noticed before it re-keys every row.
    pub fn fingerprint(&self) -> String {
        let mut mac = self.row_key.clone();
        mac.update(b"oppen/fingerprint/v1");
        hex::encode(&mac.finalize().into_bytes()[..8])
    }

    /// The `hash` token of a value: hex of a truncated HMAC-SHA-256.
    pub fn token(&self, value: &str) -> String {
        let mut mac = self.token.clone();
        mac.update(value.as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..TOKEN_BYTES])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_and_secret_dependent() {
        let a =
            Keyer::new(&PseudonymKey::from_bytes(vec![1; 32]).unwrap_or_else(|e| panic!("{e}")));
        let b =
            Keyer::new(&PseudonymKey::from_bytes(vec![2; 32]).unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(a.token("x"), a.token("x"));
        assert_ne!(a.token("x"), b.token("x"));
        assert_eq!(a.token("x").len(), 32);
        assert!(PseudonymKey::from_bytes(vec![0; 8]).is_err());
        assert_eq!(
            format!("{:?}", PseudonymKey::from_bytes(vec![7; 32])),
            "Ok(PseudonymKey(***))"
        );
        let k = PseudonymKey::generate().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(PseudonymKey::from_text(&k.to_hex()).map(|k| k.0), Ok(k.0));
    }
}
