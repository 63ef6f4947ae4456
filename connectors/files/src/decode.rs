//! Text decoding of export files: BOM sniffing, explicit encodings, Latin-1 fallback.

use std::borrow::Cow;

use encoding_rs::{Encoding, UTF_8, WINDOWS_1252};

/// How a file's bytes became text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// The encoding used.
    pub encoding: &'static Encoding,
    /// Whether a byte-order mark said so (rather than detection or configuration).
    pub from_bom: bool,
}

/// Resolves an `encoding:` setting (any WHATWG label: `utf-8`, `utf-16le`, `latin1`,
/// `windows-1252`, ...).
pub fn encoding_for_label(label: &str) -> Option<&'static Encoding> {
    Encoding::for_label(label.trim().as_bytes())
}

/// Decodes `bytes` to UTF-8 text.
///
/// With `forced`, that encoding is used (a matching BOM is still removed).
/// Otherwise: a BOM decides (UTF-8, UTF-16LE, UTF-16BE); valid UTF-8 is UTF-8;
/// anything else is Latin-1, decoded as Windows-1252 (its superset, which is what
/// Windows exports labelled Latin-1 really are).
pub fn decode<'a>(bytes: &'a [u8], forced: Option<&'static Encoding>) -> (Cow<'a, str>, Decoded) {
    if let Some(encoding) = forced {
        let (text, _had_errors) = encoding.decode_with_bom_removal(bytes);
        return (
            text,
            Decoded {
                encoding,
                from_bom: false,
            },
        );
    }
    if let Some((encoding, bom_len)) = Encoding::for_bom(bytes) {
        let (text, _) = encoding.decode_without_bom_handling(&bytes[bom_len..]);
        return (
            text,
            Decoded {
                encoding,
                from_bom: true,
            },
        );
    }
    match std::str::from_utf8(bytes) {
        // Valid UTF-8 is borrowed, not copied.
        Ok(text) => (
            Cow::Borrowed(text),
            Decoded {
                encoding: UTF_8,
                from_bom: false,
            },
        ),
        Err(_) => {
            let (text, _) = WINDOWS_1252.decode_without_bom_handling(bytes);
            (
                text,
                Decoded {
                    encoding: WINDOWS_1252,
                    from_bom: false,
                },
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use encoding_rs::UTF_16LE;

    #[test]
    fn detects_boms_and_fallbacks() {
        let (t, d) = decode(b"\xEF\xBB\xBFa;\xC3\xB6", None);
        assert_eq!((&*t, d.encoding, d.from_bom), ("a;ö", UTF_8, true));

        let utf16: Vec<u8> = [0xFF, 0xFE]
            .into_iter()
            .chain("å,b".encode_utf16().flat_map(u16::to_le_bytes))
            .collect();
        let (t, d) = decode(&utf16, None);
        assert_eq!(t, "å,b");
        assert!(d.encoding == UTF_16LE);

        let utf16be: Vec<u8> = [0xFE, 0xFF]
            .into_iter()
            .chain("ä".encode_utf16().flat_map(u16::to_be_bytes))
            .collect();
        assert_eq!(decode(&utf16be, None).0, "ä");

        let (t, d) = decode(b"Milj\xF6", None);
        assert_eq!((&*t, d.encoding), ("Miljö", WINDOWS_1252));

        let (t, _) = decode(b"plain", None);
        assert_eq!(t, "plain");
    }

    #[test]
    fn forced_encoding_wins() {
        let latin1 = encoding_for_label("latin1");
        assert!(latin1.is_some());
        // Valid UTF-8 bytes read as Latin-1 on request.
        assert_eq!(decode(b"\xC3\xB6", latin1).0, "Ã¶");
        assert!(encoding_for_label("no-such-encoding").is_none());
    }
}
