//! Mirrored storage (`[ft] storage = "mirrored"`, DESIGN "Storage"): each
//! host keeps its own replica of every disk.
//!
//! A [`Replica`] is one host's copy of one disk plus its **sidecar** in
//! `state_dir`: the replica's UUID, the generation that last wrote it, the
//! peer replica and sync id it was last proven identical to, and a bitmap
//! of the 64 KiB chunks written since then. A chunk's bit is set and
//! fsynced *before* any write to it is issued, so after a crash at any
//! point the bitmap still covers every chunk that may differ; re-syncing is
//! then a delta: the union of both sides' bitmaps.
//!
//! The sidecar header is replaced by write-then-rename (fsync of the file
//! and its directory); bits are set in place (one byte, `fdatasync`). A
//! sidecar that is missing, unreadable or for another image size means
//! "history unknown": the next sync copies everything.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};

use tandem_replay::BlockOp;
use xxhash_rust::xxh3::xxh3_64;

use super::sector::{read_full, SECTOR_SIZE};

/// Bytes of guest disk per bitmap bit.
pub const CHUNK_SIZE: u64 = 64 * 1024;
const MAGIC: &[u8; 8] = b"TNDMRPL1";
/// Bytes before the bitmap (header, then padding).
const HEADER_LEN: u64 = 4096;
/// Header fields: magic, uuid, capacity, generation, peer, sync id,
/// chunk size.
const HEADER_USED: usize = 8 + 16 + 8 + 8 + 16 + 8 + 8;

/// The 64-bit hash logged for each read in mirrored mode, and used to
/// compare replicas range by range.
pub fn data_hash(data: &[u8]) -> u64 {
    xxh3_64(data)
}

/// What a sidecar says about its replica (sent to the peer before a sync).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SidecarHeader {
    /// This replica's identity (random, made with the sidecar).
    pub uuid: [u8; 16],
    /// The image's size in bytes.
    pub capacity: u64,
    /// The generation of the side that last wrote this replica.
    pub generation: u64,
    /// The peer replica it was last proven identical to (zero: none).
    pub peer: [u8; 16],
    /// The id of that sync (both sides store the same one).
    pub sync_id: u64,
}

impl SidecarHeader {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN as usize);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.uuid);
        out.extend_from_slice(&self.capacity.to_le_bytes());
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(&self.peer);
        out.extend_from_slice(&self.sync_id.to_le_bytes());
        out.extend_from_slice(&CHUNK_SIZE.to_le_bytes());
        out.resize(HEADER_LEN as usize, 0);
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < HEADER_USED || &bytes[..8] != MAGIC {
            return Err("not a tandem replica sidecar".into());
        }
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or([0; 8]));
        let arr16 = |at: usize| -> [u8; 16] { bytes[at..at + 16].try_into().unwrap_or([0; 16]) };
        let chunk = u64_at(64);
        if chunk != CHUNK_SIZE {
            return Err(format!("chunk size {chunk}, this build uses {CHUNK_SIZE}"));
        }
        Ok(Self {
            uuid: arr16(8),
            capacity: u64_at(24),
            generation: u64_at(32),
            peer: arr16(40),
            sync_id: u64_at(56),
        })
    }

    /// Whether this replica and `other` were last proven identical to each
    /// other by the same sync (then a delta re-sync is enough).
    pub fn pairs_with(&self, other: &SidecarHeader) -> bool {
        self.sync_id != 0
            && self.sync_id == other.sync_id
            && self.peer == other.uuid
            && other.peer == self.uuid
            && self.capacity == other.capacity
    }
}

