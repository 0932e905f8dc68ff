-- The compose demo's repository records: DEMO_REPOSITORIES repositories of
-- the virtual storage "default", each held by gitaly-1 at generation 0, as
-- Praefect would have recorded them after the first push. Safe to run again.
-- Run by the demo-seed service once the replicator has applied its
-- migrations (psql -v repositories=N).
INSERT INTO repositories (virtual_storage, relative_path, generation, "primary")
SELECT 'default', format('demo/repo-%s.git', n), 0, 'gitaly-1'
FROM generate_series(1, :repositories) AS n
ON CONFLICT (virtual_storage, relative_path) DO NOTHING;

INSERT INTO storage_repositories (repository_id, virtual_storage, relative_path, storage, generation)
SELECT repository_id, virtual_storage, relative_path, 'gitaly-1', 0
FROM repositories
WHERE virtual_storage = 'default' AND relative_path LIKE 'demo/repo-%.git'
ON CONFLICT DO NOTHING;
