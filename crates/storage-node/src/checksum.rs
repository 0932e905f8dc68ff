//! CalculateChecksum, built as Gitaly builds it: run `git show-ref --head`,
//! keep the `<object id> <ref name>` lines that mention `HEAD` or one of the
//! namespaces Gitaly counts (heads, tags, keep-around, merge-requests,
//! environments, notes) anywhere in the line, SHA-1 each, and XOR the
//! digests as big integers. The answer is the hex of that integer's bytes,
//! leading zero bytes dropped as Go's `big.Int.Bytes()` drops them. With
//! nothing counted (or when `show-ref` fails) a valid repository sums to
//! forty zeros and anything else is `DATA_LOSS`; replicas compared by
//! checksum then agree with what real Gitaly would answer for them.

use crate::storage::RepoPath;
use sha1::{Digest, Sha1};
use tonic::Status;

/// The checksum when no ref counts.
pub const ZERO_CHECKSUM: &str = "0000000000000000000000000000000000000000";

/// Substrings of a `show-ref` line that make it count: Gitaly's unanchored
/// `HEAD|(refs/(heads|tags|keep-around|merge-requests|environments|notes)/)`.
const COUNTED: [&str; 7] = [
    "HEAD",
    "refs/heads/",
    "refs/tags/",
    "refs/keep-around/",
    "refs/merge-requests/",
    "refs/environments/",
    "refs/notes/",
];

/// The refs checksum of an existing repository.
pub async fn checksum(repo: &RepoPath) -> Result<String, Status> {
    let git = repo.git();
    let show = git.output(["show-ref", "--head"]).await?;
    let sum = xor_of_lines(show.stdout.split(|&b| b == b'\n'));
    if show.status.success() && sum.iter().any(|&b| b != 0) {
        return Ok(hex_without_leading_zeros(&sum));
    }
    // No ref counted, or git could not list them: only a repository git
    // recognises answers zeros, as Gitaly's `isValidRepo` decides.
    let bare = git.output(["rev-parse", "--is-bare-repository"]).await?;
    if bare.status.success()
        && bare
            .stdout_text()
            .trim_end_matches('\n')
            .eq_ignore_ascii_case("true")
    {
        Ok(ZERO_CHECKSUM.to_owned())
    } else {
        Err(Status::data_loss(format!(
            "not a git repository '{}'",
            repo.path.display()
        )))
    }
}

/// Whether a `show-ref` line is one Gitaly counts.
pub fn counts(line: &[u8]) -> bool {
    COUNTED
        .iter()
        .any(|needle| line.windows(needle.len()).any(|w| w == needle.as_bytes()))
}

/// XOR of the SHA-1 of each counted line, as 20 big-endian bytes. A final
/// `\r` is dropped as Go's line scanner drops it.
pub fn xor_of_lines<'a>(lines: impl Iterator<Item = &'a [u8]>) -> [u8; 20] {
    let mut sum = [0u8; 20];
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if !counts(line) {
            continue;
        }
        let digest = Sha1::digest(line);
        for (s, d) in sum.iter_mut().zip(digest.iter()) {
            *s ^= d;
        }
    }
    sum
}

/// Hex of a big-endian integer without its leading zero bytes, as Gitaly
/// encodes a nonzero checksum (so it may be shorter than 40 digits).
pub fn hex_without_leading_zeros(sum: &[u8]) -> String {
    let first = sum.iter().position(|&b| b != 0).unwrap_or(sum.len());
    hex::encode(&sum[first..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum_of(lines: &[&str]) -> [u8; 20] {
        xor_of_lines(lines.iter().map(|l| l.as_bytes()))
    }

    #[test]
    fn checksum_is_order_free_and_counts_only_gitalys_namespaces() {
        assert_eq!(sum_of(&[]), [0; 20]);
        let a = sum_of(&["x refs/heads/a", "y refs/tags/b"]);
        let b = sum_of(&["y refs/tags/b", "x refs/heads/a"]);
        assert_eq!(a, b);
        // SHA-1("x HEAD") alone is the checksum of a single counted line.
        let head = Sha1::digest(b"x HEAD");
        assert_eq!(sum_of(&["x HEAD"]).as_slice(), head.as_slice());
        assert_eq!(
            sum_of(&["x HEAD", "y refs/pipelines/1", "z refs/remotes/o/main"]),
            sum_of(&["x HEAD"])
        );
        // Unanchored: HEAD or a namespace anywhere in the line counts.
        assert!(counts(b"x refs/remotes/origin/HEAD"));
        assert!(counts(b"x refs/pipelines/refs/heads/a"));
        assert!(!counts(b"x refs/headsx/a"));
        assert!(!counts(b"x refs/merge-request/1/head"));
    }

    #[test]
    fn leading_zero_bytes_are_dropped_like_big_int_bytes() {
        assert_eq!(hex_without_leading_zeros(&[0, 0, 0x0a, 0xbc]), "0abc");
        assert_eq!(hex_without_leading_zeros(&[0; 20]), "");
        // Two counted lines whose digests share their first byte XOR to a
        // checksum shorter than 40 digits.
        let digest = |i: usize| Sha1::digest(format!("{i} refs/heads/b").as_bytes());
        let first = digest(0)[0];
        let twin = (1..).find(|&i| digest(i)[0] == first).unwrap_or(0);
        let line0 = "0 refs/heads/b".to_owned();
        let line1 = format!("{twin} refs/heads/b");
        let sum = sum_of(&[&line0, &line1]);
        assert_eq!(sum[0], 0);
        assert!(hex_without_leading_zeros(&sum).len() < 40);
    }
}