/// Why a replica or its sidecar could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// Reading or writing the sidecar failed.
    #[error("replica sidecar {path}: {source}")]
    Sidecar {
        /// The sidecar.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Reading or writing the replica image failed.
    #[error("replica {path}: {what}: {source}")]
    Image {
        /// The image.
        path: PathBuf,
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Number of chunks of a disk of `capacity` bytes.
pub fn chunk_count(capacity: u64) -> u64 {
    capacity.div_ceil(CHUNK_SIZE)
}

/// The chunks a request touches, as an inclusive range (None: none).
fn chunks_of(sector: u64, len: u64) -> Option<(u64, u64)> {
    if len == 0 {
        return None;
    }
    let start = sector.checked_mul(SECTOR_SIZE)?;
    let end = start.checked_add(len - 1)?;
    Some((start / CHUNK_SIZE, end / CHUNK_SIZE))
}

/// A sidecar file: header and dirty bitmap.
struct Sidecar {
    path: PathBuf,
    file: File,
    header: SidecarHeader,
    bitmap: Vec<u8>,
}

fn new_uuid() -> [u8; 16] {
    let mut uuid = [0u8; 16];
    if getrandom::getrandom(&mut uuid).is_err() {
        // No entropy source: the clock and pid still make it unique enough
        // to tell two replicas apart.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        uuid.copy_from_slice(&(nanos ^ u128::from(std::process::id()) << 64).to_le_bytes());
    }
    uuid
}

impl Sidecar {
    /// Opens the sidecar at `path` for an image of `capacity` bytes, or
    /// creates one that says "history unknown".
    fn open(path: &Path, capacity: u64) -> Result<Self, ReplicaError> {
        let err = |source| ReplicaError::Sidecar {
            path: path.to_path_buf(),
            source,
        };
        let bits = chunk_count(capacity).div_ceil(8) as usize;
        let existing = match std::fs::read(path) {
            Ok(bytes) => match SidecarHeader::decode(&bytes) {
                Ok(h) if h.capacity == capacity && bytes.len() >= HEADER_LEN as usize + bits => {
                    Some((
                        h,
                        bytes[HEADER_LEN as usize..HEADER_LEN as usize + bits].to_vec(),
                    ))
                }
                Ok(h) => {
                    tracing::warn!(
                        "replica sidecar {} is for an image of {} bytes, this one has {capacity}: the next sync copies the whole disk",
                        path.display(),
                        h.capacity
                    );
                    None
                }
                Err(why) => {
                    tracing::warn!(
                        "replica sidecar {} is unreadable ({why}): the next sync copies the whole disk",
                        path.display()
                    );
                    None
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(err(e)),
        };
        let fresh = existing.is_none();
        let (header, bitmap) = existing.unwrap_or_else(|| {
            (
                SidecarHeader {
                    uuid: new_uuid(),
                    capacity,
                    ..Default::default()
                },
                vec![0u8; bits],
            )
        });
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        if fresh {
            write_replace(path, &header, &bitmap).map_err(err)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(err)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            header,
            bitmap,
        })
    }

    /// Sets the bits of chunks `first..=last`; persists the bytes that
    /// changed before returning.
    fn mark(&mut self, first: u64, last: u64) -> std::io::Result<()> {
        let mut changed: Option<(usize, usize)> = None;
        for chunk in first..=last {
            let (byte, bit) = ((chunk / 8) as usize, chunk % 8);
            let Some(b) = self.bitmap.get_mut(byte) else {
                break;
            };
            if *b & (1 << bit) == 0 {
                *b |= 1 << bit;
                changed = Some(changed.map_or((byte, byte), |(lo, _)| (lo, byte)));
            }
        }
        if let Some((lo, hi)) = changed {
            self.file
                .write_all_at(&self.bitmap[lo..=hi], HEADER_LEN + lo as u64)?;
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Replaces header and bitmap atomically.
    fn replace(&mut self, header: SidecarHeader, bitmap: Vec<u8>) -> std::io::Result<()> {
        write_replace(&self.path, &header, &bitmap)?;
        self.file = OpenOptions::new().read(true).write(true).open(&self.path)?;
        self.header = header;
        self.bitmap = bitmap;
        Ok(())
    }

    fn dirty_chunks(&self) -> Vec<u64> {
        bitmap_chunks(&self.bitmap)
    }
}

/// The chunk numbers whose bits are set in `bitmap`.
pub fn bitmap_chunks(bitmap: &[u8]) -> Vec<u64> {
    let mut out = Vec::new();
    for (i, &b) in bitmap.iter().enumerate() {
        for bit in 0..8 {
            if b & (1 << bit) != 0 {
                out.push(i as u64 * 8 + bit);
            }
        }
    }
    out
}

/// Write-then-rename: a crash leaves the old sidecar or the new one.
fn write_replace(path: &Path, header: &SidecarHeader, bitmap: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(&header.encode())?;
    f.write_all(bitmap)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The part of a replica that changes while the VM runs.
struct ReplicaState {
    sidecar: Sidecar,
    /// Writes are held (a re-sync is reading the replica's final delta).
    paused: bool,
    /// Writes issued and not finished.
    writing: u32,
    /// Chunks written since a re-sync started copying (sent again later).
    tracking: Option<BTreeSet<u64>>,
    /// Chunks written since a re-sync's snapshot: the bitmap this side
    /// keeps once the peer confirms the sync.
    since_snapshot: Option<BTreeSet<u64>>,
}

/// One host's replica of one disk, with its sidecar.
pub struct Replica {
    file: File,
    path: PathBuf,
    capacity: u64,
    read_only: bool,
    state: Mutex<ReplicaState>,
    changed: Condvar,
}

/// What a finished write leaves to do: nothing but say so.
pub struct WriteGuard<'a>(&'a Replica);

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.writing = st.writing.saturating_sub(1);
        drop(st);
        self.0.changed.notify_all();
    }
}

impl Replica {
    /// Opens the replica image `path` (its own file handle) and its sidecar
    /// `sidecar`.
    pub fn open(path: &Path, read_only: bool, sidecar: &Path) -> Result<Self, ReplicaError> {
        let image_err = |what: &str, source| ReplicaError::Image {
            path: path.to_path_buf(),
            what: what.into(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| image_err("open", e))?;
        let capacity = file.metadata().map_err(|e| image_err("stat", e))?.len();
        let sidecar = Sidecar::open(sidecar, capacity)?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            capacity,
            read_only,
            state: Mutex::new(ReplicaState {
                sidecar,
                paused: false,
                writing: 0,
                tracking: None,
                since_snapshot: None,
            }),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, ReplicaState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The image size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The sidecar's header and bitmap now.
    pub fn sidecar(&self) -> (SidecarHeader, Vec<u8>) {
        let st = self.lock();
        (st.sidecar.header.clone(), st.sidecar.bitmap.clone())
    }

    /// Chunks written since the last sync.
    pub fn dirty_chunks(&self) -> Vec<u64> {
        self.lock().sidecar.dirty_chunks()
    }

    /// Records that generation `generation` writes this replica from now on.
    pub fn set_generation(&self, generation: u64) -> std::io::Result<()> {
        let mut st = self.lock();
        if st.sidecar.header.generation == generation {
            return Ok(());
        }
        let mut header = st.sidecar.header.clone();
        header.generation = generation;
        let bitmap = st.sidecar.bitmap.clone();
        st.sidecar.replace(header, bitmap)
    }

    /// Before writing `len` bytes at `sector`: waits while writes are
    /// paused, then sets (and persists) the chunks' bits. The write must be
    /// finished before the guard is dropped.
    pub fn begin_write(&self, sector: u64, len: u64) -> std::io::Result<WriteGuard<'_>> {
        let mut st = self.lock();
        while st.paused {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if let Some((first, last)) = chunks_of(sector, len) {
            st.sidecar.mark(first, last)?;
            let st = &mut *st;
            for set in [&mut st.tracking, &mut st.since_snapshot]
                .into_iter()
                .flatten()
            {
                set.extend(first..=last);
            }
        }
        st.writing += 1;
        Ok(WriteGuard(self))
    }

    /// Performs one request on this replica: (virtio status, data read).
    pub fn perform(&self, op: &BlockOp) -> Result<(u8, Vec<u8>), ReplicaError> {
        let image_err = |what: &str, source| ReplicaError::Image {
            path: self.path.clone(),
            what: what.into(),
            source,
        };
        const OK: u8 = 0;
        const IOERR: u8 = 1;
        match op {
            BlockOp::Read { sector, len } => {
                let Some(offset) = sector.checked_mul(SECTOR_SIZE) else {
                    return Ok((IOERR, Vec::new()));
                };
                let mut data = vec![0u8; *len as usize];
                read_full(&self.file, &mut data, offset)
                    .map_err(|e| image_err(&format!("read at sector {sector}"), e))?;
                Ok((OK, data))
            }
            BlockOp::Write { sector, data } => {
                if self.read_only {
                    return Ok((IOERR, Vec::new()));
                }
                let Some(offset) = sector.checked_mul(SECTOR_SIZE) else {
                    return Ok((IOERR, Vec::new()));
                };
                let _guard = self.begin_write(*sector, data.len() as u64).map_err(|e| {
                    ReplicaError::Sidecar {
                        path: self.lock().sidecar.path.clone(),
                        source: e,
                    }
                })?;
                self.file
                    .write_all_at(data, offset)
                    .map_err(|e| image_err(&format!("write at sector {sector}"), e))?;
                Ok((OK, Vec::new()))
            }
            BlockOp::Flush => {
                self.file.sync_all().map_err(|e| image_err("fsync", e))?;
                Ok((OK, Vec::new()))
            }
        }
    }

    /// Marks chunks as differing from the peer (a read whose hash did not
    /// match): the next re-sync copies them.
    pub fn mark_suspect(&self, sector: u64, len: u64) -> std::io::Result<()> {
        match chunks_of(sector, len) {
            Some((first, last)) => self.lock().sidecar.mark(first, last),
            None => Ok(()),
        }
    }

    /// Reads chunk `chunk` (shorter at the end of the image).
    pub fn read_chunk(&self, chunk: u64) -> std::io::Result<Vec<u8>> {
        let start = chunk * CHUNK_SIZE;
        let len = CHUNK_SIZE.min(self.capacity.saturating_sub(start));
        let mut data = vec![0u8; len as usize];
        read_full(&self.file, &mut data, start)?;
        Ok(data)
    }

    /// Overwrites chunk `chunk` with `data` (a re-sync; no bitmap change).
    pub fn write_chunk(&self, chunk: u64, data: &[u8]) -> std::io::Result<()> {
        let start = chunk
            .checked_mul(CHUNK_SIZE)
            .filter(|s| s.saturating_add(data.len() as u64) <= self.capacity)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("chunk {chunk} is outside the image"),
                )
            })?;
        self.file.write_all_at(data, start)
    }

    /// Makes every chunk written so far durable.
    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_all()
    }

    /// A re-sync starts copying: chunks written from now on are tracked.
    pub fn start_tracking(&self) {
        self.lock().tracking = Some(BTreeSet::new());
    }

    /// The chunks written since tracking started (or the last take).
    pub fn take_tracked(&self) -> Vec<u64> {
        let mut st = self.lock();
        st.tracking
            .as_mut()
            .map(|t| std::mem::take(t).into_iter().collect())
            .unwrap_or_default()
    }

    /// Holds new writes and waits for those issued to finish; from now on
    /// chunks written count toward the bitmap kept after this sync.
    pub fn pause_for_snapshot(&self) {
        let mut st = self.lock();
        st.paused = true;
        while st.writing > 0 {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.since_snapshot = Some(BTreeSet::new());
    }

    /// Lets writes go on (idempotent).
    pub fn resume_writes(&self) {
        let mut st = self.lock();
        st.paused = false;
        st.tracking = None;
        drop(st);
        self.changed.notify_all();
    }

    /// The source side of a sync: the peer confirmed it has this replica as
    /// of the snapshot. Keeps only the chunks written since.
    pub fn finish_sync_as_source(&self, peer: [u8; 16], sync_id: u64) -> std::io::Result<()> {
        let mut st = self.lock();
        let since = st.since_snapshot.take().unwrap_or_default();
        let mut bitmap = vec![0u8; st.sidecar.bitmap.len()];
        for chunk in since {
            if let Some(b) = bitmap.get_mut((chunk / 8) as usize) {
                *b |= 1 << (chunk % 8);
            }
        }
        let header = SidecarHeader {
            peer,
            sync_id,
            ..st.sidecar.header.clone()
        };
        st.sidecar.replace(header, bitmap)
    }

    /// A sync did not complete: the bitmap stays as it is (a superset).
    pub fn abort_sync(&self) {
        let mut st = self.lock();
        st.since_snapshot = None;
        st.tracking = None;
    }

    /// The destination side of a sync: everything copied is durable; this
    /// replica equals `peer` as of sync `sync_id`.
    pub fn finish_sync_as_destination(
        &self,
        peer: [u8; 16],
        sync_id: u64,
        generation: u64,
    ) -> std::io::Result<()> {
        self.file.sync_all()?;
        let mut st = self.lock();
        let header = SidecarHeader {
            peer,
            sync_id,
            generation,
            ..st.sidecar.header.clone()
        };
        let bitmap = vec![0u8; st.sidecar.bitmap.len()];
        st.sidecar.replace(header, bitmap)
    }
}

/// The sidecar path of disk `index` under `state_dir`.
pub fn sidecar_path(state_dir: &Path, index: usize) -> PathBuf {
    state_dir.join(format!("disk{index}.replica"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tandem-replica-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_write_sets_its_chunk_bits_durably_before_it_lands() {
        let d = dir("bits");
        let img = d.join("a.img");
        std::fs::write(&img, vec![0u8; 4 * CHUNK_SIZE as usize]).unwrap();
        let sc = d.join("disk0.replica");
        let r = Replica::open(&img, false, &sc).unwrap();
        assert!(r.dirty_chunks().is_empty());
        // Straddles chunks 0 and 1.
        let sector = (CHUNK_SIZE - 512) / SECTOR_SIZE;
        let (status, _) = r
            .perform(&BlockOp::Write {
                sector,
                data: vec![5; 1024],
            })
            .unwrap();
        assert_eq!(status, 0);
        assert_eq!(r.dirty_chunks(), vec![0, 1]);
        let uuid = r.sidecar().0.uuid;
        drop(r);
        // Read back from disk, as after a kill -9.
        let r = Replica::open(&img, false, &sc).unwrap();
        assert_eq!(r.dirty_chunks(), vec![0, 1]);
        assert_eq!(r.sidecar().0.uuid, uuid, "the replica keeps its identity");
        let (_, data) = r.perform(&BlockOp::Read { sector, len: 1024 }).unwrap();
        assert_eq!(data, vec![5; 1024]);
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_finished_sync_keeps_only_what_was_written_after_the_snapshot() {
        let d = dir("sync");
        let img = d.join("a.img");
        std::fs::write(&img, vec![0u8; 8 * CHUNK_SIZE as usize]).unwrap();
        let sc = d.join("disk0.replica");
        let r = Replica::open(&img, false, &sc).unwrap();
        let write = |chunk: u64| BlockOp::Write {
            sector: chunk * CHUNK_SIZE / SECTOR_SIZE,
            data: vec![1; 512],
        };
        r.perform(&write(2)).unwrap();
        r.start_tracking();
        r.perform(&write(3)).unwrap();
        assert_eq!(r.take_tracked(), vec![3]);
        r.pause_for_snapshot();
        r.resume_writes();
        r.perform(&write(6)).unwrap();
        assert_eq!(r.dirty_chunks(), vec![2, 3, 6]);
        r.finish_sync_as_source([9; 16], 77).unwrap();
        assert_eq!(r.dirty_chunks(), vec![6]);
        drop(r);
        let r = Replica::open(&img, false, &sc).unwrap();
        let (h, _) = r.sidecar();
        assert_eq!((h.peer, h.sync_id), ([9; 16], 77));
        assert_eq!(r.dirty_chunks(), vec![6]);
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn pairing_needs_the_same_sync_on_both_sides() {
        let a = SidecarHeader {
            uuid: [1; 16],
            capacity: 10,
            generation: 3,
            peer: [2; 16],
            sync_id: 5,
        };
        let b = SidecarHeader {
            uuid: [2; 16],
            capacity: 10,
            generation: 4,
            peer: [1; 16],
            sync_id: 5,
        };
        assert!(a.pairs_with(&b) && b.pairs_with(&a));
        let other_sync = SidecarHeader {
            sync_id: 6,
            ..b.clone()
        };
        assert!(!a.pairs_with(&other_sync));
        let replaced = SidecarHeader { uuid: [3; 16], ..b };
        assert!(
            !a.pairs_with(&replaced),
            "a replaced replica has no history"
        );
        assert!(!SidecarHeader::default().pairs_with(&SidecarHeader::default()));
    }

    #[test]
    fn a_corrupt_or_resized_sidecar_means_unknown_history() {
        let d = dir("corrupt");
        let img = d.join("a.img");
        std::fs::write(&img, vec![0u8; 2 * CHUNK_SIZE as usize]).unwrap();
        let sc = d.join("disk0.replica");
        std::fs::write(&sc, b"garbage").unwrap();
        let r = Replica::open(&img, false, &sc).unwrap();
        let (h, _) = r.sidecar();
        assert_eq!(h.sync_id, 0);
        assert_ne!(h.uuid, [0; 16]);
        r.finish_sync_as_destination([4; 16], 9, 2).unwrap();
        drop(r);
        // The image grows: history no longer applies.
        std::fs::write(&img, vec![0u8; 3 * CHUNK_SIZE as usize]).unwrap();
        let r = Replica::open(&img, false, &sc).unwrap();
        assert_eq!(r.sidecar().0.sync_id, 0);
        let _ = std::fs::remove_dir_all(d);
    }
}
