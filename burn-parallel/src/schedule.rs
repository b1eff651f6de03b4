//! Pipeline schedules: the order in which each pipeline stage runs the forward and backward
//! passes of its micro-batches, as Megatron-Core's `pipeline_parallel/schedules.py` orders them.
//!
//! - [`ScheduleKind::GPipe`]: every forward, then every backward (micro-batches in order).
//! - [`ScheduleKind::OneFOneB`] (PipeDream-flush, Megatron's non-interleaved schedule): stage `s`
//!   of `p` runs `min(p − s − 1, m)` warm-up forwards, then alternates one forward and one
//!   backward, then drains the remaining backwards. At most `p − s` micro-batches' activations
//!   are alive on stage `s`.
//! - [`ScheduleKind::Interleaved`]: each rank holds `v` model chunks; chunk `c` of stage `s` is
//!   virtual stage `c·p + s`. Micro-batches enter chunks in groups of `g` (Megatron's
//!   `microbatch_group_size_per_vp_stage`, `p` by default): the forward order of virtual
//!   micro-batches is `(mb, chunk)` = group by group, chunk by chunk, micro-batch by
//!   micro-batch; the backward order is the same with chunks reversed. Warm-up is
//!   `(p − s − 1)·2 + (v − 1)·g` forwards (all of them when that reaches `m·v`).
//!
//! The bubble (idle share of a stage's time when a forward takes `1/v` and a backward `2/v` of a
//! layer-block's time and communication is free) is `(p − 1) / (m + p − 1)` for 1F1B and GPipe
//! and `((p − 1)/v) / (m + (p − 1)/v)` interleaved; [`Schedule::simulate`] replays a schedule
//! under those costs, waiting for each step's inputs, and reports the makespan, the bubble and
//! the largest number of micro-batches in flight, or the stages that wait forever (a deadlock).
//! Sends are modelled as buffered (they never wait for the receiver); receives wait.

use crate::error::{ParallelError, Result};

/// Which schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    /// All forwards, then all backwards.
    GPipe,
    /// One forward, one backward (Megatron's non-interleaved schedule).
    OneFOneB,
    /// 1F1B over `virtual_stages` model chunks per rank; `group` micro-batches enter a chunk
    /// together (`None`: the pipeline size when it divides the micro-batches, else all of them).
    Interleaved {
        /// Model chunks per rank (`v`).
        virtual_stages: usize,
        /// Megatron's `microbatch_group_size_per_vp_stage`.
        group: Option<usize>,
    },
}

/// Forward or backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pass {
    /// Forward pass.
    Forward,
    /// Backward pass.
    Backward,
}

/// One step of a stage: a pass of one micro-batch through one of the stage's model chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Step {
    /// Forward or backward.
    pub pass: Pass,
    /// Micro-batch index.
    pub microbatch: usize,
    /// Model chunk on this stage (0 unless interleaved).
    pub chunk: usize,
}

impl Step {
    /// A forward step.
    pub fn forward(microbatch: usize, chunk: usize) -> Self {
        Self {
            pass: Pass::Forward,
            microbatch,
            chunk,
        }
    }

    /// A backward step.
    pub fn backward(microbatch: usize, chunk: usize) -> Self {
        Self {
            pass: Pass::Backward,
            microbatch,
            chunk,
        }
    }
}

/// Every stage's steps, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    kind: ScheduleKind,
    stages: usize,
    microbatches: usize,
    chunks: usize,
    steps: Vec<Vec<Step>>,
}

/// What replaying a schedule gives.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeline {
    /// Time until the last stage finishes (a layer block's forward + backward = 3 units).
    pub makespan: f64,
    /// Idle share of the stages' time.
    pub bubble: f64,
    /// Per stage, the most micro-batch chunks whose forward ran and backward did not yet.
    pub in_flight: Vec<usize>,
}

fn invalid(name: &'static str, reason: impl Into<String>) -> ParallelError {
    ParallelError::InvalidArgument {
        name,
        reason: reason.into(),
    }
}

