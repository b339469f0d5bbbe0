//! [`LogFile`]: a log on disk, with a size cap and `fdatasync`.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

use super::identity::VmIdentity;
use super::reader::LogReader;
use super::record::Record;
use super::writer::LogWriter;
use super::LogError;

/// The log file that `tandem run --record` writes.
///
/// Appends go through a buffer; the recorder calls [`LogFile::sync`] every
/// few hundred milliseconds, so a crash loses at most that much and leaves
/// at worst a torn final frame.
#[derive(Debug)]
pub struct LogFile {
    writer: LogWriter<BufWriter<File>>,
    path: PathBuf,
}

impl LogFile {
    /// Creates (or truncates) `path` and writes the header for `identity`.
    /// With `max_size`, the file (header included) never grows past it: an
    /// append that would is refused with [`LogError::Full`].
    pub fn create(
        path: impl AsRef<Path>,
        identity: &VmIdentity,
        max_size: Option<u64>,
    ) -> Result<Self, LogError> {
        let path = path.as_ref().to_path_buf();
        let file = BufWriter::with_capacity(1 << 20, File::create(&path)?);
        let writer = LogWriter::with_max_size(file, identity, max_size)?;
        Ok(Self { writer, path })
    }

    /// Opens `path` for reading; returns the reader and the header identity.
    pub fn open(
        path: impl AsRef<Path>,
    ) -> Result<(LogReader<BufReader<File>>, VmIdentity), LogError> {
        LogReader::open(BufReader::with_capacity(1 << 20, File::open(path)?))
    }

    /// Appends one record (see [`LogWriter::append`]).
    pub fn append(&mut self, record: &Record) -> Result<u64, LogError> {
        self.writer.append(record)
    }

    /// Bytes in the log, header included (some may still be buffered).
    pub fn bytes_written(&self) -> u64 {
        self.writer.bytes_written()
    }

    /// The size cap, if any.
    pub fn max_size(&self) -> Option<u64> {
        self.writer.max_size()
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hands buffered frames to the kernel.
    pub fn flush(&mut self) -> Result<(), LogError> {
        self.writer.flush()
    }

    /// Flushes, then `fdatasync`s: everything appended so far is on disk.
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.writer.flush()?;
        self.writer.get_ref().get_ref().sync_data()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{Check, EndOutcome};

    fn identity() -> VmIdentity {
        VmIdentity {
            image_hash: [1; 32],
            image_name: "bzImage".into(),
            cmdline: "console=ttyS0".into(),
            mem_size: 16 << 20,
            devices: vec![],
            cpuid: vec![],
            msrs: vec![],
            device_model_version: 1,
            tsc_khz: 3_000_000,
            rtc_base_unix_secs: 1,
            position: String::new(),
        }
    }

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("tandem-log-{}-{name}", std::process::id()))
    }

    #[test]
    fn a_file_round_trips_after_sync() {
        let path = temp_path("roundtrip");
        let records = vec![
            Record::Check {
                stop: 1,
                check: Check::PioRead {
                    port: 0x3f8,
                    value: 0x41,
                },
            },
            Record::Watermark { stop: 1 },
            Record::End {
                stop: 2,
                outcome: EndOutcome::GuestExit(0),
            },
        ];
        let mut log = LogFile::create(&path, &identity(), None).unwrap();
        for r in &records {
            log.append(r).unwrap();
        }
        log.sync().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), log.bytes_written());
        let (reader, id) = LogFile::open(&path).unwrap();
        assert_eq!(id, identity());
        assert_eq!(reader.collect::<Result<Vec<_>, _>>().unwrap(), records);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn the_cap_holds_on_disk() {
        let path = temp_path("cap");
        let mut log = LogFile::create(&path, &identity(), Some(200)).unwrap();
        let mut stop = 0;
        let err = loop {
            stop += 1;
            if let Err(e) = log.append(&Record::Watermark { stop }) {
                break e;
            }
        };
        assert!(matches!(err, LogError::Full { max: 200, .. }), "{err}");
        log.sync().unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len <= 200 && len == log.bytes_written());
        let (reader, _) = LogFile::open(&path).unwrap();
        assert_eq!(reader.count() as u64, stop - 1);
        std::fs::remove_file(&path).unwrap();
    }
}
