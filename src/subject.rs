//! Subject naming: `<prefix>.<virtual_storage>.<target_storage>`, with each
//! storage name escaped into one NATS token.
//!
//! Storage names are free text, but a NATS subject token cannot hold `.`, `*`,
//! `>` or whitespace. Every byte outside `[A-Za-z0-9_-]` becomes `%XX`
//! (upper-case hex), which is reversible and keeps common names readable.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

/// The bytes [`escape_token`] escapes: all but `A-Z a-z 0-9 _ -` (bytes
/// outside ASCII are always escaped by percent-encoding).
const ESCAPED: &AsciiSet = &NON_ALPHANUMERIC.remove(b'_').remove(b'-');

/// The bytes left as they are, the complement of [`ESCAPED`] (whose own
/// membership test is private to percent-encoding).
fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Escapes one storage name into a subject token.
pub fn escape_token(name: &str) -> String {
    // percent-encoding writes upper-case hex, as tokens always had.
    utf8_percent_encode(name, ESCAPED).to_string()
}

/// Why a subject token could not be unescaped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error("subject token {0:?} has a malformed %XX escape")]
    BadEscape(String),
    #[error("subject token {0:?} does not decode to UTF-8")]
    NotUtf8(String),
    #[error("subject {subject:?} is not under prefix {prefix:?} with two storage tokens")]
    WrongShape { subject: String, prefix: String },
}

/// Reverses [`escape_token`].
pub fn unescape_token(token: &str) -> Result<String, SubjectError> {
    // percent-encoding's decoder passes a stray `%`, lower-case hex and
    // bytes that should have been escaped through; none of them is a token
    // that escape_token could have written.
    if !is_well_formed(token) {
        return Err(SubjectError::BadEscape(token.to_owned()));
    }
    percent_decode_str(token)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| SubjectError::NotUtf8(token.to_owned()))
}

/// Only plain bytes and `%XX` with upper-case hex digits.
fn is_well_formed(token: &str) -> bool {
    let upper_hex =
        |b: Option<u8>| b.is_some_and(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b));
    let mut bytes = token.bytes();
    while let Some(b) = bytes.next() {
        let ok = if b == b'%' {
            upper_hex(bytes.next()) && upper_hex(bytes.next())
        } else {
            is_plain(b)
        };
        if !ok {
            return false;
        }
    }
    true
}

/// The subject jobs for one target are published on.
pub fn job_subject(prefix: &str, virtual_storage: &str, target_storage: &str) -> String {
    format!(
        "{prefix}.{}.{}",
        escape_token(virtual_storage),
        escape_token(target_storage)
    )
}

/// The dead-letter stream's subject prefix: `<prefix>-dead`.
pub fn dead_letter_prefix(prefix: &str) -> String {
    format!("{prefix}-dead")
}

/// Splits a job subject back into (virtual storage, target storage).
pub fn parse_job_subject(prefix: &str, subject: &str) -> Result<(String, String), SubjectError> {
    let wrong = || SubjectError::WrongShape {
        subject: subject.to_owned(),
        prefix: prefix.to_owned(),
    };
    let rest = subject
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('.'))
        .ok_or_else(wrong)?;
    let (vs, target) = rest.split_once('.').ok_or_else(wrong)?;
    if target.contains('.') || vs.is_empty() || target.is_empty() {
        return Err(wrong());
    }
    Ok((unescape_token(vs)?, unescape_token(target)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn awkward_storage_names_round_trip() {
        for name in [
            "gitaly-1",
            "default",
            "a.b.c",
            "*",
            ">",
            "with space",
            "tab\there",
            "ünïcødé-存储",
            "100%",
            "%41",
            "",
            "a/b\\c",
        ] {
            let token = escape_token(name);
            assert!(
                token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'%'),
                "{token:?} is not a safe token"
            );
            assert_eq!(unescape_token(&token).unwrap(), name);
        }
    }

    #[test]
    fn subjects_parse_back_into_their_storages() {
        let s = job_subject("gitaly.replication", "vs.one", "gitaly *2>");
        assert_eq!(s, "gitaly.replication.vs%2Eone.gitaly%20%2A2%3E");
        assert_eq!(
            parse_job_subject("gitaly.replication", &s).unwrap(),
            ("vs.one".to_owned(), "gitaly *2>".to_owned())
        );
        assert!(parse_job_subject("gitaly.replication", "gitaly.replication.only").is_err());
        assert!(parse_job_subject("other", &s).is_err());
        assert!(unescape_token("%4").is_err());
        assert!(unescape_token("%zz").is_err());
        assert!(
            unescape_token("%ff").is_err(),
            "lower-case hex is not our encoding"
        );
        assert!(unescape_token("%FF").is_err(), "a lone 0xFF is not UTF-8");
    }

    #[test]
    fn the_plain_bytes_are_exactly_those_the_escaped_set_leaves_alone() {
        for b in 0..=0x7f_u8 {
            let name = char::from(b).to_string();
            let kept = escape_token(&name) == name;
            assert_eq!(kept, is_plain(b), "byte {b:#04x}");
            if !kept {
                assert_eq!(escape_token(&name), format!("%{b:02X}"));
            }
        }
    }
}
