//! JetStream object names: which characters they may hold, and how consumer
//! names are made from storage names.
//!
//! Storage names are free text, but a JetStream name is more than a label:
//! nats-server uses it as a directory name, puts it in API and advisory
//! subjects, and (2.9) formats a consumer's name into the ack reply subject of
//! every message, so a `%` in it turns into `%!E(uint64= 1)`, whose space
//! breaks the client's protocol parser. Names therefore use only
//! `A-Z a-z 0-9 - _`, and a consumer name is not the (reversible) subject
//! escaping of its storages but a readable, lossy form of them made unique by
//! a stable hash of the exact pair.

use crate::stable_hash::fnv1a_64;

/// Longest stream name and consumer prefix accepted. With it the longest
/// consumer name is 64 + 1 + 2 × (32 + 1) + 16 = 147 characters, and the
/// longest file name `deploy-manifests` writes,
/// `consumer.<STREAM>_ADVISORIES.<NAME>.json`, 237: under the 255 bytes a
/// file name may have, as nats-server's directories of streams and consumers.
pub const MAX_NAME_LEN: usize = 64;

/// How much of each storage name a consumer name shows; the hash, not this
/// part, keeps names apart.
const READABLE_LEN: usize = 32;

/// Whether `name` may be a stream name or a consumer prefix: non-empty, at
/// most [`MAX_NAME_LEN`] characters of `A-Z a-z 0-9 - _`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME_LEN && name.bytes().all(is_name_byte)
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// A storage name cut to [`READABLE_LEN`] characters, each one outside the
/// allowed set replaced by `_`: `gitaly.3` becomes `gitaly_3`.
fn readable(storage: &str) -> String {
    storage
        .chars()
        .take(READABLE_LEN)
        .map(|c| {
            if c.is_ascii() && is_name_byte(c as u8) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The durable consumer of a target:
/// `<consumer_prefix>_<vs>_<target>_<hash>`, where `<vs>` and `<target>` are
/// [`readable`] forms and `<hash>` is 16 hex digits of the stable hash of the
/// exact (virtual storage, target) pair. The prefix is left out of the hash:
/// it stands in the name as it is.
pub fn durable_name(consumer_prefix: &str, virtual_storage: &str, target: &str) -> String {
    format!(
        "{consumer_prefix}_{}_{}_{:016x}",
        readable(virtual_storage),
        readable(target),
        fnv1a_64(&[virtual_storage, target])
    )
}

/// The consumer of the advisory stream.
pub fn advisory_consumer_name(consumer_prefix: &str) -> String {
    format!("{consumer_prefix}_advisories")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(name: &str) -> bool {
        name.bytes().all(is_name_byte)
    }

    #[test]
    fn consumer_names_use_only_allowed_characters() {
        let long = "x.".repeat(500);
        let names = [
            "gitaly.3",
            "*",
            ">",
            "a.*.>",
            "with space",
            "tab\there",
            "node~1",
            "a%41",
            "100%",
            "störage",
            "ünïcødé-存储",
            "🦀",
            "a/b\\c",
            long.as_str(),
        ];
        for vs in ["default", "vs.one", "存储"] {
            for target in names {
                let name = durable_name("gitaly-replicator", vs, target);
                assert!(allowed(&name), "{vs:?}/{target:?} gives {name:?}");
                assert!(name.len() <= MAX_NAME_LEN + 1 + 2 * (READABLE_LEN + 1) + 16);
            }
        }
        assert!(allowed(&advisory_consumer_name("gitaly-replicator")));
    }

    #[test]
    fn distinct_pairs_give_distinct_names() {
        let long = "a".repeat(100);
        let longer = format!("{long}b");
        let pairs = [
            ("a_b", "c"),
            ("a", "b_c"),
            ("a.b", "c"),
            ("a", "b.c"),
            ("a-b", "c"),
            ("a", "b-c"),
            ("gitaly.3", "x"),
            ("gitaly_3", "x"),
            ("gitaly%2E3", "x"),
            ("x", "störage"),
            ("x", "stürage"),
            ("x", "st_rage"),
            ("x", long.as_str()),
            ("x", longer.as_str()),
            ("ab", ""),
            ("a", "b"),
        ];
        let mut seen = std::collections::HashMap::new();
        for (vs, target) in pairs {
            let name = durable_name("p", vs, target);
            if let Some(other) = seen.insert(name.clone(), (vs, target)) {
                panic!("{other:?} and {:?} share {name}", (vs, target));
            }
        }
    }

    #[test]
    fn names_are_readable_and_stable() {
        // Pinned: a changed value would move every deployed consumer.
        assert_eq!(
            durable_name("gitaly-replicator", "default", "gitaly-1"),
            "gitaly-replicator_default_gitaly-1_531f8eaaca031df1"
        );
        assert_eq!(
            durable_name("p", "vs", "gitaly.3"),
            "p_vs_gitaly_3_fd49e0ab7ffb2f67"
        );
        assert_eq!(
            advisory_consumer_name("gitaly-replicator"),
            "gitaly-replicator_advisories"
        );
    }

    #[test]
    fn prefixes_and_stream_names_are_checked() {
        assert!(is_valid_name("GITALY_REPLICATION"));
        assert!(is_valid_name("gitaly-replicator"));
        assert!(is_valid_name(&"a".repeat(MAX_NAME_LEN)));
        for bad in ["", "a~b", "a%41", "a.b", "a b", "ä", "a*", "a>"] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
        assert!(!is_valid_name(&"a".repeat(MAX_NAME_LEN + 1)));
    }
}
