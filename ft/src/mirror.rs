//! Mirrored storage over the replication channel (DESIGN "Storage").
//!
//! Before a secondary follows, its replicas are made identical to the
//! primary's. It sends its sidecars (`DiskState`); the primary picks the
//! chunks that may differ — the union of both bitmaps when the two replicas
//! were last synced with each other, every chunk otherwise — and copies them
//! while the guest runs (`DiskChunks`). For a running primary it then holds
//! new writes for a moment, sends the chunks written during the copy, and
//! lets writes go on once the joiner's full sync point is taken (a write in
//! flight there is performed again by the joiner at its logged completion).
//! `DiskDone` ends the copy: the secondary makes everything durable, records
//! the sync in its sidecars and answers `DiskSynced`; the primary then keeps
//! in its bitmap only what it wrote since the snapshot.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_vmm::backend::replica::{
    bitmap_chunks, chunk_count, sidecar_path, Replica, SidecarHeader, CHUNK_SIZE,
};
use tandem_vmm::DiskConfig;

use super::wire::Message;

/// Chunks per `DiskChunks` message (8 MiB of data).
const CHUNKS_PER_MESSAGE: usize = 128;

/// One replica as its sidecar describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaInfo {
    /// The sidecar header.
    pub header: SidecarHeader,
    /// Its dirty bitmap.
    pub bitmap: Vec<u8>,
}

/// Bytes of an encoded header.
const INFO_HEAD: usize = 16 + 8 + 8 + 16 + 8 + 4;

/// The `DiskState` payload for `replicas`.
pub fn encode_state(replicas: &[Arc<Replica>]) -> Vec<u8> {
    let mut p = vec![replicas.len() as u8];
    for r in replicas {
        let (h, bitmap) = r.sidecar();
        p.extend_from_slice(&h.uuid);
        p.extend_from_slice(&h.capacity.to_le_bytes());
        p.extend_from_slice(&h.generation.to_le_bytes());
        p.extend_from_slice(&h.peer);
        p.extend_from_slice(&h.sync_id.to_le_bytes());
        p.extend_from_slice(&(bitmap.len() as u32).to_le_bytes());
        p.extend_from_slice(&bitmap);
    }
    p
}

fn u64_at(p: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(p[at..at + 8].try_into().unwrap_or([0; 8]))
}

fn uuid_at(p: &[u8], at: usize) -> [u8; 16] {
    p[at..at + 16].try_into().unwrap_or([0; 16])
}

/// Decodes a `DiskState` payload.
pub fn decode_state(p: &[u8]) -> Result<Vec<ReplicaInfo>, String> {
    let (&count, mut rest) = p.split_first().ok_or("empty disk state")?;
    let mut out = Vec::with_capacity(count.into());
    for i in 0..count {
        if rest.len() < INFO_HEAD {
            return Err(format!("disk state of replica {i} is cut short"));
        }
        let header = SidecarHeader {
            uuid: uuid_at(rest, 0),
            capacity: u64_at(rest, 16),
            generation: u64_at(rest, 24),
            peer: uuid_at(rest, 32),
            sync_id: u64_at(rest, 48),
        };
        let len = u32::from_le_bytes(rest[56..60].try_into().unwrap_or([0; 4])) as usize;
        let expected = chunk_count(header.capacity).div_ceil(8) as usize;
        if len != expected || rest.len() < INFO_HEAD + len {
            return Err(format!(
                "disk state of replica {i}: bitmap of {len} bytes for {} bytes of disk",
                header.capacity
            ));
        }
        out.push(ReplicaInfo {
            header,
            bitmap: rest[INFO_HEAD..INFO_HEAD + len].to_vec(),
        });
        rest = &rest[INFO_HEAD + len..];
    }
    Ok(out)
}

/// What a sync copies: per disk, the chunks, and the peer replicas.
#[derive(Debug)]
pub struct Plan {
    /// Names this sync in both sides' sidecars.
    pub sync_id: u64,
    /// Per disk, the chunks to copy.
    pub chunks: Vec<Vec<u64>>,
    /// Per disk, the destination replica's uuid.
    pub peers: Vec<[u8; 16]>,
}

