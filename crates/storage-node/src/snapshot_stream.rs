//! GetSnapshot, the source side of replication: the snapshot is written to
//! an unlinked scratch file while the repository is locked, then streamed in
//! chunks, so a slow reader never holds the lock.

use crate::locks::RepoGuard;
use crate::snapshot::write_snapshot;
use crate::storage::{RepoPath, io_status};
use gitaly_wire::proto::gitaly::GetSnapshotResponse;
use std::io::{BufWriter, Seek, SeekFrom};
use std::pin::Pin;
use tokio::io::AsyncReadExt;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

/// Bytes per `GetSnapshotResponse`.
pub const CHUNK: usize = 128 * 1024;

/// The response stream of GetSnapshot.
pub type SnapshotStream = Pin<Box<dyn Stream<Item = Result<GetSnapshotResponse, Status>> + Send>>;

/// Snapshots the locked, existing repository and returns the chunk stream.
pub async fn snapshot(repo: RepoPath, guard: RepoGuard) -> Result<SnapshotStream, Status> {
    let file = tokio::task::spawn_blocking(move || {
        let _guard = guard;
        let path = repo
            .storage
            .tmp
            .join(format!("snapshot-{}.tar", uuid::Uuid::new_v4()));
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io_status("creating the snapshot file", e))?;
        // Unlinked at once: the open handle is all that keeps it.
        let _ = std::fs::remove_file(&path);
        let mut file = write_snapshot(&repo.path, BufWriter::new(file))
            .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
            .map_err(|e| io_status("writing the snapshot", e))?;
        file.seek(SeekFrom::Start(0))
            .map_err(|e| io_status("rewinding the snapshot", e))?;
        Ok::<_, Status>(file)
    })
    .await
    .map_err(|e| Status::internal(format!("snapshot task failed: {e}")))??;

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let mut file = tokio::fs::File::from_std(file);
        loop {
            let mut data = vec![0; CHUNK];
            let item = match file.read(&mut data).await {
                Ok(0) => break,
                Ok(n) => {
                    data.truncate(n);
                    Ok(GetSnapshotResponse { data })
                }
                Err(e) => Err(io_status("reading the snapshot", e)),
            };
            let failed = item.is_err();
            // The reader went away: stop.
            if tx.send(item).await.is_err() || failed {
                break;
            }
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}
