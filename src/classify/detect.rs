//! Detectors for personal data in values and in free text: Swedish identity
//! numbers (personnummer, samordningsnummer; organisationsnummer recognised as not
//! personal), e-mail addresses and Swedish phone numbers.
//!
//! Identity numbers, exactly: 10 digits `YYMMDD-NNNC`, or 12 with the century;
//! separator `-`, `+` (the person has turned 100) or none; `C` is the Luhn digit
//! over the nine digits before it. A personnummer has month 01-12 and a real date;
//! a samordningsnummer has day + 60 (61-91) and is otherwise a real date; an
//! organisationsnummer has 20 or more in digits 3-4, and its 12-digit form may
//! start with `16`.

use std::ops::Range;

use chrono::{Datelike, NaiveDate};

/// What an identity number is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    /// A person's number.
    Personnummer,
    /// A number for a person not (yet) registered in Sweden.
    Samordningsnummer,
    /// A legal person's number: not personal data.
    Organisationsnummer,
}

impl IdKind {
    /// Whether the number identifies a natural person.
    pub fn is_personal(self) -> bool {
        !matches!(self, IdKind::Organisationsnummer)
    }
}

/// Personal data found in text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// A personnummer.
    Personnummer,
    /// A samordningsnummer.
    Samordningsnummer,
    /// An e-mail address.
    Email,
    /// A phone number.
    Phone,
}

impl Found {
    /// The marker `redact` puts in place of the value.
    pub fn marker(self) -> &'static str {
        match self {
            Found::Personnummer => "[personnummer]",
            Found::Samordningsnummer => "[samordningsnummer]",
            Found::Email => "[e-post]",
            Found::Phone => "[telefon]",
        }
    }
}

fn luhn_ok(digits: &[u8; 10]) -> bool {
    let mut sum = 0u32;
    for (i, &d) in digits[..9].iter().enumerate() {
        let mut v = u32::from(d) * if i % 2 == 0 { 2 } else { 1 };
        if v > 9 {
            v -= 9;
        }
        sum += v;
    }
    (10 - sum % 10) % 10 == u32::from(digits[9])
}

/// The Luhn check digit for nine digits (used to make test data).
pub fn luhn_digit(nine: &[u8; 9]) -> u8 {
    let mut with = [0u8; 10];
    with[..9].copy_from_slice(nine);
    (0..10)
        .find(|&c| {
            with[9] = c;
            luhn_ok(&with)
        })
        .unwrap_or(0)
}

/// Classifies the ten significant digits (YYMMDDNNNC) with an optional century.
/// Without a century, the year is the latest one not in the future; `plus` (the
/// `+` separator) moves it a century back.
fn classify_digits(d: &[u8; 10], century: Option<u32>, plus: bool) -> Option<IdKind> {
    if !luhn_ok(d) {
        return None;
    }
    let two = |i: usize| u32::from(d[i]) * 10 + u32::from(d[i + 1]);
    let (yy, month, day) = (two(0), two(2), two(4));
    if month >= 20 {
        return Some(IdKind::Organisationsnummer);
    }
    let year = match century {
        Some(c) => c * 100 + yy,
        None => {
            static THIS_YEAR: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
            let this_year = *THIS_YEAR.get_or_init(|| chrono::Utc::now().year() as u32);
            let mut year = this_year / 100 * 100 + yy;
            if year > this_year {
                year -= 100;
            }
            if plus { year - 100 } else { year }
        }
    };
    let (kind, day) = if (61..=91).contains(&day) {
        (IdKind::Samordningsnummer, day - 60)
    } else {
        (IdKind::Personnummer, day)
    };
    NaiveDate::from_ymd_opt(year as i32, month, day).map(|_| kind)
}

fn digit(b: u8) -> Option<u8> {
    b.is_ascii_digit().then(|| b - b'0')
}

