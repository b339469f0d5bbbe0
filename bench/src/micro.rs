//! Micro-benchmarks (std timers, no criterion): log decode/encode
//! throughput on a real recorded log, xxh3 state-hash throughput, and the
//! cost of capturing dirty pages.

use std::hint::black_box;
use std::io::Cursor;
use std::path::Path;
use std::time::Instant;

use serde_json::{json, Map, Value};
use tandem_replay::log::{LogReader, LogWriter, Record};
use xxhash_rust::xxh3::xxh3_64;

use crate::ctx::Ctx;
use crate::stats::summary_json;

/// Runs the micro-benchmarks; `log` is a recording from this run.
pub fn measure(ctx: &Ctx, log: &Path) -> Value {
    let reps = ctx.reps(7, 3);
    let mut j = json!({});
    match std::fs::read(log) {
        Ok(bytes) if !bytes.is_empty() => {
            let (mut dec_mb, mut dec_rec, mut enc_mb, mut enc_rec) =
                (vec![], vec![], vec![], vec![]);
            let mut records: Vec<Record> = Vec::new();
            let mut identity = None;
            for _ in 0..reps {
                let t = Instant::now();
                let Ok((reader, id)) = LogReader::open(Cursor::new(&bytes)) else {
                    break;
                };
                records = reader.map_while(Result::ok).collect();
                let secs = t.elapsed().as_secs_f64();
                identity = Some(id);
                dec_mb.push(bytes.len() as f64 / 1e6 / secs);
                dec_rec.push(records.len() as f64 / secs);
            }
            if let Some(id) = identity {
                for _ in 0..reps {
                    let t = Instant::now();
                    let Ok(mut w) = LogWriter::new(Vec::with_capacity(bytes.len()), &id) else {
                        break;
                    };
                    for r in &records {
                        let _ = black_box(w.append(r));
                    }
                    let out = w.into_inner();
                    let secs = t.elapsed().as_secs_f64();
                    enc_mb.push(out.len() as f64 / 1e6 / secs);
                    enc_rec.push(records.len() as f64 / secs);
                }
            }
            ctx.progress(&format!(
                "micro log codec on a {} B log of {} records",
                bytes.len(),
                records.len()
            ));
            j = json!({
                "log_source": "the last compute-1kHz recording of this run (sync points dominate)",
                "log_bytes": bytes.len(),
                "log_records": records.len(),
                "decode_mb_per_s": summary_json(&dec_mb, "MB/s"),
                "decode_records_per_s": summary_json(&dec_rec, "records/s"),
                "encode_mb_per_s": summary_json(&enc_mb, "MB/s"),
                "encode_records_per_s": summary_json(&enc_rec, "records/s"),
            });
        }
        _ => {
            j["log_source"] = "none (no recording was kept)".into();
        }
    }
    // State hash: xxh3-64 as the epoch hashes use it, over 32 MiB of
    // pseudo-random bytes, whole and per 4 KiB page.
    let mem: Vec<u8> = (0..32u64 << 20)
        .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8)
        .collect();
    let (mut whole, mut paged) = (vec![], vec![]);
    for _ in 0..reps {
        let t = Instant::now();
        black_box(xxh3_64(black_box(&mem)));
        whole.push(mem.len() as f64 / 1e9 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut acc = 0u64;
        for page in mem.chunks(4096) {
            acc ^= xxh3_64(black_box(page));
        }
        black_box(acc);
        paged.push(mem.len() as f64 / 1e9 / t.elapsed().as_secs_f64());
    }
    ctx.progress("micro xxh3 state hash over 32 MiB");
    // Dirty-page capture: the DirtyTracker's harvest and the page copies a
    // sync point or checkpoint makes, on a 256 MiB VM.
    let mut capture = Map::new();
    for pages in [256u64, 8192] {
        let (mut harvest, mut copy, mut error) = (vec![], vec![], None);
        for _ in 0..reps {
            match tandem_vmm::vm::measure_capture_cost(Path::new("/dev/kvm"), 256 << 20, pages) {
                Ok(c) => {
                    harvest.push(c.harvest_ns_per_page);
                    copy.push(c.copy_ns_per_page);
                }
                Err(e) => error = Some(e.to_string()),
            }
        }
        let mut row = json!({
            "harvest_ns_per_page": summary_json(&harvest, "ns"),
            "copy_ns_per_page": summary_json(&copy, "ns"),
        });
        if let Some(e) = error {
            row["error"] = e.into();
        }
        capture.insert(pages.to_string(), row);
    }
    ctx.progress("micro dirty-page capture on a 256 MiB VM");
    j["capture"] = capture.into();
    j["xxh3_gb_per_s"] = summary_json(&whole, "GB/s");
    j["xxh3_per_page_gb_per_s"] = summary_json(&paged, "GB/s");
    j
}
