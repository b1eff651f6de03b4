//! Running a program on N processes with `mpirun` (what `burn-recipes launch` and the
//! multi-process tests use), on this machine or on the hosts of a hostfile, and finding which
//! local GPU a rank owns under any launcher (`mpirun`, `torchrun`-style `LOCAL_RANK`, `srun`).
//!
//! MCA settings: the user's `OMPI_MCA_*` variables reach `mpirun` untouched. Only when the user
//! set none of a setting does a one-machine run get the defaults it needs here: the shared-memory
//! transport (`OMPI_MCA_btl=self,vader`) and oversubscription (more ranks than cores); a run on
//! several hosts (a hostfile or a host list) gets neither. As root, the run-as-root confirmation
//! is added unless the user set it.

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
    /// The hosts to run on: `mpirun --hostfile` or `--host` (none: this machine).
    pub hosts: Hosts,
}

/// Where `mpirun` starts the ranks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Hosts {
    /// This machine only.
    #[default]
    Local,
    /// The hosts (and slots) of an OpenMPI hostfile (`mpirun --hostfile FILE`).
    Hostfile(std::path::PathBuf),
    /// A host list, `host1:slots,host2:slots` (`mpirun --host LIST`).
    List(String),
}

/// Environment variables by which launchers give a process its rank among the processes of its
/// node, in the order they are consulted: OpenMPI's `mpirun`, torchrun-style launchers, Slurm's
/// `srun`, MPICH/Hydra.
pub const LOCAL_RANK_ENV: [&str; 4] = [
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "LOCAL_RANK",
    "SLURM_LOCALID",
    "MPI_LOCALRANKID",
];

/// This process's rank among the processes of its node, from the first launcher variable of
/// [`LOCAL_RANK_ENV`] that is set (`None` outside a launcher). A variable that is set but is
/// not a number is an error naming it.
pub fn local_rank() -> Result<Option<usize>> {
    local_rank_from(|k| std::env::var(k).ok())
}

/// [`local_rank`] from the variables `var` returns.
pub fn local_rank_from(var: impl Fn(&str) -> Option<String>) -> Result<Option<usize>> {
    for key in LOCAL_RANK_ENV {
        if let Some(v) = var(key) {
            return v
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| ParallelError::InvalidArgument {
                    name: key,
                    reason: format!("`{v}` is not a local rank (a non-negative integer)"),
                });
        }
    }
    Ok(None)
}

/// The index, among the GPUs this process sees, of the GPU that local rank `local_rank` owns:
/// with `CUDA_VISIBLE_DEVICES` naming the node's GPUs (`visible`), the local rank modulo their
/// number (a launcher that gives each rank one GPU makes it device 0 of its own list); without
/// it, the local rank itself. Ranks of one node thus use distinct GPUs while there are enough.
pub fn device_index(local_rank: usize, visible: Option<&str>) -> usize {
    let count = visible.map(|v| v.split(',').filter(|d| !d.trim().is_empty()).count());
    match count {
        Some(n) if n > 0 => local_rank % n,
        _ => local_rank,
    }
}

/// The GPU index of this process: [`device_index`] of its [`local_rank`] (0 outside a launcher)
/// and `CUDA_VISIBLE_DEVICES`.
pub fn local_device_index() -> Result<usize> {
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    Ok(device_index(local_rank()?.unwrap_or(0), visible.as_deref()))
}

