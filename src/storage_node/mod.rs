//! A small git-backed storage node that speaks Gitaly's protocol (work in progress).
