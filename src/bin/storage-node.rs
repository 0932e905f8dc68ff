//! `storage-node`: a git-backed Gitaly-protocol node (work in progress).
fn main() {}
