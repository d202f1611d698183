//! What an input looked like when a run started reading it: its size and a hash of 64 blocks
//! sampled across it. `run --resume` reads on at byte offsets recorded from that input; a file
//! edited meanwhile (a line fixed before the checkpoint moves every offset after it) would be
//! read at the wrong places, inventing and losing records. So resume compares the input with
//! its fingerprint first and refuses a changed one; `retry`, which is made for fixed inputs,
//! takes a new fingerprint once it has checked the fixes.
//!
//! Cheap by design: 64 reads of 4 KiB whatever the size. A change of size is always seen; an
//! edit that keeps the size is seen when it moves or changes a sampled block.
//!
//! A query is read on after a key, which means the same rows only for the same query and key:
//! its fingerprint is a hash of those (`q1:HASH`); the rows themselves may change, as rows of a
//! live database do.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use hopper_common::job::SourceSpec;

use super::SourceError;

/// Blocks sampled, evenly spread from the first byte to the last.
const SAMPLES: u64 = 64;
/// Bytes per sampled block.
const BLOCK: usize = 4096;

/// An input's size and sampled hash, kept with its run as `v1:SIZE:HASH`; or a query's hash,
/// as `q1:HASH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fingerprint {
    size: u64,
    hash: u64,
    query: bool,
}

impl Fingerprint {
    /// The fingerprint of the input `spec` names, as it is now.
    ///
    /// # Errors
    /// [`SourceError::Open`] when the input cannot be read.
    pub(crate) fn of(spec: &SourceSpec) -> Result<Fingerprint, SourceError> {
        match spec {
            SourceSpec::File { path, .. } => Fingerprint::of_file(path),
            SourceSpec::Postgres { query, key, .. } => {
                let mut hash = Fnv::new();
                hash.write(query.as_bytes());
                for k in key {
                    hash.write(b"\0");
                    hash.write(k.as_bytes());
                }
                Ok(Fingerprint {
                    size: 0,
                    hash: hash.0,
                    query: true,
                })
            }
        }
    }

    fn of_file(path: &Path) -> Result<Fingerprint, SourceError> {
        let open_err = |source| SourceError::Open {
            path: path.display().to_string(),
            source,
        };
        // Looked at before it is opened: opening a FIFO with no writer blocks.
        if !std::fs::metadata(path).map_err(open_err)?.is_file() {
            return Err(open_err(std::io::Error::other("it is not a regular file")));
        }
        let file = File::open(path).map_err(open_err)?;
        let size = file.metadata().map_err(open_err)?.len();
        let mut hash = Fnv::new();
        hash.write(&size.to_le_bytes());
        let mut block = vec![0u8; BLOCK];
        let span = size.saturating_sub(BLOCK as u64);
        for i in 0..SAMPLES {
            let at = span * i / (SAMPLES - 1);
            let n = file.read_at(&mut block, at).map_err(open_err)?;
            hash.write(&block[..n]);
        }
        Ok(Fingerprint {
            size,
            hash: hash.0,
            query: false,
        })
    }

    /// What changed from `self` (the run's) to `now`, for people; `None` when nothing did.
    pub(crate) fn changes(&self, now: &Fingerprint) -> Option<String> {
        if self.query || now.query {
            return (self != now).then(|| "source.query or source.key changed".to_string());
        }
        if self.size != now.size {
            Some(format!(
                "it has {} bytes, {} when the run started reading it",
                now.size, self.size
            ))
        } else if self.hash != now.hash {
            Some(format!(
                "it has the same size ({} bytes), but its content differs from when the run \
                 started reading it",
                now.size
            ))
        } else {
            None
        }
    }

    /// The input's size in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Reads a fingerprint as kept with its run.
    pub(crate) fn parse(text: &str) -> Option<Fingerprint> {
        if let Some(hash) = text.strip_prefix("q1:") {
            return Some(Fingerprint {
                size: 0,
                hash: u64::from_str_radix(hash, 16).ok()?,
                query: true,
            });
        }
        let rest = text.strip_prefix("v1:")?;
        let (size, hash) = rest.split_once(':')?;
        Some(Fingerprint {
            size: size.parse().ok()?,
            hash: u64::from_str_radix(hash, 16).ok()?,
            query: false,
        })
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.query {
            write!(f, "q1:{:016x}", self.hash)
        } else {
            write!(f, "v1:{}:{:016x}", self.size, self.hash)
        }
    }
}

/// FNV-1a, 64 bits: stable across builds and platforms (the fingerprint is stored), and plenty
/// for telling an edited file from the same one.
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hopper_common::FileFormat;

    fn print(text: &[u8]) -> (tempfile::NamedTempFile, Fingerprint) {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(f.path(), text).expect("write");
        let spec = SourceSpec::File {
            path: f.path().to_path_buf(),
            format: FileFormat::Jsonl,
        };
        let p = Fingerprint::of(&spec).expect("fingerprint");
        (f, p)
    }

    #[test]
    fn an_edit_anywhere_that_moves_bytes_is_seen() {
        let lines: Vec<String> = (0..20_000).map(|i| format!("{{\"id\":{i}}}\n")).collect();
        let text = lines.concat();
        let (_f, before) = print(text.as_bytes());
        assert_eq!(print(text.as_bytes()).1.changes(&before), None);
        // A line fixed near the start: longer.
        let fixed = text.replacen("{\"id\":4}", "{\"id\":4, \"ok\":1}", 1);
        let (_f, now) = print(fixed.as_bytes());
        assert!(before.changes(&now).is_some_and(|c| c.contains("bytes")));
        // One line inserted, another of the same length deleted: same size, bytes moved.
        let mut moved = lines.clone();
        moved.insert(100, "{\"id\":XXXXX}\n".into());
        moved.remove(15_001);
        assert_eq!(moved.concat().len(), text.len());
        let (_f, now) = print(moved.concat().as_bytes());
        assert!(before.changes(&now).is_some_and(|c| c.contains("content")));
        assert_eq!(Fingerprint::parse(&before.to_string()), Some(before));
    }

    #[test]
    fn an_empty_or_small_input_has_a_fingerprint() {
        let (_f, empty) = print(b"");
        let (_f, small) = print(b"{}\n");
        assert!(empty.changes(&small).is_some());
    }
}
