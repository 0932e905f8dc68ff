//! A hash that every process and build computes alike, for names and keys
//! that several processes must agree on (std's hasher is randomly seeded).

use fnv::FnvHasher;
use std::hash::Hasher;

/// 64-bit FNV-1a over `fields`, each preceded by its length (8 bytes, little
/// endian), so that no two lists of fields run together: `["a_b", "c"]` and
/// `["a", "b_c"]` hash differently.
pub fn fnv1a_64(fields: &[&str]) -> u64 {
    // `Hasher::write` with the raw bytes, not `Hash::hash`: the latter adds
    // prefixes and terminators of its own, and the values are pinned.
    let mut hasher = FnvHasher::default();
    for field in fields {
        hasher.write(&(field.len() as u64).to_le_bytes());
        hasher.write(field.as_bytes());
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_pinned_and_keeps_fields_apart() {
        // Pinned: lock keys and consumer names of running deployments depend on it.
        assert_eq!(
            fnv1a_64(&["default", "r.git", "gitaly-2"]),
            17_033_532_887_757_388_469
        );
        assert_ne!(fnv1a_64(&["a_b", "c"]), fnv1a_64(&["a", "b_c"]));
        assert_ne!(fnv1a_64(&["ab", ""]), fnv1a_64(&["a", "b"]));
        assert_ne!(fnv1a_64(&[""]), fnv1a_64(&[]));
    }
}
