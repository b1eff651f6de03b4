//! Running a program on N local processes with `mpirun` (what `burn-recipes launch` and the
//! multi-process tests use). Sets what OpenMPI needs on one machine: shared-memory transport,
//! oversubscription (more ranks than cores) and, as root, the run-as-root confirmation.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{ParallelError, Result};

/// One `mpirun` invocation.
#[derive(Debug, Clone)]
pub struct MpiRun {
    /// Number of processes.
    pub np: usize,
    /// Extra `mpirun` options (for example `--enable-recovery`).
    pub mpirun_args: Vec<String>,
    /// The program and its arguments.
    pub program: Vec<String>,
    /// Extra environment variables of every rank.
    pub env: Vec<(String, String)>,
    /// Kill the run after this long.
    pub limit: Duration,
}

/// What every rank of a [`run_with_reports`] run left: its exit status and its report.
#[derive(Debug, Clone)]
pub struct RankReports {
    /// What `mpirun` printed.
    pub output: RunOutput,
    /// Each rank's exit status as the shell printed it (empty if the rank left none).
    pub exits: Vec<String>,
    /// What each rank wrote to `$BURN_PARALLEL_REPORT_DIR/rank-R.txt` (empty if nothing).
    pub reports: Vec<String>,
}

/// Runs `program` on `np` ranks under `mpirun --enable-recovery` (survivors of a lost peer keep
/// running) with the communicators' timeout at `timeout_s`, and collects each rank's exit
/// status and report file: `mpirun` reports no exit status once recovery is enabled, and the
/// ranks' output lines may interleave. The check programs write their verdict to
/// `$BURN_PARALLEL_REPORT_DIR/rank-R.txt`.
pub fn run_with_reports(
    np: usize,
    program: &str,
    timeout_s: u64,
    limit: Duration,
) -> Result<RankReports> {
    let dir = std::env::temp_dir().join(format!(
        "burn-parallel-reports-{}-{}",
        std::process::id(),
        program.rsplit('/').next().unwrap_or("program")
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| ParallelError::InvalidArgument {
        name: "report folder",
        reason: format!("{}: {e}", dir.display()),
    })?;
    let script = format!(
        "\"{program}\"; echo $? > \"{}/exit-$OMPI_COMM_WORLD_RANK.txt\"",
        dir.display()
    );
    let output = MpiRun::new(np, ["sh", "-c", script.as_str()])
        .mpirun_arg("--enable-recovery")
        .env("BURN_PARALLEL_TIMEOUT_S", timeout_s.to_string())
        .env("BURN_PARALLEL_REPORT_DIR", dir.display().to_string())
        .limit(limit)
        .run_exclusive();
    let read = |name: String| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let exits = (0..np)
        .map(|r| read(format!("exit-{r}.txt")).trim().to_string())
        .collect();
    let reports = (0..np).map(|r| read(format!("rank-{r}.txt"))).collect();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(RankReports {
        output: output?,
        exits,
        reports,
    })
}

/// What a finished run printed.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// Whether `mpirun` exited with status 0.
    pub success: bool,
    /// Standard output of all ranks.
    pub stdout: String,
    /// Standard error of all ranks.
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
}

impl MpiRun {
    /// `mpirun -np N PROGRAM…` with a 10-minute limit.
    pub fn new(np: usize, program: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            np,
            mpirun_args: Vec::new(),
            program: program.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            limit: Duration::from_secs(600),
        }
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Adds an `mpirun` option.
    pub fn mpirun_arg(mut self, arg: impl Into<String>) -> Self {
        self.mpirun_args.push(arg.into());
        self
    }

    /// Sets the time limit.
    pub fn limit(mut self, limit: Duration) -> Self {
        self.limit = limit;
        self
    }

