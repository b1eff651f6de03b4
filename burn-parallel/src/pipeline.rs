//! Pipeline-parallel execution: runs one stage's part of a [`Schedule`] with Burn autodiff.
//!
//! Each forward step receives its input activation from the stage holding the previous
//! virtual stage (or starts from the micro-batch on the first one), runs the model chunk and
//! posts the output to the next virtual stage; the last virtual stage returns the loss. Each
//! backward step seeds the kept graph with the output gradient received from the next virtual
//! stage (the loss itself on the last), adds this stage's local loss terms (an MoE layer's
//! auxiliary losses, like Megatron's `MoEAuxLossAutoScaler`), accumulates the parameter
//! gradients into a [`GradientBuffer`] and posts the input gradient back. Messages are tagged by
//! (pass, micro-batch, receiving virtual stage), so they cannot be confused; sends are posted
//! ([`Communicator::post_send`](crate::comm::Communicator::post_send)) and receives wait, which
//! is the model under which [`Schedule::simulate`] proves the schedules deadlock-free.
//! Activations and gradients travel in the wire type given to [`run_stage`] (bf16 for a bf16
//! model: 2 bytes a value).

use std::collections::HashMap;

use burn::module::Module;
use burn::tensor::{DType, Device, FloatDType, Tensor};
use half::bf16;

use crate::comm::Buffer;
use crate::ops::{buffer_from_data, buffer_into_data};

use crate::error::{ParallelError, Result};
use crate::group::Group;
use crate::optim::GradientBuffer;
use crate::schedule::{Pass, Schedule};

/// What a model chunk returns for one micro-batch: the activation for the next virtual stage,
/// or none on the last; and the loss, already scaled for gradient accumulation: the model's loss
/// on the last virtual stage, elsewhere the chunk's local loss terms (MoE auxiliary losses),
/// whose gradients join the backward pass.
#[derive(Debug, Clone)]
pub struct StageOutput {
    /// `[S, B, H]` (the same shape on every stage); `None` on the last virtual stage.
    pub hidden: Option<Tensor<3>>,
    /// The loss (last virtual stage) or local loss terms.
    pub loss: Option<Tensor<1>>,
}

impl StageOutput {
    /// An intermediate chunk's output.
    pub fn activation(hidden: Tensor<3>, local_loss: Option<Tensor<1>>) -> Self {
        Self {
            hidden: Some(hidden),
            loss: local_loss,
        }
    }

    /// The last chunk's output.
    pub fn loss(loss: Tensor<1>) -> Self {
        Self {
            hidden: None,
            loss: Some(loss),
        }
    }
}

/// The result of one stage's schedule.
#[derive(Debug, Clone)]
pub struct StageRun {
    /// This stage's parameter gradients, summed over micro-batches.
    pub grads: GradientBuffer,
    /// Loss value of each micro-batch (on the stage holding the last virtual stage; empty
    /// elsewhere), in micro-batch order.
    pub losses: Vec<f64>,
}

fn tag(pass: Pass, microbatch: usize, receiver: usize, virtual_stages: usize) -> Result<u16> {
    let id = (microbatch * virtual_stages + receiver) * 2 + usize::from(pass == Pass::Backward);
    u16::try_from(id)
        .ok()
        .filter(|t| *t < 32_768)
        .ok_or_else(|| ParallelError::InvalidArgument {
            name: "microbatches",
            reason: format!(
                "{} micro-batches × {virtual_stages} virtual stages exceed the message tags",
                microbatch + 1
            ),
        })
}

fn unreachable_output() -> Result<Tensor<1>> {
    Err(ParallelError::InvalidArgument {
        name: "forward",
        reason: "a chunk returned neither an activation nor a loss".into(),
    })
}

