//! The receiving side of streamed snapshots: how much of a file is here, and the
//! chunks that continue it. See the parent module for the whole flow.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use meta_proto::v1 as pb;
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use tokio::io::AsyncWriteExt;
use tonic::{Status, Streaming};

use super::{FileRef, SYNC_EVERY, SnapshotFiles, file_crc};

impl SnapshotFiles {
    /// The partial file of the snapshot `(index, term)` from member `from`.
    fn part(&self, from: u64, term: u64, index: u64) -> PathBuf {
        self.dir
            .join("incoming")
            .join(format!("{from}-{term}-{index}.part"))
    }

    /// How many bytes of the snapshot file `request` names are here. Files of other
    /// snapshots from the same sender are dropped: it has moved on.
    pub async fn offset(&self, request: &pb::SnapshotOffsetRequest) -> Result<u64, Status> {
        let _receiving = self.receiving.lock().await;
        let part = self.part(request.from, request.term, request.index);
        let have = tokio::fs::metadata(&part).await.map_or(0, |m| m.len());
        if have > 0 && have <= request.size {
            return Ok(have);
        }
        // Partial files of other snapshots from this sender: it has moved on. Whole
        // ones (`.snap`) may be waiting for raft to install them: not touched.
        let prefix = format!("{}-", request.from);
        if let Ok(mut dir) = tokio::fs::read_dir(self.dir.join("incoming")).await {
            while let Ok(Some(entry)) = dir.next_entry().await {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with(&prefix) && name.ends_with(".part") {
                    let _ = tokio::fs::remove_file(entry.path()).await;
                }
            }
        }
        Ok(0)
    }

    /// Receives chunks that continue a snapshot file. Once the file is whole and its
    /// size and CRC match, answers the raft message to step, its data referring to the
    /// file. A stream that ends early leaves the part received for a resumed one.
    pub async fn receive(
        &self,
        check_cluster: impl Fn(u64, u64) -> Result<(), Status>,
        me: u64,
        mut stream: Streaming<pb::SnapshotChunk>,
    ) -> Result<Message, Status> {
        let _receiving = self.receiving.lock().await;
        let Some(first) = stream.message().await? else {
            return Err(Status::invalid_argument("an empty snapshot stream"));
        };
        check_cluster(first.cluster_id, first.from)?;
        let mut message = Message::parse_from_bytes(&first.message)
            .map_err(|e| Status::invalid_argument(format!("undecodable snapshot message: {e}")))?;
        if message.get_msg_type() != MessageType::MsgSnapshot || message.to != me {
            return Err(Status::invalid_argument(format!(
                "not a snapshot for member {me}"
            )));
        }
        let metadata = message.get_snapshot().get_metadata();
        let part = self.part(first.from, metadata.term, metadata.index);
        let have = tokio::fs::metadata(&part).await.map_or(0, |m| m.len());
        if first.offset != have {
            return Err(Status::failed_precondition(format!(
                "the stream starts at byte {} but {have} bytes of the snapshot are here",
                first.offset
            )));
        }
        if have > 0 {
            self.resumed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                from = first.from,
                index = metadata.index,
                offset = have,
                size = first.size,
                "resuming a snapshot stream"
            );
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part)
            .await
            .map_err(|e| Status::internal(format!("opening {}: {e}", part.display())))?;
        let mut len = have;
        let mut unsynced = 0u64;
        let mut chunk = Some(first.data);
        while len < first.size {
            let data = match chunk.take() {
                Some(data) => data,
                None => match stream.message().await? {
                    Some(next) => next.data,
                    None => break,
                },
            };
            if len + data.len() as u64 > first.size {
                drop(file);
                let _ = tokio::fs::remove_file(&part).await;
                return Err(Status::invalid_argument(format!(
                    "the snapshot is longer than the {} bytes announced",
                    first.size
                )));
            }
            file.write_all(&data)
                .await
                .map_err(|e| Status::internal(format!("writing {}: {e}", part.display())))?;
            len += data.len() as u64;
            unsynced += data.len() as u64;
            if unsynced >= SYNC_EVERY {
                // Bounds the dirty pages the raft log's filesystem sync meets.
                file.sync_data()
                    .await
                    .map_err(|e| Status::internal(format!("writing {}: {e}", part.display())))?;
                unsynced = 0;
            }
            self.received
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        file.flush()
            .await
            .map_err(|e| Status::internal(format!("writing {}: {e}", part.display())))?;
        drop(file);
        if len < first.size {
            return Err(Status::aborted(format!(
                "the snapshot stream ended at byte {len} of {}; it resumes there",
                first.size
            )));
        }
        let checked = part.clone();
        let crc = tokio::task::spawn_blocking(move || file_crc(&checked))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("reading {}: {e}", part.display())))?;
        if crc != first.crc32 {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(Status::data_loss(format!(
                "the snapshot's CRC-32 is {crc:08x}, not {:08x}; it is sent again",
                first.crc32
            )));
        }
        let whole = part.with_extension("snap");
        tokio::fs::rename(&part, &whole)
            .await
            .map_err(|e| Status::internal(format!("renaming {}: {e}", part.display())))?;
        let file = FileRef {
            path: whole,
            size: len,
            crc32: crc,
        };
        message.mut_snapshot().data = file.encode().into();
        Ok(message)
    }

    /// Snapshot bytes received over every stream so far.
    pub fn received_bytes(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Streams that resumed a file received in part before.
    pub fn resumed_streams(&self) -> u64 {
        self.resumed.load(Ordering::Relaxed)
    }
}
