//! Keyed pseudonyms: the private `_key` of every row and the tokens of `hash`.

use std::fmt;

use arrow::array::{Array, FixedSizeBinaryArray, Int32Array, Int64Array, RecordBatch, StringArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use arrow::error::ArrowError;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The name of the private key column. It lives in state only, never in a
/// published file: a pseudonym is still personal data.
pub const KEY_COLUMN: &str = "_key";
/// Bytes in a `_key`: the HMAC-SHA-256 truncated to its first 128 bits (RFC
/// 2104, section 5). The key index always told rows apart by these 16 bytes
/// (128 bits keep collisions out of reach, `publish::state::Key`); keeping
/// all 32 would make the state files a third larger and every classified
/// batch carry 16 bytes a row for nothing.
pub const KEY_BYTES: usize = 16;
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

    fn derive(&self, purpose: &[u8]) -> [u8; 32] {
        // Separate keys per purpose, so a published token can never be matched to a `_key`.
        let mut mac = HmacSha256::new_from_slice(&self.0).unwrap_or_else(|_| unreachable_key());
        mac.update(purpose);
        mac.finalize().into_bytes().into()
    }
}

fn unreachable_key() -> HmacSha256 {
    // HMAC accepts keys of any length; this cannot happen.
    HmacSha256::new_from_slice(&[0u8; 32]).unwrap_or_else(|_| std::process::abort())
}

/// Computes `_key`s and `hash` tokens with keys derived from one secret.
#[derive(Clone)]
pub struct Keyer {
    /// The `_key` key (also behind the fingerprint).
    rows: Prepared,
    /// The `hash` token key.
    token: Prepared,
}

impl fmt::Debug for Keyer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Keyer(***)")
    }
}

/// SHA-256's initial state (FIPS 180-4, 5.3.3).
const SHA256_IV: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// HMAC-SHA-256 (RFC 2104) under one 32-byte key, with the states after the
/// key's inner and outer pad computed once. A row's `_key` is then two
/// SHA-256 compressions (for key text up to 55 bytes) and no allocation;
/// through `hmac`, each row cloned and finalized hasher objects, which cost
/// as much again as the compressions. Equal to `hmac` (a test checks; the
/// derivation of the keys from the secret, of any length, still uses it).
#[derive(Clone)]
struct Prepared {
    inner: [u32; 8],
    outer: [u32; 8],
}

impl Prepared {
    fn new(key: &[u8; 32]) -> Self {
        let state_after = |pad: u8| {
            let mut block = [pad; 64];
            for (b, k) in block.iter_mut().zip(key) {
                *b ^= k;
            }
            let mut state = SHA256_IV;
            sha2::block_api::compress256(&mut state, &[block]);
            state
        };
        Self {
            inner: state_after(0x36),
            outer: state_after(0x5c),
        }
    }

    fn mac(&self, message: &[u8]) -> [u8; 32] {
        // The inner hash: the message after the key's block, then padding
        // and the bit length of both.
        let mut state = self.inner;
        let (blocks, rest) = message.as_chunks::<64>();
        sha2::block_api::compress256(&mut state, blocks);
        let mut block = [0u8; 64];
        block[..rest.len()].copy_from_slice(rest);
        block[rest.len()] = 0x80;
        if rest.len() >= 56 {
            sha2::block_api::compress256(&mut state, &[block]);
            block = [0; 64];
        }
        let bits = (64 + message.len() as u64) * 8;
        block[56..].copy_from_slice(&bits.to_be_bytes());
        sha2::block_api::compress256(&mut state, &[block]);
        // The outer hash: the inner digest after the key's other block.
        let mut block = [0u8; 64];
        for (out, word) in block.chunks_exact_mut(4).zip(state) {
            out.copy_from_slice(&word.to_be_bytes());
        }
        block[32] = 0x80;
        block[56..].copy_from_slice(&((64u64 + 32) * 8).to_be_bytes());
        let mut state = self.outer;
        sha2::block_api::compress256(&mut state, &[block]);
        let mut out = [0u8; 32];
        for (out, word) in out.chunks_exact_mut(4).zip(state) {
            out.copy_from_slice(&word.to_be_bytes());
        }
        out
    }
}