/// A tensor's values in the pipeline's wire type `dtype` (f32 or bf16).
fn values(t: Tensor<3>, dtype: FloatDType) -> Result<Buffer> {
    crate::transfers::read(
        "pipeline: an activation or gradient to send",
        (t.shape().num_elements() * DType::from(dtype).size()) as u64,
    );
    let t = if t.dtype() == DType::from(dtype) {
        t
    } else {
        t.cast(dtype)
    };
    // bf16 travels as bf16, any other type as f32.
    let data = match dtype {
        FloatDType::BF16 => t.into_data(),
        _ => t.into_data().convert::<f32>(),
    };
    buffer_from_data(data, "reading a pipeline activation")
}

/// Received values as a tensor of `shape` (in their own type).
fn tensor(values: Buffer, shape: [usize; 3], device: &Device, what: &'static str) -> Tensor<3> {
    let data = buffer_into_data(values, shape);
    crate::transfers::upload(what, data.bytes().len() as u64);
    Tensor::<3>::from_data(data, device)
}

fn scalar(t: Tensor<1>) -> Result<f64> {
    crate::transfers::read("pipeline: a micro-batch's loss", 4);
    t.into_data()
        .convert::<f64>()
        .try_into_vec::<f64>()
        .ok()
        .and_then(|v| v.first().copied())
        .ok_or(ParallelError::Backend {
            context: "reading a pipeline loss",
            reason: "not a scalar".into(),
        })
}

/// Moves activations between the stages of a pipeline (through the pipeline group, or a local
/// mailbox when sender and receiver are this rank), in the wire type.
struct Links<'a> {
    pp: &'a Group,
    local: HashMap<u16, Buffer>,
}

impl Links<'_> {
    fn send(&mut self, values: Buffer, dest: usize, tag: u16) -> Result<()> {
        if dest == self.pp.rank() {
            self.local.insert(tag, values);
            return Ok(());
        }
        let comm = self.pp.communicator()?;
        match values {
            Buffer::F32(v) => comm.post_send(v, dest, tag),
            Buffer::Bf16(v) => comm.post_send_bf16(v, dest, tag),
        }
    }

    fn recv(
        &mut self,
        count: usize,
        src: usize,
        (tag, dtype): (u16, FloatDType),
    ) -> Result<Buffer> {
        if src == self.pp.rank() {
            return self
                .local
                .remove(&tag)
                .ok_or_else(|| ParallelError::InvalidArgument {
                    name: "schedule",
                    reason: format!("message {tag} is needed before this stage produced it"),
                });
        }
        let comm = self.pp.communicator()?;
        Ok(match dtype {
            FloatDType::BF16 => Buffer::Bf16(comm.recv_bf16(count, src, tag)?),
            _ => Buffer::F32(comm.recv(count, src, tag)?),
        })
    }
}