fn running_as_root() -> bool {
    // The effective user id from /proc (no libc call): `Uid:` real, effective, saved, fs.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
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
            hosts: Hosts::Local,
        }
    }

    /// Runs on `hosts` instead of this machine.
    pub fn hosts(mut self, hosts: Hosts) -> Self {
        self.hosts = hosts;
        self
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

    /// The variables this run adds to the environment `mpirun` inherits (`user` tells which
    /// are set there): the one-machine defaults and the run-as-root confirmation where the user
    /// set none (see the module docs), then [`env`](Self::env).
    pub fn environment(&self, user: impl Fn(&str) -> bool) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        let mut default = |key: &str, value: &str| {
            if !user(key) {
                out.push((key.into(), value.into()));
            }
        };
        if self.hosts == Hosts::Local {
            default("OMPI_MCA_btl", "self,vader");
            default("OMPI_MCA_rmaps_base_oversubscribe", "1");
        }
        if running_as_root() {
            default("OMPI_ALLOW_RUN_AS_ROOT", "1");
            default("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
        }
        out.extend(self.env.iter().cloned());
        out
    }

    /// The `mpirun` arguments: the process count, the hosts, the extra options, the program.
    pub fn arguments(&self) -> Vec<String> {
        let mut args = vec!["-np".to_string(), self.np.to_string()];
        match &self.hosts {
            Hosts::Local => {}
            Hosts::Hostfile(file) => {
                args.extend(["--hostfile".into(), file.display().to_string()]);
            }
            Hosts::List(list) => args.extend(["--host".into(), list.clone()]),
        }
        args.extend(self.mpirun_args.iter().cloned());
        args.extend(self.program.iter().cloned());
        args
    }

    /// The command, ready to spawn.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("mpirun");
        cmd.args(self.arguments());
        for (k, v) in self.environment(|k| std::env::var_os(k).is_some()) {
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
    run_check_program_with(program, name, ranks, timeout_s, limit, &[])
}

/// [`run_check_program`] with extra environment variables `env` on every rank.
pub fn run_check_program_with(
    program: &str,
    name: &str,
    ranks: &[usize],
    timeout_s: u64,
    limit: Duration,
    env: &[(&str, &str)],
) -> Result<String> {
    let mut all = String::new();
    for &np in ranks {
        let mut run = MpiRun::new(np, [program])
            .env(crate::comm::TIMEOUT_ENV, timeout_s.to_string())
            .limit(limit);
        for &(key, value) in env {
            run = run.env(key, value);
        }
        let out = run.run_exclusive()?;
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
    fn user_mca_settings_are_kept_and_defaults_fill_only_what_is_unset() {
        let run = MpiRun::new(2, ["prog"]).env("X", "1");
        let names = |env: Vec<(String, String)>| -> Vec<String> {
            env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
        };
        let local = names(run.environment(|_| false));
        assert!(
            local.contains(&"OMPI_MCA_btl=self,vader".to_string()),
            "{local:?}"
        );
        assert!(local.contains(&"X=1".to_string()));
        let user = names(run.environment(|k| k == "OMPI_MCA_btl"));
        assert!(
            !user.iter().any(|e| e.starts_with("OMPI_MCA_btl=")),
            "{user:?}"
        );
        assert!(user.contains(&"OMPI_MCA_rmaps_base_oversubscribe=1".to_string()));
        let remote = run.clone().hosts(Hosts::Hostfile("hosts.txt".into()));
        let env = names(remote.environment(|_| false));
        assert!(!env.iter().any(|e| e.starts_with("OMPI_MCA_")), "{env:?}");
        assert_eq!(
            remote.arguments(),
            ["-np", "2", "--hostfile", "hosts.txt", "prog"]
        );
        assert_eq!(
            run.hosts(Hosts::List("a:2,b:2".into())).arguments(),
            ["-np", "2", "--host", "a:2,b:2", "prog"]
        );
    }

    #[test]
    fn local_ranks_come_from_any_launcher_and_map_to_distinct_gpus() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(local_rank_from(env(&[])).unwrap(), None);
        assert_eq!(
            local_rank_from(env(&[("SLURM_LOCALID", "3")])).unwrap(),
            Some(3)
        );
        assert_eq!(
            local_rank_from(env(&[("LOCAL_RANK", "1")])).unwrap(),
            Some(1)
        );
        assert_eq!(
            local_rank_from(env(&[
                ("OMPI_COMM_WORLD_LOCAL_RANK", "2"),
                ("LOCAL_RANK", "0")
            ]))
            .unwrap(),
            Some(2)
        );
        let err = local_rank_from(env(&[("LOCAL_RANK", "x")])).unwrap_err();
        assert!(err.to_string().contains("LOCAL_RANK"), "{err}");
        assert_eq!(device_index(5, None), 5);
        assert_eq!(device_index(5, Some("0,1,2,3")), 1);
        assert_eq!(device_index(3, Some("7")), 0);
        assert_eq!(device_index(2, Some("")), 2);
    }

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
