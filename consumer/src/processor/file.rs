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
            let mut tmp = tempfile::NamedTempFile::new_in(&dir)?;
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
        assert_eq!(
            std::fs::read_dir(dir.path().join("4"))
                .expect("dir")
                .count(),
            1
        );
    }
}
