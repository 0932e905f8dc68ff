#!/bin/bash
# The compose demo's publisher, run once by the demo-jobs service: creates
# DEMO_REPOSITORIES git repositories on gitaly-1 (whose volume is mounted at
# /var/opt/gitaly) and publishes an `update` job per repository for gitaly-2
# and gitaly-3. The replicator then copies them; `docker compose run --rm
# demo-jobs` publishes another round (already replicated repositories are
# skipped as up to date).
set -euo pipefail

storage=/var/opt/gitaly/gitaly-1
count=${DEMO_REPOSITORIES:-20}

for i in $(seq 1 "$count"); do
  repo="$storage/demo/repo-$i.git"
  if [ ! -d "$repo" ]; then
    work=$(mktemp -d)
    git init --quiet --initial-branch=main "$work"
    for change in 1 2 3; do
      echo "change $change of demo repository $i" >"$work/README"
      git -C "$work" add README
      git -C "$work" -c user.name=demo -c user.email=demo@example.com \
        commit --quiet -m "change $change"
    done
    git clone --quiet --bare "$work" "$repo"
    rm -rf "$work"
    echo "created $repo" >&2
  fi
done

for i in $(seq 1 "$count"); do
  for target in gitaly-2 gitaly-3; do
    printf '{"change":"update","virtual_storage":"default","relative_path":"demo/repo-%s.git","source_node_storage":"gitaly-1","target_node_storage":"%s"}\n' \
      "$i" "$target"
  done
done | gitaly-replicator publish --stdin
