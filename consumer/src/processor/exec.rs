//! `exec`: runs a command per chunk, without a shell.
//!
//! The protocol, for the command's author:
//! - **stdin**: the chunk's items, one JSON value per line, in source order.
//! - **environment**: a clean one, not the consumer's: `PATH`, `HOME` and `LANG` as the
//!   consumer has them, the variables the job names (`[processor] env = ["API_TOKEN"]`), and
//!   `HOPPER_JOB`, `HOPPER_RUN`, `HOPPER_SEQ`, `HOPPER_ATTEMPT` and `HOPPER_FIRST_LINE` (the
//!   source line of the first item). Nothing else of the consumer's environment (its own
//!   secrets: broker or database passwords) reaches the command. `HOPPER_RUN`/`HOPPER_SEQ`
//!   identify the chunk: use them to make the command's effect idempotent.
//! - **working directory**: the job file's directory.
//! - **stdout**: to refuse one item as bad data, print one line
//!   `{"index": N, "reason": "..."}`: a JSON object with exactly these two keys, `N` the 0-based
//!   index of the item on stdin (a whole number below the chunk's item count), `reason` a
//!   string. The item is skipped and reported with its source line. A line that is a JSON object
//!   with an `index` key but does not fit (another key, no reason, a negative, fractional or
//!   too large index) fails the chunk (transiently, the line quoted in the reason): a refusal is
//!   never silently lost. An item refused twice counts once. Every other stdout line is logged at
//!   debug level.
//! - **stderr**: logged by the consumer, line by line (cut at 4 KiB), tagged with the chunk.
//! - **exit status**: 0, the chunk is done (but for the refused items). Anything else, or death
//!   by a signal: a transient failure, and the chunk comes back after the job's backoff.
//! - **cancellation**: the command runs in a process group of its own. When the attempt is
//!   cancelled (processing passed `retry.chunk_timeout`) the whole group is killed, so a script's
//!   own children do not outlive it.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use async_trait::async_trait;
use hopper_common::Chunk;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::process::Command;
use tracing::{debug, warn};

use super::{ProcessError, Processed, Processor};

/// Runs a command per chunk.
#[derive(Debug, Clone)]
pub struct ExecProcessor {
    command: Vec<String>,
    dir: PathBuf,
    /// The consumer's variables the command gets, by name.
    env: Vec<String>,
}

/// The consumer's variables every command gets: what a program needs to find its tools, its
/// home and its language.
const INHERITED: [&str; 3] = ["PATH", "HOME", "LANG"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BadLine {
    index: usize,
    reason: String,
}

impl ExecProcessor {
    /// Runs `command` (program, then arguments) in `dir`.
    ///
    /// # Errors
    /// A message when the program cannot be found: a path relative to `dir`, or a name on `PATH`.
    pub fn new(command: Vec<String>, dir: PathBuf) -> Result<ExecProcessor, String> {
        let program = command
            .first()
            .ok_or_else(|| "the command is empty".to_string())?;
        if !program_exists(program, &dir) {
            return Err(format!(
                "program {program:?} not found or not executable (a path is taken relative to {}; a bare name is looked up on PATH)",
                dir.display()
            ));
        }
        Ok(ExecProcessor {
            command,
            dir,
            env: Vec::new(),
        })
    }

    /// Passes the consumer's variables `names` to the command too (those that are set); see
    /// the module's protocol for what else it gets.
    pub fn with_env(mut self, names: Vec<String>) -> ExecProcessor {
        for name in &names {
            if std::env::var_os(name).is_none() {
                tracing::warn!(variable = %name, "processor.env names a variable the consumer does not have; the command will not get it");
            }
        }
        self.env = names;
        self
    }
}

/// Kills the command's process group when dropped before the command ended: the attempt was
/// cancelled (its future dropped at `chunk_timeout`) or the consumer is going away.
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        let Some(pid) = self.0.and_then(|p| i32::try_from(p).ok()) else {
            return;
        };
        // The group's id is the child's pid (`process_group(0)`). Already gone: nothing to do.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// True when `program` names an executable file: a path relative to `dir`, or a name on `PATH`.
fn program_exists(program: &str, dir: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        return runnable(&dir.join(program));
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|p| runnable(&p.join(program))))
}

/// What one stdout line of the command says.
fn stdout_line(line: &str, items: usize) -> Result<Option<BadLine>, String> {
    let Ok(serde_json::Value::Object(object)) = serde_json::from_str::<serde_json::Value>(line)
    else {
        return Ok(None);
    };
    if !object.contains_key("index") {
        return Ok(None);
    }
    let malformed = || {
        format!(
            "the command printed a malformed refusal line: {}; a refusal is {{\"index\": N, \"reason\": \"...\"}} with N from 0 to {}",
            super::cut(line),
            items.saturating_sub(1)
        )
    };
    match serde_json::from_value::<BadLine>(serde_json::Value::Object(object)) {
        Ok(b) if b.index < items => Ok(Some(b)),
        Ok(_) | Err(_) => Err(malformed()),
    }
}

#[async_trait]
impl Processor for ExecProcessor {
    async fn process(&self, chunk: &Chunk) -> Result<Processed, ProcessError> {
        let program = &self.command[0];
        let mut cmd = Command::new(program);
        cmd.env_clear();
        for name in INHERITED
            .iter()
            .copied()
            .chain(self.env.iter().map(String::as_str))
        {
            if let Some(value) = std::env::var_os(name) {
                cmd.env(name, value);
            }
        }
        let mut child = cmd
            .args(&self.command[1..])
            .process_group(0)
            .current_dir(&self.dir)
            .env("HOPPER_JOB", &chunk.job)
            .env("HOPPER_RUN", chunk.run.to_string())
            .env("HOPPER_SEQ", chunk.seq.to_string())
            .env("HOPPER_ATTEMPT", chunk.attempt.to_string())
            .env("HOPPER_FIRST_LINE", chunk.position.line.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| ProcessError::Transient(format!("cannot start {program:?}: {e}")))?;
        let mut group = GroupGuard(child.id());

        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(ProcessError::Transient(
                "the command's pipes could not be opened".into(),
            ));
        };

