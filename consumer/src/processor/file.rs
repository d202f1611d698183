//! `file`: writes each chunk's items as JSON lines to `DIR/RUN/SEQ.jsonl`.
//!
//! The file is written to a temporary file in the same directory, flushed to disk, then renamed
//! over `SEQ.jsonl`. A chunk delivered twice replaces its file: the output holds every item
//! exactly once, whatever the redeliveries.

use std::io::Write;
use std::path::PathBuf;

use async_trait::async_trait;
use hopper_common::Chunk;

use super::{ProcessError, Processed, Processor};

/// Writes chunks to files.
#[derive(Debug, Clone)]
pub struct FileProcessor {
    dir: PathBuf,
}

impl FileProcessor {
    /// Writes under `dir`.
    pub fn new(dir: PathBuf) -> FileProcessor {
        FileProcessor { dir }
    }
}

#[async_trait]
impl Processor for FileProcessor {
    async fn process(&self, chunk: &Chunk) -> Result<Processed, ProcessError> {
        let dir = self.dir.join(chunk.run.to_string());
        let target = dir.join(format!("{}.jsonl", chunk.seq));
        let data: Vec<u8> = chunk.items.iter().fold(Vec::new(), |mut buf, item| {
            buf.extend_from_slice(item.data.as_bytes());
            buf.push(b'\n');
            buf
        });
        let write = move || -> std::io::Result<()> {
            std::fs::create_dir_all(&dir)?;
            // Created 0666 less the umask, as any other file the user writes (a temporary file
            // is 0600 by default, and would stay so once renamed).
            let mut tmp = tempfile::Builder::new()
                .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
                .tempfile_in(&dir)?;
            tmp.write_all(&data)?;
            tmp.as_file().sync_all()?;
            tmp.persist(&target).map_err(|e| e.error)?;
            Ok(())
        };
        let target_name = self.dir.display().to_string();
        match tokio::task::spawn_blocking(write).await {
            Ok(Ok(())) => Ok(Processed::all_done()),
            // A full or read-only disk may be fixed: retry.
            Ok(Err(e)) => Err(ProcessError::Transient(format!(
                "cannot write chunk {} under {target_name}: {e}",
                chunk.seq
            ))),
            Err(e) => Err(ProcessError::Transient(format!("writer task failed: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hopper_common::{Item, Position};

    #[tokio::test]
    async fn a_chunk_written_twice_is_one_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = FileProcessor::new(dir.path().to_path_buf());
        let chunk = Chunk {
            job: "j".into(),
            run: 4,
            seq: 9,
            attempt: 1,
            position: Position::default(),
            key: Vec::new(),
            items: vec![
                Item {
                    line: 1,
                    data: "{\"id\":1}".into(),
                },
                Item {
                    line: 2,
                    data: "{\"id\":2}".into(),
                },
            ],
        };
        p.process(&chunk).await.expect("first");
        p.process(&chunk).await.expect("second");
        let text = std::fs::read_to_string(dir.path().join("4/9.jsonl")).expect("output");
        assert_eq!(text, "{\"id\":1}\n{\"id\":2}\n");
        // Regression (the edge-cases issue, 16): outputs were 0600 whatever the umask.
        use std::os::unix::fs::PermissionsExt;
        let umask = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Umask:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            })
            .unwrap_or(0o022);
        let mode = std::fs::metadata(dir.path().join("4/9.jsonl"))
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o666 & !umask);
        assert_eq!(
            std::fs::read_dir(dir.path().join("4"))
                .expect("dir")
                .count(),
            1
        );
    }
}