/// Matches an identity number at the start of `b`: returns its kind and length.
/// `b` must start with a digit; the caller checks the boundary before it.
fn match_id(b: &[u8]) -> Option<(IdKind, usize)> {
    let run = b.iter().take(13).take_while(|c| c.is_ascii_digit()).count();
    let boundary = |end: usize| b.get(end).is_none_or(|c| !c.is_ascii_alphanumeric());
    let ten = |s: &[u8]| -> Option<[u8; 10]> {
        let mut out = [0u8; 10];
        for (o, &c) in out.iter_mut().zip(s) {
            *o = digit(c)?;
        }
        Some(out)
    };
    let century = |s: &[u8]| u32::from(s[0] - b'0') * 10 + u32::from(s[1] - b'0');
    match run {
        12 if boundary(12) => {
            let c = century(b);
            let d = ten(&b[2..12])?;
            if c == 16 {
                return luhn_ok(&d).then_some((IdKind::Organisationsnummer, 12));
            }
            if !(18..=20).contains(&c) {
                return None;
            }
            classify_digits(&d, Some(c), false).map(|k| (k, 12))
        }
        10 if boundary(10) => classify_digits(&ten(&b[..10])?, None, false).map(|k| (k, 10)),
        8 | 6 if matches!(b.get(run), Some(b'-' | b'+')) && boundary(run + 5) => {
            let plus = b[run] == b'+';
            // A value may end within the four digits after the separator.
            let tail = b.get(run + 1..run + 5)?;
            if !tail.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let mut joined = [0u8; 10];
            let start = run - 6;
            joined[..6].copy_from_slice(&b[start..run]);
            joined[6..].copy_from_slice(tail);
            let d = ten(&joined)?;
            if run == 8 {
                let c = century(b);
                if c == 16 {
                    return luhn_ok(&d).then_some((IdKind::Organisationsnummer, 13));
                }
                if !(18..=20).contains(&c) {
                    return None;
                }
                classify_digits(&d, Some(c), false).map(|k| (k, 13))
            } else {
                classify_digits(&d, None, plus).map(|k| (k, 11))
            }
        }
        _ => None,
    }
}

/// Classifies a whole value (surrounding spaces ignored) as an identity number.
pub fn identity_number(value: &str) -> Option<IdKind> {
    let b = value.trim().as_bytes();
    if b.first().is_none_or(|c| !c.is_ascii_digit()) {
        return None;
    }
    match match_id(b) {
        Some((kind, len)) if len == b.len() => Some(kind),
        _ => None,
    }
}

/// Whether a whole value is a personnummer or samordningsnummer.
pub fn is_personal_identity_number(value: &str) -> bool {
    identity_number(value).is_some_and(IdKind::is_personal)
}

fn is_email_local(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'%' | b'+' | b'-') || c >= 0x80
}

fn is_email_domain(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-') || c >= 0x80
}

/// The e-mail address around the `@` at `at`, if there is one.
fn match_email(b: &[u8], at: usize) -> Option<Range<usize>> {
    let mut start = at;
    while start > 0 && is_email_local(b[start - 1]) {
        start -= 1;
    }
    while start < at && b[start] == b'.' {
        start += 1;
    }
    let mut end = at + 1;
    while end < b.len() && is_email_domain(b[end]) {
        end += 1;
    }
    while end > at + 1 && matches!(b[end - 1], b'.' | b'-') {
        end -= 1;
    }
    let domain = &b[at + 1..end];
    let dot = domain.iter().rposition(|&c| c == b'.')?;
    (start < at && dot > 0 && dot + 1 < domain.len()).then_some(start..end)
}

/// A Swedish phone number starting at `start` (`0` or `+46`), if there is one.
fn match_phone(b: &[u8], start: usize) -> Option<usize> {
    let (mut i, min, max) = if b[start..].starts_with(b"+46") {
        (start + 3, 7, 9)
    } else if b[start] == b'0' && b.get(start + 1).is_some_and(|c| (b'1'..=b'9').contains(c)) {
        (start, 8, 10)
    } else {
        return None;
    };
    let mut digits = 0;
    let mut end = i;
    while i < b.len() {
        match b[i] {
            c if c.is_ascii_digit() => {
                digits += 1;
                i += 1;
                end = i;
            }
            b' ' | b'-' if i + 1 < b.len() && b[i + 1].is_ascii_digit() && digits > 0 => i += 1,
            b' ' if start + 3 == i => i += 1, // "+46 70 ..."
            _ => break,
        }
    }
    let boundary = b.get(end).is_none_or(|c| !c.is_ascii_alphanumeric());
    ((min..=max).contains(&digits) && boundary).then_some(end)
}

/// Finds personal data in text, calling `found` with each match's kind and byte
/// range, in order and without overlaps.
pub fn scan(text: &str, mut found: impl FnMut(Found, Range<usize>)) {
    let b = text.as_bytes();
    // Nearly all free text has no digit and no `@`; skip it in one pass.
    if !b.iter().any(|&c| c.is_ascii_digit() || c == b'@') {
        return;
    }
    // Only a digit, `+` or `@` can start a finding: the bytes between them are
    // jumped over. That finds what stepping byte by byte finds: a start the
    // step-by-step scan would skip inside a word has an alphanumeric byte
    // before it, so it starts no finding, and the rest of the word is skipped
    // from it as before.
    let starts = |c: u8| c.is_ascii_digit() || c == b'+' || c == b'@';
    let mut i = 0;
    let mut emitted = 0;
    while i < b.len() {
        if starts(b[i]) {
            i = step(b, i, &mut emitted, &mut found);
        } else if let Some(next) = b[i..].iter().position(|&c| starts(c)) {
            i += next;
        } else {
            break;
        }
    }
}

