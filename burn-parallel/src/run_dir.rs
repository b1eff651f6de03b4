//! A training run's folder: its lock (one process trains into a folder at a time) and its
//! `metrics.jsonl` (one JSON object a line, each with its `step`), which a resumed run
//! continues without the lines of steps it did not keep. Checkpoints live beside them (see
//! [`crate::checkpoint`]).
//!
//! ```
//! use burn_parallel::run_dir::{MetricsLog, RunLock};
//!
//! let run = std::env::temp_dir().join(format!("run-dir-doc-{}", std::process::id()));
//! let lock = RunLock::acquire(&run).unwrap();
//! assert!(RunLock::acquire(&run).is_err()); // this process holds it
//! let mut log = MetricsLog::create(&run.join("metrics.jsonl")).unwrap();
//! for step in 1..=3 {
//!     log.write(&serde_json::json!({ "step": step, "loss": 1.0 / step as f64 })).unwrap();
//! }
//! // A run resumed from its checkpoint of step 2 drops the line of step 3.
//! let log = MetricsLog::resume(&run.join("metrics.jsonl"), 2).unwrap();
//! assert_eq!(std::fs::read_to_string(log.path()).unwrap().lines().count(), 2);
//! drop(lock);
//! # std::fs::remove_dir_all(&run).unwrap();
//! ```

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{ParallelError, Result};
use crate::launch::LocalProcess;

/// The lock of a run folder (`RUN_DIR/.lock` holding the pid of its process), removed when
/// dropped. A lock whose process is gone (a killed run; a zombie counts as gone) is taken over.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
}

impl RunLock {
    /// Takes the lock of `run` (the folder is created when missing), or refuses naming the
    /// process that holds it ([`ParallelError::Locked`]).
    pub fn acquire(run: &Path) -> Result<Self> {
        std::fs::create_dir_all(run).map_err(|e| ParallelError::io(run, e))?;
        let path = run.join(".lock");
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    write!(f, "{}", std::process::id()).map_err(|e| ParallelError::io(&path, e))?;
                    return Ok(Self { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    let alive = holder
                        .trim()
                        .parse::<u32>()
                        .ok()
                        .and_then(LocalProcess::of)
                        .is_some_and(|p| p.is_running());
                    if alive {
                        return Err(ParallelError::Locked(format!(
                            "process {} is training into {} ({}); wait for it or stop it",
                            holder.trim(),
                            run.display(),
                            path.display()
                        )));
                    }
                    // Left by a process that is gone: take it over.
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => return Err(ParallelError::io(&path, e)),
            }
        }
        Err(ParallelError::Locked(format!(
            "{} could not be taken",
            path.display()
        )))
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A run's `metrics.jsonl`, open for appending.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// A new, empty log at `path` (an earlier file is replaced).
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).map_err(|e| ParallelError::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// The log at `path` continued after `step`: lines of later steps (logged by a run killed
    /// before its next checkpoint, never part of the run that resumes) are dropped, so every
    /// step appears once; `step` 0 starts an empty log.
    pub fn resume(path: &Path, step: usize) -> Result<Self> {
        let kept: String = if step == 0 || !path.exists() {
            String::new()
        } else {
            let text = std::fs::read_to_string(path).map_err(|e| ParallelError::io(path, e))?;
            text.lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s as usize <= step)
                })
                .map(|l| format!("{l}\n"))
                .collect()
        };
        std::fs::write(path, kept).map_err(|e| ParallelError::io(path, e))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| ParallelError::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends `line` as one JSON line.
    pub fn write(&mut self, line: &impl Serialize) -> Result<()> {
        let text = serde_json::to_string(line).map_err(|e| ParallelError::io(&self.path, e))?;
        writeln!(self.file, "{text}").map_err(|e| ParallelError::io(&self.path, e))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_left_by_a_dead_process_is_taken_over_and_a_live_one_is_refused() {
        let run = std::env::temp_dir().join(format!("run-dir-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run);
        std::fs::create_dir_all(&run).expect("folder");
        // A child that has exited but is not reaped yet (a zombie: its pid still exists).
        let mut gone = std::process::Command::new("true").spawn().expect("true");
        let pid = gone.id();
        let zombie = LocalProcess::of(pid).expect("the child");
        while zombie.is_running() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        std::fs::write(run.join(".lock"), pid.to_string()).expect("write");
        let lock = RunLock::acquire(&run).expect("taken over");
        gone.wait().expect("wait");
        assert_eq!(
            std::fs::read_to_string(run.join(".lock")).expect("read"),
            std::process::id().to_string()
        );
        match RunLock::acquire(&run) {
            Err(ParallelError::Locked(m)) => {
                assert!(m.contains(&std::process::id().to_string()), "{m}")
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(lock);
        assert!(!run.join(".lock").exists());
        std::fs::remove_dir_all(&run).expect("clean up");
    }

    #[test]
    fn a_resumed_log_keeps_the_steps_up_to_its_checkpoint() {
        let dir = std::env::temp_dir().join(format!("run-dir-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("folder");
        let path = dir.join("metrics.jsonl");
        let mut log = MetricsLog::create(&path).expect("create");
        for step in [1, 2, 3, 4, 5] {
            log.write(&serde_json::json!({ "step": step }))
                .expect("write");
        }
        drop(log);
        let mut log = MetricsLog::resume(&path, 3).expect("resume");
        log.write(&serde_json::json!({ "step": 4 })).expect("write");
        let steps: Vec<u64> = std::fs::read_to_string(&path)
            .expect("read")
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).expect("json")["step"]
                    .as_u64()
                    .expect("step")
            })
            .collect();
        assert_eq!(steps, [1, 2, 3, 4]);
        MetricsLog::resume(&path, 0).expect("fresh");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
