//! The engine thread shared by the multi-rank engines: it owns the engine's state (MPI or NCCL
//! communicators), runs jobs with owned buffers, and lets callers give up after a timeout
//! without freeing anything the engine may still touch. Dead peers are found by process.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{ParallelError, Result};

type Job<S> = Box<dyn FnOnce(&mut S) + Send>;

/// Host and PID of a world rank, shared at start-up to find dead peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Peer {
    pub host: u64,
    pub pid: u64,
}

impl Peer {
    /// This process.
    pub fn me() -> Self {
        Self {
            host: host_id(),
            pid: u64::from(std::process::id()),
        }
    }
}

/// A thread owning engine state `S`; see the module docs.
pub(crate) struct Worker<S> {
    engine: &'static str,
    jobs: Mutex<Option<Sender<Job<S>>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    timeout: Duration,
    failure: Mutex<Option<ParallelError>>,
    peers: Mutex<Arc<[Peer]>>,
    world_rank: usize,
}

impl<S> std::fmt::Debug for Worker<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("engine", &self.engine)
            .field("timeout", &self.timeout)
            .field("world_rank", &self.world_rank)
            .finish()
    }
}

impl<S: 'static> Worker<S> {
    /// Starts the thread: `init` builds the state there and returns it with a value for the
    /// caller (for example the rank and size). Waits at most `timeout` for it.
    pub fn spawn<T: Send + 'static>(
        engine: &'static str,
        timeout: Duration,
        init: impl FnOnce() -> Result<(S, T)> + Send + 'static,
    ) -> Result<(Self, T)> {
        let (job_tx, job_rx) = mpsc::channel::<Job<S>>();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(format!("burn-parallel-{engine}"))
            .spawn(move || {
                let (state, value) = match init() {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(value));
                run_jobs(state, job_rx);
            })
            .map_err(|e| ParallelError::Unavailable {
                engine,
                reason: format!("cannot start the engine thread: {e}"),
            })?;
        let value = match ready_rx.recv_timeout(timeout) {
            Ok(v) => v?,
            Err(RecvTimeoutError::Timeout) => {
                return Err(ParallelError::Timeout {
                    op: "init",
                    group: Vec::new(),
                    after: timeout,
                });
            }
            Err(RecvTimeoutError::Disconnected) => return Err(gone(engine, "init")),
        };
        let worker = Self {
            engine,
            jobs: Mutex::new(Some(job_tx)),
            thread: Mutex::new(Some(thread)),
            timeout,
            failure: Mutex::new(None),
            peers: Mutex::new(Arc::from(Vec::new())),
            world_rank: 0,
        };
        Ok((worker, value))
    }

    /// Sets what dead-peer detection needs: every world rank's process and this one's rank.
    pub fn set_peers(&mut self, peers: Vec<Peer>, world_rank: usize) {
        self.peers = Mutex::new(Arc::from(peers));
        self.world_rank = world_rank;
    }

    /// The timeout of every call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs `f` on the engine thread and waits for its answer, at most the timeout. On timeout
    /// the peers of `group` (world ranks) are checked, the worker is poisoned and the error
    /// names the dead peers.
    pub fn call<T, F>(&self, op: &'static str, group: &[usize], f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut S) -> Result<T> + Send + 'static,
    {
        if let Some(err) = self.failure.lock().map_err(|_| lock_error())?.clone() {
            return Err(ParallelError::Poisoned(err.to_string()));
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job<S> = Box::new(move |state| {
            let _ = tx.send(f(state));
        });
        {
            let jobs = self.jobs.lock().map_err(|_| lock_error())?;
            let sender = jobs.as_ref().ok_or(ParallelError::Unavailable {
                engine: self.engine,
                reason: "the engine was shut down".into(),
            })?;
            sender.send(job).map_err(|_| gone(self.engine, op))?;
        }
        match rx.recv_timeout(self.timeout) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => {
                let err = self.diagnose(op, group);
                if let Ok(mut failure) = self.failure.lock() {
                    *failure = Some(err.clone());
                }
                Err(err)
            }
            Err(RecvTimeoutError::Disconnected) => Err(gone(self.engine, op)),
        }
    }

    /// Stops the thread after its queued jobs (the state is dropped there). A failed worker may
    /// be stuck inside the engine forever: it is not waited for.
    pub fn shutdown(&self) {
        let failed = self.failure.lock().map(|f| f.is_some()).unwrap_or(true);
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.take();
        }
        if !failed
            && let Ok(mut thread) = self.thread.lock()
            && let Some(thread) = thread.take()
        {
            let _ = thread.join();
        }
    }

    fn diagnose(&self, op: &'static str, group: &[usize]) -> ParallelError {
        let peers = self
            .peers
            .lock()
            .map(|p| p.clone())
            .unwrap_or_else(|_| Arc::from(Vec::new()));
        let mut lost = Vec::new();
        let mut details = Vec::new();
        if let Some(me) = peers.get(self.world_rank) {
            for &rank in group {
                let Some(peer) = peers.get(rank) else {
                    continue;
                };
                if rank == self.world_rank || peer.host != me.host {
                    continue;
                }
                if let Some(state) = process_state(peer.pid)
                    && state != 'Z'
                    && state != 'X'
                {
                    continue;
                }
                lost.push(rank);
                details.push(format!("rank {rank} (pid {}) is gone", peer.pid));
            }
        }
        if lost.is_empty() {
            ParallelError::Timeout {
                op,
                group: group.to_vec(),
                after: self.timeout,
            }
        } else {
            ParallelError::PeerLost {
                op,
                group: group.to_vec(),
                lost,
                detail: format!("{} after waiting {:?}", details.join(", "), self.timeout),
            }
        }
    }
}

impl<S> Drop for Worker<S> {
    fn drop(&mut self) {
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.take();
        }
    }
}

fn run_jobs<S>(mut state: S, jobs: Receiver<Job<S>>) {
    while let Ok(job) = jobs.recv() {
        job(&mut state);
    }
}

/// State letter of a local process (`R`, `S`, `Z`, …), `None` when there is no such process.
fn process_state(pid: u64) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Format: `pid (comm) state ...`; comm may contain spaces and parentheses.
    let after = &stat[stat.rfind(')')? + 1..];
    after.trim_start().chars().next()
}

fn host_id() -> u64 {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default();
    crate::rng::name_key(name.trim())
}

fn lock_error() -> ParallelError {
    ParallelError::Poisoned("a thread panicked while holding an engine lock".into())
}

fn gone(engine: &'static str, op: &'static str) -> ParallelError {
    ParallelError::Engine {
        engine,
        op,
        reason: "the engine thread stopped".into(),
    }
}
