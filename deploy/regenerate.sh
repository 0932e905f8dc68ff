#!/bin/sh
# Regenerates the files under deploy/ that follow a configuration, so they
# never drift from it (tests/it/deploy.rs fails when one is stale):
#   nats/jetstream/        from config.example.toml  (deploy-manifests --nats)
#   kubernetes/scaledobject.yaml  from kubernetes/config.toml (deploy-manifests)
# (kustomize makes the ConfigMap from kubernetes/config.toml itself.)
#
# GITALY_REPLICATOR names the binary, e.g.
#   GITALY_REPLICATOR="cargo run --quiet --" deploy/regenerate.sh
set -eu
cd "$(dirname "$0")/.."
bin=${GITALY_REPLICATOR:-gitaly-replicator}

# shellcheck disable=SC2086 # $bin may be a command with arguments
$bin --config config.example.toml deploy-manifests --nats --output deploy/nats/jetstream
# shellcheck disable=SC2086
$bin --config deploy/kubernetes/config.toml deploy-manifests --output deploy/kubernetes