        // Feed stdin while reading stdout and stderr, so a chatty command never blocks on a
        // full pipe. A command that stops reading early closes the pipe: its exit status decides.
        let items = chunk.items.len();
        let data: Vec<u8> = chunk.items.iter().fold(Vec::new(), |mut buf, item| {
            buf.extend_from_slice(item.data.as_bytes());
            buf.push(b'\n');
            buf
        });
        let feed = async move {
            let mut w = BufWriter::new(stdin);
            let _ = w.write_all(&data).await;
            let _ = w.shutdown().await;
        };
        let (job, run, seq) = (&chunk.job, chunk.run, chunk.seq);
        let read_stdout = async {
            let (mut bad, mut malformed) = (Vec::new(), None);
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match stdout_line(&line, items) {
                    Ok(Some(b)) => bad.push(b),
                    Ok(None) => {
                        debug!(job = %job, run, seq, stdout = %super::cut(&line), "command output")
                    }
                    Err(why) => malformed = malformed.or(Some(why)),
                }
            }
            (bad, malformed)
        };
        let read_stderr = async {
            let mut last = String::new();
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let line = super::cut(&line);
                warn!(job = %job, run, seq, stderr = %line, "command stderr");
                last = line;
            }
            last
        };
        let ((), (bad, malformed), last_stderr) = tokio::join!(feed, read_stdout, read_stderr);
        let status = child
            .wait()
            .await
            .map_err(|e| ProcessError::Transient(format!("waiting for {program:?}: {e}")))?;
        // It ended by itself: whatever it left running in its group is its own business.
        group.0 = None;
        if !status.success() {
            let mut msg = format!("{program:?} {status}");
            if !last_stderr.is_empty() {
                msg.push_str(&format!("; last stderr line: {last_stderr}"));
            }
            return Err(ProcessError::Transient(msg));
        }
        if let Some(why) = malformed {
            return Err(ProcessError::Transient(why));
        }
        let mut processed = Processed::all_done();
        for b in bad {
            if let Some(item) = chunk.items.get(b.index) {
                processed.bad_item(item, b.reason);
            }
        }
        Ok(processed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hopper_common::{Item, Position};

    fn chunk() -> Chunk {
        Chunk {
            job: "j".into(),
            run: 1,
            seq: 2,
            attempt: 3,
            position: Position {
                line: 10,
                offset: 0,
            },
            key: Vec::new(),
            items: (0..3)
                .map(|i| Item {
                    line: 10 + i,
                    data: format!("{{\"id\":{i}}}"),
                })
                .collect(),
        }
    }

    fn sh(script: &str) -> ExecProcessor {
        ExecProcessor::new(
            vec!["sh".into(), "-c".into(), script.into()],
            std::env::temp_dir(),
        )
        .expect("sh exists")
    }

    #[tokio::test]
    async fn bad_items_are_reported_by_index_with_their_source_line() {
        let p = sh(r#"cat >/dev/null; echo '{"index": 1, "reason": "no price"}'; echo hello"#);
        let out = p.process(&chunk()).await.expect("done");
        assert_eq!(out.bad_items.len(), 1);
        assert_eq!(out.bad_items[0].line, 11);
        assert_eq!(out.bad_items[0].reason, "no price");
    }

    #[tokio::test]
    async fn items_and_identity_reach_the_command() {
        let p = sh(
            r#"n=$(wc -l); [ "$n" = 3 ] && [ "$HOPPER_SEQ" = 2 ] && [ "$HOPPER_ATTEMPT" = 3 ] && [ "$HOPPER_FIRST_LINE" = 10 ]"#,
        );
        p.process(&chunk()).await.expect("done");
    }

    /// A cancelled attempt (its future dropped, as at `chunk_timeout`) kills the command and
    /// what it started: nothing of it keeps running.
    #[tokio::test]
    async fn a_cancelled_command_dies_with_its_children() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pids = dir.path().join("pids");
        let p = sh(&format!(
            "sleep 300 & echo $! > {0}; echo $$ >> {0}; cat >/dev/null; wait",
            pids.display()
        ));
        let chunk = chunk();
        let cancelled =
            tokio::time::timeout(std::time::Duration::from_millis(500), p.process(&chunk)).await;
        assert!(cancelled.is_err(), "the command was still running");
        let written = std::fs::read_to_string(&pids).expect("the script wrote its pids");
        let alive = |pid: &str| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|stat| !stat.contains(") Z "))
                .unwrap_or(false)
        };
        for _ in 0..50 {
            if !written.lines().any(alive) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("still alive after cancellation: {written}");
    }

    #[tokio::test]
    async fn a_failing_command_is_transient_with_its_last_stderr_line() {
        let p = sh("echo first >&2; echo boom >&2; exit 3");
        match p.process(&chunk()).await {
            Err(ProcessError::Transient(msg)) => {
                assert!(msg.contains("exit status: 3"), "{msg}");
                assert!(msg.contains("boom"), "{msg}");
            }
            other => panic!("expected a transient failure, got {other:?}"),
        }
    }

    #[test]
    fn a_missing_program_is_refused_up_front() {
        let err = ExecProcessor::new(vec!["no-such-program-hopper".into()], std::env::temp_dir())
            .expect_err("missing");
        assert!(err.contains("no-such-program-hopper"));
    }
}
