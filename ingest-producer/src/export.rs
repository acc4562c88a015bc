//! Reading line-protocol exports (`influx export`, `influxd inspect export-lp`, `influx_inspect
//! export -lponly`), plain or gzip (by the `.gz` name or the gzip magic bytes), in parsed
//! chunks of whole lines with their line numbers, for `import` and `compare`.
//!
//! A chunk ends at a line end that is not inside a string field (a string may hold a
//! newline), so no line is split between chunks. `# …` comment lines and the DDL lines of
//! 1.x exports (`CREATE DATABASE …`, `CREATE RETENTION POLICY …`) are skipped.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use flate2::read::MultiGzDecoder;

use crate::lineproto::{self, Line, Precision};

/// Bytes read from the file so far (compressed bytes for a gzip file): the progress bar's
/// position against [`ExportReader::file_len`].
#[derive(Debug, Clone, Default)]
pub struct Progress(Arc<AtomicU64>);

impl Progress {
    /// Bytes read so far.
    pub fn bytes(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

struct Counting<R> {
    inner: R,
    progress: Progress,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.0.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// An export file read chunk by chunk.
pub struct ExportReader {
    reader: Box<dyn Read + Send>,
    /// Bytes read but not yet returned (the start of a line continued in the next read).
    carry: Vec<u8>,
    /// Number of the first line in `carry`.
    next_line: usize,
    eof: bool,
    precision: Precision,
    progress: Progress,
    file_len: u64,
}

impl std::fmt::Debug for ExportReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportReader")
            .field("next_line", &self.next_line)
            .field("eof", &self.eof)
            .finish()
    }
}

impl ExportReader {
    /// Opens `path`; gzip when its name ends in `.gz` or it starts with the gzip magic.
    pub fn open(path: &Path, precision: Precision) -> io::Result<Self> {
        let mut file = File::open(path)?;
        let file_len = file.metadata()?.len();
        let mut magic = [0u8; 2];
        let gzip_magic = file.read(&mut magic)? == 2 && magic == [0x1f, 0x8b];
        drop(file);
        let gzip = gzip_magic || path.extension().is_some_and(|e| e == "gz");
        let progress = Progress::default();
        let counting = Counting {
            inner: File::open(path)?,
            progress: progress.clone(),
        };
        let reader: Box<dyn Read + Send> = if gzip {
            Box::new(MultiGzDecoder::new(BufReader::with_capacity(
                1 << 16,
                counting,
            )))
        } else {
            Box::new(counting)
        };
        Ok(ExportReader {
            reader,
            carry: Vec::new(),
            next_line: 1,
            eof: false,
            precision,
            progress,
            file_len,
        })
    }

    /// Size of the file on disk.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The shared read position.
    pub fn progress(&self) -> Progress {
        self.progress.clone()
    }

    /// The next chunk of about `target` bytes of whole lines, parsed; `None` at the end.
    pub fn next_chunk(&mut self, target: usize) -> io::Result<Option<Vec<Line>>> {
        loop {
            while !self.eof && self.carry.len() < target {
                let start = self.carry.len();
                self.carry.resize(start + (target - start).max(1 << 16), 0);
                let n = self.reader.read(&mut self.carry[start..])?;
                self.carry.truncate(start + n);
                if n == 0 {
                    self.eof = true;
                }
            }
            if self.carry.is_empty() {
                return Ok(None);
            }
            let cut = if self.eof {
                self.carry.len()
            } else {
                match self.carry.iter().rposition(|b| *b == b'\n') {
                    Some(last) => complete_lines(&self.carry[..=last]),
                    None => 0,
                }
            };
            if cut == 0 {
                // One line longer than `target`: read on.
                let grown = self.carry.len() * 2;
                let mut more = vec![0; grown - self.carry.len()];
                let n = self.reader.read(&mut more)?;
                if n == 0 {
                    self.eof = true;
                }
                self.carry.extend_from_slice(&more[..n]);
                continue;
            }
            let chunk: Vec<u8> = self.carry.drain(..cut).collect();
            let first = self.next_line;
            self.next_line += chunk.iter().filter(|b| **b == b'\n').count();
            return Ok(Some(lineproto::parse_export(&chunk, first, self.precision)));
        }
    }
}

/// Length of the prefix of `text` (which ends with `\n`) made of whole lines: shorter when
/// its last `\n` is inside a string field.
fn complete_lines(text: &[u8]) -> usize {
    let Ok(s) = std::str::from_utf8(text) else {
        // Not UTF-8: the lines are refused one by one anyway; cut at the newline.
        return text.len();
    };
    let base = s.as_ptr() as usize;
    let mut last_start = 0;
    for piece in influxdb_line_protocol::split_lines(s) {
        last_start = piece.as_ptr() as usize - base;
    }
    // The text ends with a separator when the last piece is empty.
    if last_start == s.len() {
        s.len()
    } else {
        last_start
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn chunks_end_at_line_ends_outside_strings_and_keep_numbers() {
        let dir = std::env::temp_dir().join(format!("export-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = "# DDL\nCREATE DATABASE x\nm f=1 1\nm s=\"a\nb\" 2\nm f=3 3\nm f=4 4";
        let plain = dir.join("a.lp");
        std::fs::write(&plain, text).unwrap();
        let gz = dir.join("a.lp.gz");
        let mut encoder =
            flate2::write::GzEncoder::new(File::create(&gz).unwrap(), flate2::Compression::fast());
        encoder.write_all(text.as_bytes()).unwrap();
        encoder.finish().unwrap();
        for path in [&plain, &gz] {
            for target in [1, 9, 1 << 20] {
                let mut reader = ExportReader::open(path, Precision::Seconds).unwrap();
                let mut lines = Vec::new();
                while let Some(chunk) = reader.next_chunk(target).unwrap() {
                    lines.extend(chunk);
                }
                let numbers: Vec<(usize, bool)> =
                    lines.iter().map(|l| (l.number, l.point.is_ok())).collect();
                assert_eq!(
                    numbers,
                    vec![(3, true), (4, true), (6, true), (7, true)],
                    "{path:?} {target}"
                );
                assert_eq!(
                    lines[1].point.as_ref().unwrap().time_ns,
                    Some(2_000_000_000)
                );
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