/// Reports the finding that starts at byte `i`, if there is one, and returns
/// where the scan goes on: after the finding, else after the word or digit run
/// at `i` (so numbers inside numbers never match). `emitted` is the end of the
/// last finding reported.
fn step(
    b: &[u8],
    i: usize,
    emitted: &mut usize,
    found: &mut impl FnMut(Found, Range<usize>),
) -> usize {
    let c = b[i];
    let after_boundary = starts_word(b, i);
    if c.is_ascii_digit()
        && after_boundary
        && let Some((kind, len)) = match_id(&b[i..])
    {
        if kind.is_personal() {
            let f = if kind == IdKind::Samordningsnummer {
                Found::Samordningsnummer
            } else {
                Found::Personnummer
            };
            found(f, i..i + len);
            *emitted = i + len;
        }
        return i + len;
    }
    if (c == b'0' || c == b'+')
        && after_boundary
        && let Some(end) = match_phone(b, i)
    {
        found(Found::Phone, i..end);
        *emitted = end;
        return end;
    }
    if c == b'@'
        && let Some(range) = match_email(b, i)
        && range.start >= *emitted
    {
        *emitted = range.end;
        let end = range.end;
        found(Found::Email, range);
        return end;
    }
    if c.is_ascii_alphanumeric() {
        word_end(b, i)
    } else {
        i + 1
    }
}

/// Whether byte `i` begins a word: no letter or digit stands before it.
fn starts_word(b: &[u8], i: usize) -> bool {
    i == 0 || !b[i - 1].is_ascii_alphanumeric()
}

/// Where the run of ASCII letters and digits from `i` ends.
fn word_end(b: &[u8], i: usize) -> usize {
    i + b[i..]
        .iter()
        .take_while(|c| c.is_ascii_alphanumeric())
        .count()
}

/// Whether text holds a personnummer or samordningsnummer anywhere.
///
/// The egress guard runs this over every published text value, so it jumps
/// from digit to digit eight bytes at a time: an identity number starts with
/// a digit after a byte that is not a letter or digit, and digits inside a
/// word, or a number that is something else, are passed over whole. It finds
/// every identity number [`scan`] finds, and also one inside an e-mail
/// address's domain, which `scan` reports as the address.
pub fn contains_personal_identity_number(text: &str) -> bool {
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(start) = next_digit(b, i) {
        if starts_word(b, start)
            && let Some((kind, len)) = match_id(&b[start..])
        {
            if kind.is_personal() {
                return true;
            }
            i = start + len;
            continue;
        }
        i = word_end(b, start);
    }
    false
}

/// The first ASCII digit at or after `from`.
fn next_digit(b: &[u8], from: usize) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const LOW7: u64 = ONES * 0x7F;
    const HIGH: u64 = ONES * 0x80;
    let mut i = from;
    while let Some(chunk) = b[i..].first_chunk::<8>() {
        let x = u64::from_le_bytes(*chunk);
        // A byte's high bit is set where it lies in b'0'..=b'9' ("has between"
        // of Bit Twiddling Hacks, exact for each byte: no carry crosses bytes).
        let low = x & LOW7;
        let digits = (ONES * (127 + 0x3A) - low) & !x & (low + ONES * (127 - 0x2F)) & HIGH;
        if digits != 0 {
            return Some(i + digits.trailing_zeros() as usize / 8);
        }
        i += 8;
    }
    b.get(i..)?
        .iter()
        .position(u8::is_ascii_digit)
        .map(|p| i + p)
}

