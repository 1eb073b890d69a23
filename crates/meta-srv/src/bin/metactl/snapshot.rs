//! `metactl snapshot save FILE`: a backup of one member's store (etcd's
//! `Maintenance.Snapshot` stream: consistent at one revision, checksummed), written to
//! `FILE.part`, checked whole, then renamed to FILE. `meta-srv restore --from FILE`
//! starts a new cluster from it.

use std::io::Write;
use std::path::{Path, PathBuf};

use meta_client::MetaClient;
use meta_proto::etcd::etcdserverpb as epb;
use meta_proto::etcd::etcdserverpb::maintenance_client::MaintenanceClient;
use serde_json::json;

use super::{Failure, Output, print};

fn failed(what: &str, e: impl std::fmt::Display) -> Failure {
    Failure(format!("error: {what}: {e}"))
}

/// Saves a backup taken by the first of `endpoints` that answers into `file`.
pub async fn save(
    client: &MetaClient,
    endpoints: &[String],
    file: &Path,
    output: Output,
) -> Result<(), Failure> {
    let mut part = file.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    let mut last = None;
    for endpoint in endpoints {
        match fetch(client, endpoint, &part).await {
            Ok(()) => {
                last = None;
                break;
            }
            Err(e) => {
                let _ = std::fs::remove_file(&part);
                last = Some(e);
            }
        }
    }
    if let Some(e) = last {
        return Err(e);
    }
    let backup = match meta_srv::backup::verify(&part) {
        Ok(backup) => backup,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(failed("the snapshot received is not whole", e));
        }
    };
    std::fs::rename(&part, file)
        .map_err(|e| failed(&format!("renaming to {}", file.display()), e))?;
    let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    let digest: String = backup.digest.iter().map(|b| format!("{b:02x}")).collect();
    print(
        output,
        format!(
            "snapshot saved to {}: revision {}, {size} bytes, sha256 {digest}",
            file.display(),
            backup.revision
        ),
        json!({
            "file": file.display().to_string(),
            "revision": backup.revision,
            "bytes": size,
            "sha256": digest,
            "source_cluster": format!("{:016x}", backup.source_cluster),
        }),
    );
    Ok(())
}

/// Streams member `endpoint`'s snapshot into `part` and syncs it.
async fn fetch(client: &MetaClient, endpoint: &str, part: &Path) -> Result<(), Failure> {
    let channel = client
        .channel_to(endpoint)
        .map_err(|e| failed(&format!("connecting to {endpoint}"), e))?;
    client
        .ensure_token(&channel)
        .await
        .map_err(|e| failed(endpoint, e.message()))?;
    let mut client = MaintenanceClient::new(channel);
    let mut stream = client
        .snapshot(epb::SnapshotRequest {})
        .await
        .map_err(|e| failed(endpoint, e.message()))?
        .into_inner();
    let mut out = std::fs::File::create(part)
        .map_err(|e| failed(&format!("creating {}", part.display()), e))?;
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|e| failed(&format!("{endpoint} broke off the snapshot"), e.message()))?
    {
        out.write_all(&chunk.blob)
            .map_err(|e| failed(&format!("writing {}", part.display()), e))?;
    }
    out.sync_all()
        .map_err(|e| failed(&format!("syncing {}", part.display()), e))
}