/// A key column's values as the text the `_key` is computed over.
enum KeyText<'a> {
    Text(&'a StringArray),
    /// Integers are written straight into the row's text, as casting them
    /// to text would write them, without a text array in between.
    Int64(&'a Int64Array),
    Int32(&'a Int32Array),
}

impl KeyText<'_> {
    fn append(&self, row: usize, out: &mut Vec<u8>, digits: &mut itoa::Buffer) {
        match self {
            KeyText::Text(a) if a.is_valid(row) => {
                out.extend_from_slice(a.value(row).trim().as_bytes());
            }
            KeyText::Int64(a) if a.is_valid(row) => {
                out.extend_from_slice(digits.format(a.value(row)).as_bytes());
            }
            KeyText::Int32(a) if a.is_valid(row) => {
                out.extend_from_slice(digits.format(a.value(row)).as_bytes());
            }
            // NULL is the empty text.
            _ => {}
        }
    }
}

impl Keyer {
    /// Keys derived from `key`.
    pub fn new(key: &PseudonymKey) -> Self {
        let rows = key.derive(b"oppen/_key/v1");
        let token = key.derive(b"oppen/hash/v1");
        Self {
            rows: Prepared::new(&rows),
            token: Prepared::new(&token),
        }
    }

    /// The `_key` of every row: HMAC-SHA-256 over the key columns' text, joined by
    /// the unit separator, its first [`KEY_BYTES`] bytes.
    pub fn keys(
        &self,
        batch: &RecordBatch,
        key_indices: &[usize],
    ) -> Result<FixedSizeBinaryArray, ArrowError> {
        let cast_texts = key_indices
            .iter()
            .map(|&i| {
                let column = batch.column(i);
                match column.data_type() {
                    DataType::Int64 | DataType::Int32 | DataType::Utf8 => Ok(None),
                    _ => cast(column, &DataType::Utf8).map(Some),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let texts: Vec<KeyText<'_>> = key_indices
            .iter()
            .zip(&cast_texts)
            .filter_map(|(&i, cast)| {
                let column = cast.as_ref().unwrap_or(batch.column(i));
                if let Some(a) = column.as_any().downcast_ref::<StringArray>() {
                    Some(KeyText::Text(a))
                } else if let Some(a) = column.as_any().downcast_ref::<Int64Array>() {
                    Some(KeyText::Int64(a))
                } else {
                    column
                        .as_any()
                        .downcast_ref::<Int32Array>()
                        .map(KeyText::Int32)
                }
            })
            .collect();
        let mut out = Vec::with_capacity(batch.num_rows() * KEY_BYTES);
        let mut text = Vec::new();
        let mut digits = itoa::Buffer::new();
        for row in 0..batch.num_rows() {
            text.clear();
            for (i, column) in texts.iter().enumerate() {
                if i > 0 {
                    text.push(KEY_SEPARATOR);
                }
                column.append(row, &mut text, &mut digits);
            }
            out.extend_from_slice(&self.rows.mac(&text)[..KEY_BYTES]);
        }
        FixedSizeBinaryArray::try_new(KEY_BYTES as i32, out.into(), None)
    }

    /// Identifies the key without revealing it: recorded with the state so a
    /// changed key is noticed before it re-keys every row.
    pub fn fingerprint(&self) -> String {
        hex::encode(&self.rows.mac(b"oppen/fingerprint/v1")[..8])
    }

    /// The `hash` token of a value: hex of a truncated HMAC-SHA-256.
    pub fn token(&self, value: &str) -> String {
        hex::encode(&self.token.mac(value.as_bytes())[..TOKEN_BYTES])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::ArrayRef;

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

    fn keyer() -> Keyer {
        Keyer::new(&PseudonymKey::from_bytes(vec![1; 32]).unwrap_or_else(|e| panic!("{e}")))
    }

    fn keys_of(columns: Vec<ArrayRef>) -> Vec<String> {
        let fields: Vec<_> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                arrow::datatypes::Field::new(format!("c{i}"), c.data_type().clone(), true)
            })
            .collect();
        let indices: Vec<usize> = (0..columns.len()).collect();
        let batch = RecordBatch::try_new(
            std::sync::Arc::new(arrow::datatypes::Schema::new(fields)),
            columns,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let keys = keyer()
            .keys(&batch, &indices)
            .unwrap_or_else(|e| panic!("{e}"));
        (0..keys.len())
            .map(|r| hex::encode(keys.value(r)))
            .collect()
    }

    /// `_key`s, the key's fingerprint and `hash` tokens must never change
    /// between releases (the state is keyed by them): these are HMAC-SHA-256
    /// as Python's `hmac` module computes it, e.g. for a `_key`
    /// `hmac.new(hmac.new(secret, b"oppen/_key/v1", sha256).digest(), text, sha256).digest()[:16]`
    /// (the first half of what a `_key` was before it was cut to 16 bytes).
    #[test]
    fn keys_are_hmac_sha256_of_the_key_text() {
        let ids: ArrayRef = std::sync::Arc::new(Int64Array::from(vec![42]));
        assert_eq!(keys_of(vec![ids]), ["e95bdc1e90346b93b4645894402bd7a1"]);
        let ids: ArrayRef = std::sync::Arc::new(Int32Array::from(vec![-7]));
        let names: ArrayRef = std::sync::Arc::new(StringArray::from(vec![" ab c "]));
        assert_eq!(
            keys_of(vec![ids, names]),
            ["1e0dfc1f81dfe0f833adebc256f65b75"]
        );
        // The key's fingerprint (recorded with every state) and a `hash`
        // token (published) are pinned the same way.
        assert_eq!(keyer().fingerprint(), "24e2b88be3a87be2");
        assert_eq!(
            keyer().token("Stor gatan 1"),
            "8dcfdca5004e0c545a0255b0fbe413a3"
        );
    }

    /// Integer key columns written straight into the key text give the keys
    /// their text (as a cast writes it) gives, NULLs included.
    #[test]
    fn integer_keys_are_the_keys_of_their_text() {
        let values = [
            Some(0i64),
            Some(-1),
            Some(i64::MAX),
            Some(i64::MIN),
            None,
            Some(1234567),
        ];
        let text: ArrayRef = std::sync::Arc::new(StringArray::from(
            values
                .iter()
                .map(|v| v.map(|v| v.to_string()))
                .collect::<Vec<_>>(),
        ));
        let wide: ArrayRef = std::sync::Arc::new(Int64Array::from(values.to_vec()));
        let narrow: ArrayRef = std::sync::Arc::new(Int32Array::from(
            values
                .iter()
                .map(|v| v.map(|v| v as i32))
                .collect::<Vec<_>>(),
        ));
        let narrow_text: ArrayRef = std::sync::Arc::new(StringArray::from(
            values
                .iter()
                .map(|v| v.map(|v| (v as i32).to_string()))
                .collect::<Vec<_>>(),
        ));
        assert_eq!(keys_of(vec![wide.clone()]), keys_of(vec![text.clone()]));
        assert_eq!(
            keys_of(vec![narrow.clone()]),
            keys_of(vec![narrow_text.clone()])
        );
        assert_eq!(
            keys_of(vec![wide, narrow]),
            keys_of(vec![text, narrow_text])
        );
        // Any other type goes through its text.
        let small: ArrayRef =
            std::sync::Arc::new(arrow::array::Int16Array::from(vec![Some(5), None]));
        let small_text: ArrayRef = std::sync::Arc::new(StringArray::from(vec![Some("5"), None]));
        assert_eq!(keys_of(vec![small]), keys_of(vec![small_text]));
    }

    proptest::proptest! {
        /// The prepared HMAC is the `hmac` crate's, for messages across the
        /// block and padding boundaries (55, 56, 64 bytes and beyond).
        #[test]
        fn the_prepared_mac_is_hmac_sha256(
            key in proptest::array::uniform32(proptest::num::u8::ANY),
            message in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
        ) {
            let mut reference = HmacSha256::new_from_slice(&key).unwrap_or_else(|_| unreachable_key());
            reference.update(&message);
            let expected: [u8; 32] = reference.finalize().into_bytes().into();
            proptest::prop_assert_eq!(Prepared::new(&key).mac(&message), expected);
        }
    }
}