/// Runs this rank's stage (`pp.rank()`) of `schedule`.
///
/// `forward(chunk, microbatch, input)` runs model chunk `chunk` of this stage; `input` is
/// `None` on the first virtual stage (the chunk embeds the micro-batch itself) and the received
/// activation otherwise. It must return [`StageOutput::Loss`] exactly on the last virtual stage.
/// `module` is everything this stage trains (its gradients are collected). `shape` is the
/// activation shape exchanged between stages and `wire` the type they travel in (the model's
/// activation type: bf16 sends 2 bytes a value); received activations are made on `device`
/// (an autodiff device) in that type. Collective over `pp`.
pub fn run_stage<M, E, F>(
    schedule: &Schedule,
    pp: &Group,
    module: &M,
    (shape, wire): ([usize; 3], FloatDType),
    device: &Device,
    mut forward: F,
) -> std::result::Result<StageRun, E>
where
    M: Module,
    E: From<ParallelError>,
    F: FnMut(usize, usize, Option<Tensor<3>>) -> std::result::Result<StageOutput, E>,
{
    if pp.size() != schedule.stages() {
        return Err(ParallelError::InvalidArgument {
            name: "pp",
            reason: format!(
                "the pipeline group has {} ranks, the schedule {} stages",
                pp.size(),
                schedule.stages()
            ),
        }
        .into());
    }
    let stage = pp.rank();
    let p = schedule.stages();
    let count: usize = shape.iter().product();
    let last = p * schedule.chunks() - 1;
    let vs_total = last + 1;
    let mut links = Links {
        pp,
        local: HashMap::new(),
    };
    let mut kept: HashMap<(usize, usize), (Option<Tensor<3>>, StageOutput)> = HashMap::new();
    let mut grads = GradientBuffer::new();
    let mut losses = vec![None; schedule.microbatches()];
    for step in schedule.stage(stage) {
        let vs = schedule.virtual_stage(stage, step.chunk);
        let mb = step.microbatch;
        match step.pass {
            Pass::Forward => {
                let input = if vs == 0 {
                    None
                } else {
                    let t = tag(Pass::Forward, mb, vs, vs_total)?;
                    let v = links.recv(count, (vs - 1) % p, (t, wire))?;
                    let what = "pipeline: a received activation";
                    Some(tensor(v, shape, device, what).require_grad())
                };
                let out = forward(step.chunk, mb, input.clone())?;
                match (&out.hidden, &out.loss, vs == last) {
                    (Some(hidden), _, false) => {
                        if hidden.dims() != shape {
                            return Err(ParallelError::InvalidArgument {
                                name: "shape",
                                reason: format!(
                                    "chunk {} returned {:?}, the pipeline exchanges {shape:?}",
                                    step.chunk,
                                    hidden.dims()
                                ),
                            }
                            .into());
                        }
                        let t = tag(Pass::Forward, mb, vs + 1, vs_total)?;
                        links.send(values(hidden.clone(), wire)?, (vs + 1) % p, t)?;
                    }
                    (None, Some(loss), true) => {
                        losses[mb] = Some(scalar(loss.clone())?);
                    }
                    _ => {
                        return Err(ParallelError::InvalidArgument {
                            name: "forward",
                            reason: format!(
                                "virtual stage {vs} of {vs_total} must return {}",
                                if vs == last {
                                    "the loss and no activation"
                                } else {
                                    "an activation"
                                }
                            ),
                        }
                        .into());
                    }
                }
                kept.insert((mb, step.chunk), (input, out));
            }
            Pass::Backward => {
                let (input, out) = kept.remove(&(mb, step.chunk)).ok_or_else(|| {
                    ParallelError::InvalidArgument {
                        name: "schedule",
                        reason: format!(
                            "backward of micro-batch {mb} on chunk {} before its forward",
                            step.chunk
                        ),
                    }
                })?;
                let objective = match (out.hidden, out.loss) {
                    (Some(hidden), local) => {
                        let t = tag(Pass::Backward, mb, vs, vs_total)?;
                        let g = links.recv(count, (vs + 1) % p, (t, wire))?;
                        let what = "pipeline: a received gradient";
                        let g = tensor(g, shape, &hidden.device(), what).cast(hidden.dtype());
                        // In f32, as the stage's own losses are.
                        let seeded = (hidden * g).sum().cast(burn::tensor::FloatDType::F32);
                        match local {
                            Some(l) => seeded + l,
                            None => seeded,
                        }
                    }
                    (None, Some(loss)) => loss,
                    (None, None) => unreachable_output()?,
                };
                let step_grads = objective.backward();
                crate::group::check()?;
                if let Some(input) = input {
                    let g = input
                        .grad(&step_grads)
                        .map(|g| values(g, wire))
                        .transpose()?
                        .unwrap_or_else(|| match wire {
                            FloatDType::BF16 => Buffer::Bf16(vec![bf16::ZERO; count]),
                            _ => Buffer::F32(vec![0.0; count]),
                        });
                    let t = tag(Pass::Backward, mb, vs - 1, vs_total)?;
                    links.send(g, (vs - 1) % p, t)?;
                }
                grads.add(module, &step_grads)?;
            }
        }
    }
    pp.communicator()?.flush_sends()?;
    Ok(StageRun {
        grads,
        losses: losses.into_iter().flatten().collect(),
    })
}
