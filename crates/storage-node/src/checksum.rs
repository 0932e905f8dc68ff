//! CalculateChecksum, built as Gitaly builds it: the SHA-1 of each
//! `<object id> <ref name>` line, XORed together, as 40 hex digits; HEAD
//! counts when it resolves. Gitaly counts only some ref namespaces (heads,
//! tags, keep-around, …); this node counts every ref, so equal checksums on
//! two of its replicas mean equal refs. A repository without refs sums to
//! forty zeros.

use crate::storage::RepoPath;
use sha1::{Digest, Sha1};
use tonic::Status;

/// The refs checksum of an existing repository.
pub async fn checksum(repo: &RepoPath) -> Result<String, Status> {
    let git = repo.git();
    let refs = git
        .run(["for-each-ref", "--format=%(objectname) %(refname)"])
        .await?
        .stdout_text();
    let head = git
        .output(["rev-parse", "--verify", "--quiet", "HEAD"])
        .await?;
    let head = head
        .status
        .success()
        .then(|| format!("{} HEAD", head.stdout_text().trim()));
    Ok(xor_of_lines(
        head.iter().map(String::as_str).chain(refs.lines()),
    ))
}

/// XOR of the SHA-1 of each non-empty line, in hex.
pub fn xor_of_lines<'a>(lines: impl Iterator<Item = &'a str>) -> String {
    let mut sum = [0u8; 20];
    for line in lines.filter(|l| !l.is_empty()) {
        let digest = Sha1::digest(line.as_bytes());
        for (s, d) in sum.iter_mut().zip(digest.iter()) {
            *s ^= d;
        }
    }
    hex::encode(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_is_order_free_and_zero_when_empty() {
        assert_eq!(xor_of_lines(std::iter::empty()), "0".repeat(40));
        let a = xor_of_lines(["x refs/heads/a", "y refs/heads/b"].into_iter());
        let b = xor_of_lines(["y refs/heads/b", "x refs/heads/a"].into_iter());
        assert_eq!(a, b);
        // SHA-1("abc") alone is the checksum of a single line.
        assert_eq!(
            xor_of_lines(["abc"].into_iter()),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
    }
}