/// Replaces every finding with its marker. Returns `None` when nothing was found,
/// so callers can keep the original value without copying.
pub fn redact(text: &str) -> Option<String> {
    let mut out: Option<String> = None;
    let mut last = 0;
    scan(text, |f, range| {
        let o = out.get_or_insert_with(|| String::with_capacity(text.len()));
        o.push_str(&text[last..range.start]);
        o.push_str(f.marker());
        last = range.end;
    });
    out.map(|mut o| {
        o.push_str(&text[last..]);
        o
    })
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A valid personnummer (or samordningsnummer with `coordination`), `YYMMDD-NNNC`.
    pub fn make_id(year: u32, month: u32, day: u32, serial: u32, coordination: bool) -> String {
        let day = if coordination { day + 60 } else { day };
        let s = format!(
            "{:02}{:02}{:02}{:03}",
            year % 100,
            month,
            day,
            serial % 1000
        );
        let nine: Vec<u8> = s.bytes().map(|b| b - b'0').collect();
        let nine: [u8; 9] = nine.try_into().unwrap_or([0; 9]);
        format!("{}-{}{}", &s[..6], &s[6..], luhn_digit(&nine))
    }

    #[test]
    fn recognises_the_forms() {
        // A value that ends within the digits after the separator (this panicked).
        assert_eq!(identity_number("910220-045"), None);
        assert_eq!(redact("order 000046+467"), None);
        assert_eq!(identity_number("910220-0459"), Some(IdKind::Personnummer));
        assert_eq!(identity_number("9102200459"), Some(IdKind::Personnummer));
        assert_eq!(identity_number("19910220-0459"), Some(IdKind::Personnummer));
        assert_eq!(identity_number("199102200459"), Some(IdKind::Personnummer));
        assert_eq!(identity_number(" 910220+0459 "), Some(IdKind::Personnummer));
        assert_eq!(
            identity_number("660961-5197"),
            Some(IdKind::Samordningsnummer)
        );
        assert_eq!(
            identity_number("212000-0142"),
            Some(IdKind::Organisationsnummer)
        );
        assert_eq!(
            identity_number("16212000-0142"),
            Some(IdKind::Organisationsnummer)
        );
        // Wrong check digit, impossible date, too long, letters.
        assert_eq!(identity_number("910220-0458"), None);
        assert_eq!(identity_number(&make_id(91, 2, 30, 45, false)), None);
        assert_eq!(identity_number("910220-04591"), None);
        assert_eq!(identity_number("A910220-0459"), None);
        assert_eq!(identity_number("21910220-0459"), None);
    }

    #[test]
    fn leap_days_need_the_century() {
        let leap = make_id(0, 2, 29, 123, false);
        assert_eq!(
            identity_number(&format!("20{leap}")),
            Some(IdKind::Personnummer)
        );
        // 1900 was not a leap year.
        assert_eq!(identity_number(&format!("19{leap}")), None);
    }

    #[test]
    fn every_planted_identifier_is_found() {
        let truth: serde_json::Value =
            serde_json::from_str(include_str!("../../pipelines/data/truth.json"))
                .unwrap_or_default();
        for list in ["personnummer", "personnummer_in_text"] {
            for v in truth[list].as_array().into_iter().flatten() {
                let v = v.as_str().unwrap_or_default();
                assert_eq!(identity_number(v), Some(IdKind::Personnummer), "{v}");
                assert!(
                    contains_personal_identity_number(&format!("Avser {v}, jan")),
                    "{v}"
                );
            }
        }
        for v in truth["samordningsnummer"].as_array().into_iter().flatten() {
            assert_eq!(
                identity_number(v.as_str().unwrap_or_default()),
                Some(IdKind::Samordningsnummer)
            );
        }
        for v in truth["emails"].as_array().into_iter().flatten() {
            let v = v.as_str().unwrap_or_default();
            assert_eq!(
                redact(&format!("Kontakt: {v}.")),
                Some("Kontakt: [e-post].".to_string()),
                "{v}"
            );
        }
        for v in truth["phones"].as_array().into_iter().flatten() {
            let v = v.as_str().unwrap_or_default();
            assert_eq!(
                redact(&format!("ring {v} idag")),
                Some("ring [telefon] idag".to_string()),
                "{v}"
            );
        }
    }

    #[test]
    fn redacts_in_free_text() {
        assert_eq!(
            redact("Ersättning avser 990327-1485, jan"),
            Some("Ersättning avser [personnummer], jan".into())
        );
        assert_eq!(
            redact("mejla åsa.öberg@kommun.exempel.se!"),
            Some("mejla [e-post]!".into())
        );
        assert_eq!(
            redact("Ring 08-123 45 67 eller +46 70 857 01 37."),
            Some("Ring [telefon] eller [telefon].".into())
        );
        // Organisation numbers, dates, amounts and invoice numbers stay.
        for text in [
            "Org 212000-0142",
            "2025-01-27",
            "Belopp 2616,49 kr",
            "Faktura 9000001",
            "a@b",
            "Årsavgift 2025",
        ] {
            assert_eq!(redact(text), None, "{text}");
        }
        // Digits inside a longer number never match.
        assert_eq!(redact("ref 19102200459123"), None);
    }

    proptest! {
        #[test]
        fn generated_numbers_are_found_anywhere(
            year in 0u32..100, month in 1u32..=12, day in 1u32..=28, serial in 0u32..1000,
            coordination: bool, prefix in "[a-zåäö ,.:]{0,12}", suffix in "[a-zåäö ,.:]{0,12}"
        ) {
            let id = make_id(year, month, day, serial, coordination);
            let text = format!("{prefix} {id}{}{suffix}", if suffix.starts_with(|c: char| c.is_alphanumeric()) { " " } else { "" });
            let redacted = redact(&text).unwrap_or_default();
            prop_assert!(!redacted.contains(&id));
            prop_assert!(!redacted.contains(&id.replace('-', "")));
            let expected = if coordination { IdKind::Samordningsnummer } else { IdKind::Personnummer };
            prop_assert_eq!(identity_number(&id), Some(expected));
            prop_assert_eq!(identity_number(&id.replace('-', "")), Some(expected));
        }

        #[test]
        fn scan_never_panics(text in "\\PC{0,80}") {
            let _ = redact(&text);
        }

        /// The scan that jumps between possible starts finds exactly what a
        /// byte-by-byte scan finds, on text dense in digits and separators.
        #[test]
        fn jumping_finds_what_stepping_finds(
            text in DENSE,
        ) {
            let mut jumping = Vec::new();
            scan(&text, |f, r| jumping.push((f, r)));
            let mut stepping = Vec::new();
            stepping_scan(&text, |f, r| stepping.push((f, r)));
            prop_assert_eq!(jumping, stepping);
        }

        /// The guard's own scan finds every identity number the full scan
        /// finds, and, where no `@` makes part of the text an e-mail address,
        /// nothing else.
        #[test]
        fn the_guard_finds_what_the_scan_finds(text in DENSE) {
            let mut by_scan = false;
            scan(&text, |f, _| by_scan |= matches!(f, Found::Personnummer | Found::Samordningsnummer));
            let by_guard = contains_personal_identity_number(&text);
            prop_assert!(by_guard || !by_scan);
            if !text.contains('@') {
                prop_assert_eq!(by_guard, by_scan);
            }
        }

        /// Digits are found where they are, whatever bytes lie around them.
        #[test]
        fn next_digit_finds_the_first_digit(text in "\\PC{0,40}", from in 0usize..48) {
            let b = text.as_bytes();
            let from = from.min(b.len());
            let expected = b[from..].iter().position(u8::is_ascii_digit).map(|p| from + p);
            prop_assert_eq!(next_digit(b, from), expected);
        }
    }

    /// Text dense in digits, separators, words, phone numbers and addresses.
    const DENSE: &str = "([0-9]{1,13}|[-+@. ,åa-c]|46|19|20|0[1-9]|[a-z]{1,3}@[a-z]{1,3}\\.se|[a-zö]{1,4}|\\+46 ?7){0,16}";

    #[test]
    fn the_guard_looks_inside_addresses() {
        let id = make_id(90, 1, 1, 123, false).replace('-', "");
        assert!(contains_personal_identity_number(&format!(
            "Skicka till ö@{id}.se"
        )));
        assert!(contains_personal_identity_number(&format!(
            "{id}@exempel.se"
        )));
        assert!(!contains_personal_identity_number(
            "Leverantör AB 123, order 1234567"
        ));
        assert!(!contains_personal_identity_number("Org 212000-0142"));
        // A valid number counts only where a word starts, not inside one.
        let valid = make_id(85, 7, 14, 456, false);
        assert!(contains_personal_identity_number(&format!("ref {valid}")));
        assert!(!contains_personal_identity_number(&format!("ref{valid}")));
        assert!(contains_personal_identity_number(&format!(
            "Åäö: {}",
            make_id(90, 1, 1, 123, true)
        )));
    }

    /// The byte-by-byte scan the jumping one replaced: the reference. Both
    /// take the same step at a position; they differ only in the positions.
    fn stepping_scan(text: &str, mut found: impl FnMut(Found, Range<usize>)) {
        let b = text.as_bytes();
        if !b.iter().any(|&c| c.is_ascii_digit() || c == b'@') {
            return;
        }
        let (mut i, mut emitted) = (0, 0);
        while i < b.len() {
            i = step(b, i, &mut emitted, &mut found);
        }
    }
}
