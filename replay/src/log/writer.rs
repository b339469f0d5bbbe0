//! [`LogWriter`]: writes the header, then one frame per [`Record`].

use std::io::{self, Write};

use super::frame::encode_frame;
use super::identity::VmIdentity;
use super::record::{Record, IDENTITY_VERSION_2, KIND_IDENTITY, VERSION_1};
use super::{LogError, MAGIC, PROTOCOL_VERSION};

/// Writes a log to any [`Write`].
///
/// Each frame is handed to the writer in one `write_all`, after the size cap
/// has been checked, so a refused record ([`LogError::Full`],
/// [`LogError::Invalid`]) leaves nothing behind. After an I/O error the
/// stream may hold part of a frame (a torn tail), so every later call fails.
#[derive(Debug)]
pub struct LogWriter<W: Write> {
    inner: W,
    written: u64,
    max_size: Option<u64>,
    failed: bool,
}

impl<W: Write> LogWriter<W> {
    /// Writes the header for `identity` to `w`, with no size cap.
    pub fn new(w: W, identity: &VmIdentity) -> Result<Self, LogError> {
        Self::with_max_size(w, identity, None)
    }

    /// Writes the header for `identity` to `w`; the log (header included)
    /// will never grow past `max_size` bytes.
    pub fn with_max_size(
        w: W,
        identity: &VmIdentity,
        max_size: Option<u64>,
    ) -> Result<Self, LogError> {
        let mut writer = Self {
            inner: w,
            written: 0,
            max_size,
            failed: false,
        };
        let frame = match identity.position.as_str() {
            "" => encode_frame(KIND_IDENTITY, VERSION_1, identity)?,
            position => encode_frame(KIND_IDENTITY, IDENTITY_VERSION_2, &(identity, position))?,
        };
        let mut header = Vec::with_capacity(MAGIC.len() + 2 + frame.len());
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        header.extend_from_slice(&frame);
        writer.write_frame(&header)?;
        Ok(writer)
    }

    /// Appends one record; returns the bytes it took (frame header included).
    pub fn append(&mut self, record: &Record) -> Result<u64, LogError> {
        if self.failed {
            return Err(failed_earlier());
        }
        let frames = record.encode_frames()?;
        // A split sync point goes in whole or not at all under the cap.
        let need: u64 = frames.iter().map(|f| f.len() as u64).sum();
        if let Some(max) = self.max_size {
            if self.written.saturating_add(need) > max {
                return Err(LogError::Full {
                    written: self.written,
                    need,
                    max,
                });
            }
        }
        let mut wrote = 0;
        for frame in &frames {
            wrote += self.write_frame(frame)?;
        }
        Ok(wrote)
    }

    fn write_frame(&mut self, bytes: &[u8]) -> Result<u64, LogError> {
        let need = bytes.len() as u64;
        if let Some(max) = self.max_size {
            if self.written.saturating_add(need) > max {
                return Err(LogError::Full {
                    written: self.written,
                    need,
                    max,
                });
            }
        }
        if let Err(e) = self.inner.write_all(bytes) {
            self.failed = true;
            return Err(e.into());
        }
        self.written += need;
        Ok(need)
    }

    /// Bytes written so far, header included.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// The size cap, if any.
    pub fn max_size(&self) -> Option<u64> {
        self.max_size
    }

    /// Flushes the underlying writer.
    pub fn flush(&mut self) -> Result<(), LogError> {
        if self.failed {
            return Err(failed_earlier());
        }
        self.inner.flush().map_err(|e| {
            self.failed = true;
            e.into()
        })
    }

    /// The underlying writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Gives the underlying writer back (unflushed).
    pub fn into_inner(self) -> W {
        self.inner
    }
}

fn failed_earlier() -> LogError {
    LogError::Io(io::Error::other(
        "an earlier write failed; the log may end in a torn frame",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{LogReader, PREAMBLE_LEN};

    fn identity() -> VmIdentity {
        VmIdentity {
            image_hash: [7; 32],
            image_name: "k".into(),
            cmdline: String::new(),
            mem_size: 1 << 20,
            devices: vec![],
            cpuid: vec![],
            msrs: vec![],
            device_model_version: 1,
            tsc_khz: 1,
            rtc_base_unix_secs: 0,
            position: String::new(),
        }
    }

    #[test]
    fn bytes_written_counts_every_frame() {
        let mut w = LogWriter::new(Vec::new(), &identity()).unwrap();
        let header = w.bytes_written();
        assert!(header > PREAMBLE_LEN as u64);
        let n = w.append(&Record::Watermark { stop: 300 }).unwrap();
        assert_eq!(n, 8 + 4 + 3); // 300 is a 3-byte varint
        assert_eq!(w.bytes_written(), header + n);
        assert_eq!(w.get_ref().len() as u64, w.bytes_written());
    }

    #[test]
    fn a_full_log_refuses_and_writes_nothing() {
        let header = LogWriter::new(Vec::new(), &identity())
            .unwrap()
            .bytes_written();
        let err = LogWriter::with_max_size(Vec::new(), &identity(), Some(header - 1)).unwrap_err();
        assert!(matches!(err, LogError::Full { written: 0, .. }), "{err}");

        let mut w = LogWriter::with_max_size(Vec::new(), &identity(), Some(header + 13)).unwrap();
        let stop = Record::Watermark { stop: 1 };
        assert_eq!(w.append(&stop).unwrap(), 13);
        let err = w.append(&stop).unwrap_err();
        assert!(
            matches!(err, LogError::Full { need: 13, max, .. } if max == header + 13),
            "{err}"
        );
        assert_eq!(w.bytes_written(), header + 13);
        let bytes = w.into_inner();
        let (reader, _) = LogReader::open(&bytes[..]).unwrap();
        assert_eq!(reader.map(Result::unwrap).collect::<Vec<_>>(), vec![stop]);
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("disk on fire"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn io_errors_are_sticky() {
        assert!(matches!(
            LogWriter::new(Broken, &identity()),
            Err(LogError::Io(_))
        ));
        let mut w = LogWriter {
            inner: Broken,
            written: 0,
            max_size: None,
            failed: false,
        };
        assert!(w.append(&Record::Watermark { stop: 1 }).is_err());
        assert!(w.flush().unwrap_err().to_string().contains("earlier"));
    }
}