/// Decides what the primary (`ours`) copies to a secondary whose replicas
/// are `theirs`. `fresh`: neither side has run the guest yet, so a
/// secondary whose replica is newer must not be overwritten.
pub fn plan(ours: &[Arc<Replica>], theirs: &[ReplicaInfo], fresh: bool) -> Result<Plan, String> {
    if ours.len() != theirs.len() {
        return Err(format!(
            "this primary mirrors {} disk(s), the secondary {}",
            ours.len(),
            theirs.len()
        ));
    }
    let mut chunks = Vec::new();
    for (i, (mine, peer)) in ours.iter().zip(theirs).enumerate() {
        let (h, bitmap) = mine.sidecar();
        if h.capacity != peer.header.capacity {
            return Err(format!(
                "disk {i}: the replicas differ in size ({} bytes here, {} on the secondary)",
                h.capacity, peer.header.capacity
            ));
        }
        if fresh && peer.header.generation > h.generation {
            return Err(format!(
                "disk {i}: the secondary's replica was last written by generation {}, this host's by generation {}: \
                 the secondary's is newer; start the primary on that host (or use `tandem pair`), \
                 so its data is not overwritten",
                peer.header.generation, h.generation
            ));
        }
        let list = if h.pairs_with(&peer.header) {
            let union: Vec<u8> = bitmap
                .iter()
                .zip(&peer.bitmap)
                .map(|(a, b)| a | b)
                .collect();
            bitmap_chunks(&union)
        } else {
            (0..chunk_count(h.capacity)).collect()
        };
        chunks.push(list);
    }
    let mut id = [0u8; 8];
    getrandom::getrandom(&mut id).map_err(|e| format!("no random sync id: {e}"))?;
    Ok(Plan {
        sync_id: u64::from_le_bytes(id).max(1),
        chunks,
        peers: theirs.iter().map(|t| t.header.uuid).collect(),
    })
}

/// Sends chunks `list` of replica `disk` through `send`, in messages of at
/// most [`CHUNKS_PER_MESSAGE`]; `total` is the round's size for the
/// receiver's progress. Returns the bytes sent.
pub fn send_chunks(
    replica: &Replica,
    disk: u8,
    sync_id: u64,
    list: &[u64],
    send: &mut dyn FnMut(Message) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    let mut bytes = 0u64;
    let mut done = 0u64;
    for part in list.chunks(CHUNKS_PER_MESSAGE) {
        let mut p = Vec::with_capacity(25 + part.len() * (12 + CHUNK_SIZE as usize));
        p.push(disk);
        p.extend_from_slice(&sync_id.to_le_bytes());
        p.extend_from_slice(&(list.len() as u64).to_le_bytes());
        done += part.len() as u64;
        p.extend_from_slice(&done.to_le_bytes());
        for &chunk in part {
            let data = replica
                .read_chunk(chunk)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", replica.path().display()))?;
            p.extend_from_slice(&chunk.to_le_bytes());
            p.extend_from_slice(&(data.len() as u32).to_le_bytes());
            p.extend_from_slice(&data);
            bytes += data.len() as u64;
        }
        send(Message::DiskChunks(p))?;
    }
    Ok(bytes)
}

/// The `DiskDone` payload: the sync id, the generation that wrote the
/// source replicas, and their uuids.
pub fn encode_done(plan_id: u64, generation: u64, sources: &[Arc<Replica>]) -> Vec<u8> {
    let mut p = plan_id.to_le_bytes().to_vec();
    p.extend_from_slice(&generation.to_le_bytes());
    p.push(sources.len() as u8);
    for r in sources {
        p.extend_from_slice(&r.sidecar().0.uuid);
    }
    p
}

/// The receiving side of a sync: this host's replicas, opened before the
/// VM exists.
pub struct MirrorReceiver {
    replicas: Vec<Arc<Replica>>,
    started: Instant,
    shown: Instant,
    copied: u64,
}