    /// The command, ready to spawn.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("mpirun");
        cmd.args(["-np", &self.np.to_string()])
            .args(&self.mpirun_args)
            .args(&self.program)
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .env("OMPI_MCA_btl", "self,vader")
            .env("OMPI_MCA_rmaps_base_oversubscribe", "1");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// [`run`](Self::run), one job at a time in this process (concurrent `mpirun` jobs
    /// oversubscribe the cores and distort timeouts).
    pub fn run_exclusive(&self) -> Result<RunOutput> {
        static EXCLUSIVE: Mutex<()> = Mutex::new(());
        let _one = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
        self.run()
    }

    /// Runs to completion, capturing the output; kills the run after the limit.
    pub fn run(&self) -> Result<RunOutput> {
        if self.np == 0 || self.program.is_empty() {
            return Err(ParallelError::InvalidArgument {
                name: if self.np == 0 { "np" } else { "program" },
                reason: "needs at least one process and a program".into(),
            });
        }
        let unavailable = |reason: String| ParallelError::Unavailable {
            engine: "mpirun",
            reason,
        };
        let start = Instant::now();
        let mut child = self
            .command()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                unavailable(format!("cannot start mpirun ({e}); run scripts/setup-mpi"))
            })?;
        let reader = |pipe: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut s = String::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_string(&mut s);
                }
                s
            })
        };
        let out = reader(
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let err = reader(
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let status = loop {
            if let Some(status) = child.try_wait().map_err(|e| unavailable(e.to_string()))? {
                break status;
            }
            if start.elapsed() > self.limit {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ParallelError::Timeout {
                    op: "mpirun",
                    group: (0..self.np).collect(),
                    after: self.limit,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(RunOutput {
            success: status.success(),
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
            elapsed: start.elapsed(),
        })
    }
}

/// Runs a check program (one built on [`check_program`]) under `mpirun -np N` for each N of
/// `ranks`, one job at a time, every blocking call timing out after `timeout_s` seconds and each
/// run killed after `limit`. Returns the runs' standard output, or the first failure: a run that
/// did not succeed, or whose output lacks `"{name} (N ranks):"`.
pub fn run_check_program(
    program: &str,
    name: &str,
    ranks: &[usize],
    timeout_s: u64,
    limit: Duration,
) -> Result<String> {
    let mut all = String::new();
    for &np in ranks {
        let out = MpiRun::new(np, [program])
            .env(crate::comm::TIMEOUT_ENV, timeout_s.to_string())
            .limit(limit)
            .run_exclusive()?;
        let failed = |reason: String| ParallelError::CheckFailed {
            program: program.to_string(),
            np,
            reason,
        };
        if !out.success {
            return Err(failed(format!("{}\n{}", out.stdout, out.stderr)));
        }
        let line = format!("{name} ({np} ranks):");
        if !out.stdout.contains(&line) {
            return Err(failed(format!("no `{line}` in:\n{}", out.stdout)));
        }
        all.push_str(&out.stdout);
    }
    Ok(all)
}

/// Norm-wise relative error `‖got − want‖ / ‖want‖` of a check program's result (the absolute
/// norm of the difference when `want` is zero; infinite when the lengths differ).
pub fn rel_error(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|b| f64::from(*b).powi(2)).sum();
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

/// The `main` of a multi-rank check program (feature `mpi`): initialises MPI from the
/// environment, runs `check` (which returns the line to print on success and the failures
/// found on this rank), shares whether any rank failed, finalises MPI, and reports — rank 0
/// prints the success line when no rank failed; otherwise every rank prints its failures (a
/// rank that found none but whose peers did says so) and exits 1.
#[cfg(feature = "mpi")]
pub fn check_program(
    check: impl FnOnce(&crate::comm::mpi::MpiWorld) -> Result<(String, Vec<String>), String>,
) -> std::process::ExitCode {
    use std::process::ExitCode;

    use crate::comm::ReduceOp;
    use crate::comm::mpi::{MpiConfig, MpiWorld};

    let world = match MpiConfig::from_env().and_then(MpiWorld::init) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let rank = world.rank();
    let result = check(&world).and_then(|(line, mut failures)| {
        let mut any = [failures.len() as f32];
        world
            .communicator()
            .all_reduce(&mut any, ReduceOp::Sum)
            .map_err(|e| e.to_string())?;
        if any[0] > 0.0 && failures.is_empty() {
            failures.push("another rank failed".into());
        }
        Ok((line, failures))
    });
    drop(world);
    match result {
        Ok((line, failures)) if failures.is_empty() => {
            if rank == 0 {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Ok((_, failures)) => {
            for f in failures {
                eprintln!("rank {rank}: {f}");
            }
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("rank {rank}: error: {e}");
            ExitCode::from(1)
        }
    }
}

/// A process on this host, named by its pid and its start time (so that a pid the kernel has
/// handed to a new process since is not mistaken for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalProcess {
    /// Process id.
    pub pid: u32,
    /// Start time in clock ticks after boot (`/proc/PID/stat`, field 22).
    pub start: u64,
}

/// The state letter, parent pid and start time of `pid` from `/proc/PID/stat` (`None` when the
/// process is gone or the system has no `/proc`).
fn proc_stat(pid: u32) -> Option<(char, u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: the fields after it start
    // after its last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let parent = fields.get(1)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, parent, start))
}

impl LocalProcess {
    /// `pid` as it is now, if it exists.
    pub fn of(pid: u32) -> Option<Self> {
        proc_stat(pid).map(|(_, _, start)| Self { pid, start })
    }

    /// Whether this process still runs: it exists, is the same process (start time) and is not
    /// a zombie (exited, not yet reaped by its parent).
    pub fn is_running(&self) -> bool {
        proc_stat(self.pid).is_some_and(|(state, _, start)| {
            start == self.start && !matches!(state, 'Z' | 'X' | 'x')
        })
    }
}

/// The children of `parent` on this host: for `mpirun`, the ranks it started here. OpenMPI
/// gives each rank its own process group, so a signal to the launcher's group misses them.
pub fn children(parent: u32) -> Vec<LocalProcess> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let (_, ppid, start) = proc_stat(pid)?;
            (ppid == parent).then_some(LocalProcess { pid, start })
        })
        .collect()
}

/// Waits, at most `grace`, until none of `processes` runs any more, then kills (SIGKILL) those
/// that still do and returns their pids. `mpirun` may exit before the ranks it told to stop
/// are gone; a launcher that returns only after this leaves no rank behind (holding a run's
/// lock or a device).
pub fn reap(processes: &[LocalProcess], grace: Duration) -> Vec<u32> {
    let began = Instant::now();
    while processes.iter().any(LocalProcess::is_running) && began.elapsed() < grace {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left: Vec<&LocalProcess> = processes.iter().filter(|p| p.is_running()).collect();
    for p in &left {
        let _ = Command::new("kill")
            .args(["-KILL", &p.pid.to_string()])
            .status();
    }
    let killed = Instant::now();
    while left.iter().any(|p| p.is_running()) && killed.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    left.iter().map(|p| p.pid).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reap_waits_for_children_that_exit_and_kills_the_rest() {
        let mut quick = Command::new("sleep").arg("0.2").spawn().expect("sleep");
        let mut stuck = Command::new("sleep").arg("60").spawn().expect("sleep");
        let mine = children(std::process::id());
        let quick_p = LocalProcess::of(quick.id()).expect("the first child");
        let stuck_p = LocalProcess::of(stuck.id()).expect("the second child");
        assert!(
            mine.contains(&quick_p) && mine.contains(&stuck_p),
            "{mine:?}"
        );
        // Not reaped by this process yet: the first becomes a zombie, which counts as gone.
        let killed = reap(&[quick_p, stuck_p], Duration::from_secs(2));
        assert_eq!(killed, vec![stuck.id()]);
        assert!(!quick_p.is_running() && !stuck_p.is_running());
        assert!(quick.wait().expect("wait").success());
        assert!(!stuck.wait().expect("wait").success());
        // A pid with another start time is another process.
        let other = LocalProcess {
            pid: std::process::id(),
            start: LocalProcess::of(std::process::id()).expect("self").start + 1,
        };
        assert!(!other.is_running());
    }
}
