//! Sector-level file I/O shared by the disk workers ([`super::block`]) and
//! the mirrored-storage replicas ([`super::replica`]), so neither module
//! imports the other's internals.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Bytes per sector.
pub const SECTOR_SIZE: u64 = 512;

/// Reads `data.len()` bytes at `offset`. Past the end of a file whose size
/// is not a whole number of sectors it reads zeros, as a sparse tail would.
pub(super) fn read_full(file: &File, data: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < data.len() {
        match file.read_at(&mut data[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    data[done..].fill(0);
    Ok(())
}