impl Schedule {
    /// The schedule of `kind` for `stages` pipeline stages and `microbatches` micro-batches.
    pub fn new(kind: ScheduleKind, stages: usize, microbatches: usize) -> Result<Self> {
        if stages == 0 {
            return Err(invalid("stages", "must be at least 1"));
        }
        if microbatches == 0 {
            return Err(invalid("microbatches", "must be at least 1"));
        }
        let (p, m) = (stages, microbatches);
        let (chunks, steps) = match kind {
            ScheduleKind::GPipe => {
                let steps = (0..p)
                    .map(|_| {
                        (0..m)
                            .map(|i| Step::forward(i, 0))
                            .chain((0..m).map(|i| Step::backward(i, 0)))
                            .collect()
                    })
                    .collect();
                (1, steps)
            }
            ScheduleKind::OneFOneB => {
                let steps = (0..p)
                    .map(|s| {
                        let warmup = (p - s - 1).min(m);
                        let mut out: Vec<Step> = (0..warmup).map(|i| Step::forward(i, 0)).collect();
                        for i in 0..m - warmup {
                            out.push(Step::forward(warmup + i, 0));
                            out.push(Step::backward(i, 0));
                        }
                        out.extend((m - warmup..m).map(|i| Step::backward(i, 0)));
                        out
                    })
                    .collect();
                (1, steps)
            }
            ScheduleKind::Interleaved {
                virtual_stages: v,
                group,
            } => {
                if v == 0 {
                    return Err(invalid("virtual_stages", "must be at least 1"));
                }
                if m < p {
                    return Err(invalid(
                        "microbatches",
                        format!(
                            "the interleaved schedule needs at least {p} (the pipeline size), got {m}"
                        ),
                    ));
                }
                let g = group.unwrap_or(if m.is_multiple_of(p) { p } else { m });
                if g < p || g > m {
                    return Err(invalid(
                        "group",
                        format!(
                            "must lie between the pipeline size {p} and the micro-batches {m}, got {g}"
                        ),
                    ));
                }
                if m % g != 0 && m % g < p {
                    return Err(invalid(
                        "group",
                        format!(
                            "the last group of {} micro-batches is smaller than the pipeline size {p}",
                            m % g
                        ),
                    ));
                }
                // Virtual micro-batch k → (micro-batch, chunk), forward order.
                let mut table = Vec::with_capacity(m * v);
                let mut first = 0;
                while first < m {
                    let last = (first + g).min(m);
                    for c in 0..v {
                        table.extend((first..last).map(|i| (i, c)));
                    }
                    first = last;
                }
                let total = m * v;
                let steps = (0..p)
                    .map(|s| {
                        let warmup = ((p - s - 1) * 2 + (v - 1) * g).min(total);
                        let fwd = |k: usize| Step::forward(table[k].0, table[k].1);
                        let bwd = |k: usize| Step::backward(table[k].0, v - 1 - table[k].1);
                        let mut out: Vec<Step> = (0..warmup).map(fwd).collect();
                        for i in 0..total - warmup {
                            out.push(fwd(warmup + i));
                            out.push(bwd(i));
                        }
                        out.extend((total - warmup..total).map(bwd));
                        out
                    })
                    .collect();
                (v, steps)
            }
        };
        Ok(Self {
            kind,
            stages: p,
            microbatches: m,
            chunks,
            steps,
        })
    }

    /// The schedule's kind.
    pub fn kind(&self) -> ScheduleKind {
        self.kind
    }

    /// Pipeline stages.
    pub fn stages(&self) -> usize {
        self.stages
    }

    /// Micro-batches.
    pub fn microbatches(&self) -> usize {
        self.microbatches
    }

    /// Model chunks per stage.
    pub fn chunks(&self) -> usize {
        self.chunks
    }

    /// The steps of `stage`, in order.
    pub fn stage(&self, stage: usize) -> &[Step] {
        &self.steps[stage]
    }

    /// The virtual stage (position in the whole model) of `chunk` on `stage`.
    pub fn virtual_stage(&self, stage: usize, chunk: usize) -> usize {
        chunk * self.stages + stage
    }

    /// The bubble the schedule's formula gives: `(p − 1)/(m + p − 1)` for GPipe and 1F1B,
    /// `((p − 1)/v) / (m + (p − 1)/v)` interleaved.
    pub fn bubble_fraction(&self) -> f64 {
        let (p, m, v) = (
            self.stages as f64,
            self.microbatches as f64,
            self.chunks as f64,
        );
        let idle = (p - 1.0) / v;
        idle / (m + idle)
    }

