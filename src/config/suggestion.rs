//! "Did you mean …?": the nearest known name to a misspelt key or variable.

/// The candidate nearest to `word`, if it is close enough to be a likely typo
/// (at most 3 edits, and fewer edits than `word` has characters).
pub(super) fn suggest<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, _)| *d <= 3 && *d < word.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance, in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = Vec::with_capacity(b.len() + 1);
        cur.push(i + 1);
        for (j, cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != *cb);
            cur.push(substitute.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nearest_close_candidate_is_suggested() {
        let keys = ["batch_size", "attempts", "retry_delay"];
        for (word, expected) in [
            ("bach_size", Some("batch_size")),
            ("batchsize", Some("batch_size")),
            ("atempts", Some("attempts")),
            ("retry", None),
            ("ab", None),
            ("", None),
        ] {
            assert_eq!(suggest(word, keys), expected, "{word:?}");
        }
    }

    #[test]
    fn edit_distance_counts_characters_not_bytes() {
        assert_eq!(edit_distance("störage", "storage"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