impl MirrorReceiver {
    /// Opens this host's replicas of `disks` and their sidecars in
    /// `state_dir`.
    pub fn open(disks: &[DiskConfig], state_dir: &Path) -> anyhow::Result<Self> {
        let replicas = disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                Replica::open(&d.path, d.read_only, &sidecar_path(state_dir, i)).map(Arc::new)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            replicas,
            started: Instant::now(),
            shown: Instant::now(),
            copied: 0,
        })
    }

    /// The `DiskState` message describing this host's replicas.
    pub fn state_message(&self) -> Message {
        Message::DiskState(encode_state(&self.replicas))
    }

    /// Writes the chunks of a `DiskChunks` message to the replica.
    pub fn apply_chunks(&mut self, p: &[u8]) -> Result<(), String> {
        if p.len() < 25 {
            return Err("short disk chunks message".into());
        }
        let disk = p[0];
        let replica = self
            .replicas
            .get(usize::from(disk))
            .ok_or_else(|| format!("chunks for disk {disk}, which this host does not have"))?;
        let (total, done) = (u64_at(p, 9), u64_at(p, 17));
        let mut rest = &p[25..];
        while !rest.is_empty() {
            if rest.len() < 12 {
                return Err("a chunk entry is cut short".into());
            }
            let chunk = u64_at(rest, 0);
            let len = u32::from_le_bytes(rest[8..12].try_into().unwrap_or([0; 4])) as usize;
            if len as u64 > CHUNK_SIZE || rest.len() < 12 + len {
                return Err(format!("chunk {chunk} has a bad length {len}"));
            }
            replica
                .write_chunk(chunk, &rest[12..12 + len])
                .map_err(|e| format!("writing {}: {e}", replica.path().display()))?;
            self.copied += len as u64;
            rest = &rest[12 + len..];
        }
        if self.shown.elapsed() >= Duration::from_millis(500) || done == total {
            self.shown = Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(1e-3);
            eprintln!(
                "tandem: disk {disk}: {done} / {total} chunks copied ({} MiB in all, {:.0} MiB/s)",
                self.copied >> 20,
                self.copied as f64 / secs / f64::from(1u32 << 20)
            );
        }
        Ok(())
    }

    /// Ends the sync described by a `DiskDone` payload: everything is made
    /// durable and the sync recorded. Returns the sync id.
    pub fn finish(&mut self, p: &[u8]) -> Result<u64, String> {
        if p.len() < 17 {
            return Err("short disk done message".into());
        }
        let (sync_id, generation, count) = (u64_at(p, 0), u64_at(p, 8), p[16]);
        if usize::from(count) != self.replicas.len() || p.len() != 17 + 16 * usize::from(count) {
            return Err(format!(
                "the primary synced {count} disk(s), this host mirrors {}",
                self.replicas.len()
            ));
        }
        for (i, r) in self.replicas.iter().enumerate() {
            r.finish_sync_as_destination(uuid_at(p, 17 + 16 * i), sync_id, generation)
                .map_err(|e| format!("recording the sync of {}: {e}", r.path().display()))?;
        }
        eprintln!(
            "tandem: replicas in sync with the primary ({} MiB copied in {} ms)",
            self.copied >> 20,
            self.started.elapsed().as_millis()
        );
        Ok(sync_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_replay::BlockOp;

    fn replica(dir: &Path, name: &str, fill: u8) -> Arc<Replica> {
        let img = dir.join(format!("{name}.img"));
        std::fs::write(&img, vec![fill; 4 * CHUNK_SIZE as usize]).unwrap();
        Arc::new(Replica::open(&img, false, &dir.join(format!("{name}.replica"))).unwrap())
    }

    #[test]
    fn a_first_sync_copies_everything_and_a_later_one_only_the_union_of_bitmaps() {
        let dir = std::env::temp_dir().join(format!("tandem-mirror-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (src, dst) = (replica(&dir, "a", 1), replica(&dir, "b", 2));
        let theirs = decode_state(&encode_state(std::slice::from_ref(&dst))).unwrap();
        let p = plan(std::slice::from_ref(&src), &theirs, true).unwrap();
        assert_eq!(p.chunks, vec![vec![0, 1, 2, 3]], "no common history: all");

        // Copy, as the channel would.
        let mut rx = MirrorReceiver {
            replicas: vec![dst.clone()],
            started: Instant::now(),
            shown: Instant::now(),
            copied: 0,
        };
        src.pause_for_snapshot();
        src.resume_writes();
        send_chunks(&src, 0, p.sync_id, &p.chunks[0], &mut |m| {
            let Message::DiskChunks(payload) = m else {
                panic!()
            };
            rx.apply_chunks(&payload).map_err(anyhow::Error::msg)
        })
        .unwrap();
        let id = rx
            .finish(&encode_done(p.sync_id, 3, std::slice::from_ref(&src)))
            .unwrap();
        src.finish_sync_as_source(p.peers[0], id).unwrap();
        assert_eq!(dst.read_chunk(2).unwrap(), src.read_chunk(2).unwrap());

        // Each side writes a different chunk; the next plan copies both.
        let write = |r: &Replica, chunk: u64| {
            r.perform(&BlockOp::Write {
                sector: chunk * CHUNK_SIZE / 512,
                data: vec![9; 512],
            })
            .unwrap()
        };
        write(&src, 1);
        write(&dst, 3);
        let theirs = decode_state(&encode_state(std::slice::from_ref(&dst))).unwrap();
        let p = plan(std::slice::from_ref(&src), &theirs, false).unwrap();
        assert_eq!(p.chunks, vec![vec![1, 3]]);
        // A fresh start never overwrites a newer replica.
        dst.set_generation(7).unwrap();
        let theirs = decode_state(&encode_state(std::slice::from_ref(&dst))).unwrap();
        let err = plan(std::slice::from_ref(&src), &theirs, true).unwrap_err();
        assert!(err.contains("newer"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_disk_messages_are_errors() {
        assert!(decode_state(&[]).is_err());
        assert!(decode_state(&[1, 0, 0]).is_err());
        let mut p = vec![1u8];
        p.extend_from_slice(&[0; INFO_HEAD]);
        p[1 + 16] = 0; // capacity 0: bitmap of 0 bytes is right
        assert_eq!(decode_state(&p).unwrap().len(), 1);
        p[1 + 56] = 9; // says 9 bitmap bytes, has none
        assert!(decode_state(&p).is_err());
        let mut rx = MirrorReceiver {
            replicas: Vec::new(),
            started: Instant::now(),
            shown: Instant::now(),
            copied: 0,
        };
        assert!(rx.apply_chunks(&[0; 10]).is_err());
        assert!(rx.apply_chunks(&[0; 25]).unwrap_err().contains("disk 0"));
        assert!(rx.finish(&[0; 17]).is_ok(), "zero disks, zero uuids");
        assert!(rx.finish(&[0; 16]).is_err());
    }
}

#[cfg(test)]
mod fuzz {
    //! Disk-sync messages come from the peer: any payload is decoded or
    //! refused with an error, never a panic, and never written outside the
    //! replica. `make fuzz` runs these with many more cases.
    use super::*;
    use proptest::prelude::*;
    use std::path::PathBuf;

    proptest! {
        #[test]
        fn any_disk_state_decodes_or_errors(p in prop::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode_state(&p);
        }

        #[test]
        fn any_chunks_and_done_messages_are_applied_safely_or_refused(
            chunks in prop::collection::vec(any::<u8>(), 0..300),
            done in prop::collection::vec(any::<u8>(), 0..80),
        ) {
            // One small replica for all cases (creating one per case would
            // make long runs slow); nothing a case does may grow it.
            static REPLICA: std::sync::OnceLock<(PathBuf, Arc<Replica>)> =
                std::sync::OnceLock::new();
            let (img, replica) = REPLICA.get_or_init(|| {
                let dir = std::env::temp_dir()
                    .join(format!("tandem-mirror-fuzz-{}", std::process::id()));
                std::fs::create_dir_all(&dir).unwrap();
                let img = dir.join("d.img");
                std::fs::write(&img, vec![0u8; 2 * CHUNK_SIZE as usize]).unwrap();
                let replica = Arc::new(Replica::open(&img, false, &dir.join("d.replica")).unwrap());
                (img, replica)
            });
            let replica = replica.clone();
            let mut rx = MirrorReceiver {
                replicas: vec![replica],
                started: Instant::now(),
                shown: Instant::now(),
                copied: 0,
            };
            let _ = rx.apply_chunks(&chunks);
            let _ = rx.finish(&done);
            // Whatever came, the image never grows past its size.
            prop_assert_eq!(std::fs::metadata(img).unwrap().len(), 2 * CHUNK_SIZE);
        }
    }
}