    /// Replays the schedule: a forward of one chunk takes `1/v`, a backward `2/v`; a forward
    /// waits for the previous virtual stage's forward of its micro-batch, a backward for the
    /// next virtual stage's backward (and its own forward). Fails, naming the stuck stages,
    /// when no stage can proceed.
    pub fn simulate(&self) -> Result<Timeline> {
        let (p, v, m) = (self.stages, self.chunks, self.microbatches);
        let vs_count = p * v;
        let cost = |pass: Pass| match pass {
            Pass::Forward => 1.0 / v as f64,
            Pass::Backward => 2.0 / v as f64,
        };
        // Finish time of each (pass, micro-batch, virtual stage).
        let mut done_f = vec![vec![None::<f64>; vs_count]; m];
        let mut done_b = vec![vec![None::<f64>; vs_count]; m];
        let mut next = vec![0usize; p];
        let mut clock = vec![0f64; p];
        let mut busy = vec![0f64; p];
        let mut alive = vec![0usize; p];
        let mut in_flight = vec![0usize; p];
        loop {
            let mut progressed = false;
            for s in 0..p {
                while let Some(step) = self.steps[s].get(next[s]).copied() {
                    let vs = self.virtual_stage(s, step.chunk);
                    let mb = step.microbatch;
                    let ready = match step.pass {
                        Pass::Forward if done_f[mb][vs].is_some() => {
                            return Err(invalid(
                                "schedule",
                                format!(
                                    "stage {s} runs the forward of {mb} on chunk {} twice",
                                    step.chunk
                                ),
                            ));
                        }
                        Pass::Forward if vs == 0 => Some(0.0),
                        Pass::Forward => done_f[mb][vs - 1],
                        Pass::Backward if done_b[mb][vs].is_some() => {
                            return Err(invalid(
                                "schedule",
                                format!(
                                    "stage {s} runs the backward of {mb} on chunk {} twice",
                                    step.chunk
                                ),
                            ));
                        }
                        Pass::Backward => match done_f[mb][vs] {
                            None => None,
                            Some(own) if vs + 1 == vs_count => Some(own),
                            Some(own) => done_b[mb][vs + 1].map(|t: f64| t.max(own)),
                        },
                    };
                    let Some(ready) = ready else { break };
                    let start = clock[s].max(ready);
                    let end = start + cost(step.pass);
                    clock[s] = end;
                    busy[s] += cost(step.pass);
                    match step.pass {
                        Pass::Forward => {
                            done_f[mb][vs] = Some(end);
                            alive[s] += 1;
                            in_flight[s] = in_flight[s].max(alive[s]);
                        }
                        Pass::Backward => {
                            done_b[mb][vs] = Some(end);
                            alive[s] -= 1;
                        }
                    }
                    next[s] += 1;
                    progressed = true;
                }
            }
            let stuck: Vec<usize> = (0..p).filter(|&s| next[s] < self.steps[s].len()).collect();
            if stuck.is_empty() {
                break;
            }
            if !progressed {
                return Err(invalid(
                    "schedule",
                    format!("deadlock: stages {stuck:?} wait forever"),
                ));
            }
        }
        for (mb, row) in done_b.iter().enumerate() {
            if let Some(vs) = row.iter().position(Option::is_none) {
                return Err(invalid(
                    "schedule",
                    format!("the backward of micro-batch {mb} never runs on virtual stage {vs}"),
                ));
            }
        }
        let makespan = clock.iter().copied().fold(0.0, f64::max);
        let bubble = 1.0 - busy.iter().sum::<f64>() / (makespan * p as f64);
        Ok(Timeline {
            makespan,
            bubble,
            in_flight,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Vec<Step> {
        // "F1 B1 f2 b2": upper case chunk 0, lower case chunk 1; micro-batches 1-based.
        text.split_whitespace()
            .map(|t| {
                let (kind, mb) = t.split_at(1);
                let mb: usize = mb.parse::<usize>().expect("number") - 1;
                match kind {
                    "F" => Step::forward(mb, 0),
                    "B" => Step::backward(mb, 0),
                    "f" => Step::forward(mb, 1),
                    "b" => Step::backward(mb, 1),
                    _ => panic!("bad step {t}"),
                }
            })
            .collect()
    }

    #[test]
    fn one_f_one_b_is_the_published_order() {
        // Narayanan et al. 2021 (Megatron-LM), Figure 4 top: 4 stages, 8 micro-batches.
        let s = Schedule::new(ScheduleKind::OneFOneB, 4, 8).unwrap();
        assert_eq!(
            s.stage(0),
            parse("F1 F2 F3 F4 B1 F5 B2 F6 B3 F7 B4 F8 B5 B6 B7 B8")
        );
        assert_eq!(
            s.stage(1),
            parse("F1 F2 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5 F8 B6 B7 B8")
        );
        assert_eq!(
            s.stage(3),
            parse("F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7 F8 B8")
        );
        let gpipe = Schedule::new(ScheduleKind::GPipe, 4, 3).unwrap();
        assert_eq!(gpipe.stage(2), parse("F1 F2 F3 B1 B2 B3"));
    }

    #[test]
    fn interleaved_is_megatrons_order() {
        // Megatron-Core's table for PP2, 5 micro-batches, VP2, group 3:
        // virtual id 0..9 → micro-batch 0 1 2 0 1 2 3 4 3 4, chunk 0 0 0 1 1 1 0 0 1 1.
        let kind = ScheduleKind::Interleaved {
            virtual_stages: 2,
            group: Some(3),
        };
        let s = Schedule::new(kind, 2, 5).unwrap();
        // Stage 0: warm-up (2 − 0 − 1)·2 + (2 − 1)·3 = 5 forwards.
        assert_eq!(
            s.stage(0),
            parse("F1 F2 F3 f1 f2 f3 b1 F4 b2 F5 b3 f4 B1 f5 B2 B3 b4 b5 B4 B5")
        );
        // Stage 1: warm-up 3.
        assert_eq!(
            s.stage(1),
            parse("F1 F2 F3 f1 b1 f2 b2 f3 b3 F4 B1 F5 B2 f4 B3 f5 b4 b5 B4 B5")
        );
        // PP2, 4 micro-batches, VP2, default group 2: stage 0 warms up with 4 forwards.
        let s = Schedule::new(
            ScheduleKind::Interleaved {
                virtual_stages: 2,
                group: None,
            },
            2,
            4,
        )
        .unwrap();
        assert_eq!(
            s.stage(0),
            parse("F1 F2 f1 f2 F3 b1 F4 b2 f3 B1 f4 B2 b3 b4 B3 B4")
        );
        assert_eq!(
            s.stage(1),
            parse("F1 F2 f1 b1 f2 b2 F3 B1 F4 B2 f3 b3 f4 b4 B3 B4")
        );
    }

    #[test]
    fn no_schedule_deadlocks_and_bubbles_match_their_formulas() {
        for p in 1..=8 {
            for m in p..=(3 * p).max(4) {
                let mut kinds = vec![ScheduleKind::GPipe, ScheduleKind::OneFOneB];
                for v in 1..=4 {
                    kinds.push(ScheduleKind::Interleaved {
                        virtual_stages: v,
                        group: None,
                    });
                }
                for kind in kinds {
                    let s = Schedule::new(kind, p, m).unwrap();
                    for stage in 0..p {
                        let steps = s.stage(stage);
                        assert_eq!(steps.len(), 2 * m * s.chunks(), "{kind:?} p{p} m{m}");
                    }
                    let t = s
                        .simulate()
                        .unwrap_or_else(|e| panic!("{kind:?} p{p} m{m}: {e}"));
                    // The formula is exact when micro-batches fill whole groups.
                    if m.is_multiple_of(p) || !matches!(kind, ScheduleKind::Interleaved { .. }) {
                        assert!(
                            (t.bubble - s.bubble_fraction()).abs() < 1e-9,
                            "{kind:?} p{p} m{m}: simulated {} vs formula {}",
                            t.bubble,
                            s.bubble_fraction()
                        );
                    }
                    if kind == ScheduleKind::OneFOneB {
                        // 1F1B's memory bound: stage s keeps at most p − s micro-batches.
                        for (stage, &n) in t.in_flight.iter().enumerate() {
                            assert!(n <= p - stage, "p{p} m{m} stage {stage}: {n}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_wrong_order_is_reported_as_a_deadlock() {
        // Two stages that both start with a backward wait for each other forever.
        let mut s = Schedule::new(ScheduleKind::OneFOneB, 2, 2).unwrap();
        s.steps[0] = parse("B1 F1 F2 B2");
        let e = s.simulate().unwrap_err().to_string();
        assert!(e.contains("deadlock"), "{e}");
    }

    #[test]
    fn bad_arguments_name_the_field() {
        let il = |v, group| ScheduleKind::Interleaved {
            virtual_stages: v,
            group,
        };
        for (kind, p, m, field) in [
            (ScheduleKind::OneFOneB, 0, 4, "stages"),
            (ScheduleKind::OneFOneB, 2, 0, "microbatches"),
            (il(2, None), 4, 3, "microbatches"),
            (il(0, None), 2, 4, "virtual_stages"),
            (il(2, Some(1)), 2, 4, "group"),
            (il(2, Some(4)), 2, 5, "group"),
        ] {
            let e = Schedule::new(kind, p, m).unwrap_err().to_string();
            assert!(e.contains(field), "{kind:?} p{p} m{m}: {e}");
        }
    }
}
