//! Checkpoints across layouts: a checkpoint of an [`MoeLm`] written under one parallel layout
//! read under another (TP2·EP2 on four ranks resumed on EP4 or on one rank, PP2 on PP1, …),
//! or whole.
//!
//! A checkpoint's rank files hold each rank's parameter shards under their module paths and
//! its optimizer state as flat shards per parameter class ([`burn_parallel::optim`]); its
//! `meta.json` records the layout ([`SavedLayout`]). Which element of which full tensor each
//! stored value is, is not written down a second time: it is found by laying out *index
//! tensors* — full tensors whose elements hold their own global numbers — with the same
//! constructor the model uses ([`MoeLm::from_tensors`], under a
//! [`ProcessGroups::detached`] view of each rank), so the map cannot disagree with the layout
//! code. A rank then reads, by offset, only the stored ranges that hold values it needs.
//!
//! ```
//! use burn::tensor::Device;
//! use burn_moe::lm::reshard::{read_full_state, saved_layout};
//! use burn_moe::lm::{MoeLmConfig, StageLayout};
//! use burn_moe::prelude::MoeLayerConfig;
//! use burn_parallel::checkpoint::{TrainingMeta, save};
//! use burn_parallel::optim::OptimizerState;
//! use burn_parallel::prelude::{ProcessGroups, SingleRank};
//!
//! let config = MoeLmConfig::new(32, 16, 2, 2, 32).with_moe(Some(MoeLayerConfig::swiglu(16, 16, 4, 2)));
//! let model = config.init(3, &Device::flex()).unwrap();
//! let groups = ProcessGroups::single().unwrap();
//! let layout = saved_layout(&groups, &StageLayout::single(2));
//! let meta = TrainingMeta { step: 0, world: 1, next_sequence: 0, seed: 3, layout: Some(layout.clone()) };
//! let run = std::env::temp_dir().join(format!("reshard-doc-{}", std::process::id()));
//! let state = OptimizerState { step: 0, shards: Vec::new() };
//! let dir = save(&run, &meta, &model, &state, &SingleRank::new(), 1).unwrap();
//! let full = read_full_state(&dir, &config, &layout, None).unwrap();
//! assert_eq!(full.params, model.full_tensors(None).unwrap());
//! # std::fs::remove_dir_all(&run).unwrap();
//! ```

use std::collections::HashMap;
use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::{Device, Tensor, TensorData};
use burn_parallel::ParallelError;
use burn_parallel::checkpoint::{RankFile, SavedLayout, verify};
use burn_parallel::optim::{OptimizerState, shard_range};
use burn_parallel::prelude::{GroupKind, Mesh, ProcessGroups};

use super::config::MoeLmConfig;
use super::model::{FullTensors, MoeLm};
use super::split::{LayerSplit, StageLayout};
use crate::error::{MoeError, Result};
use crate::host;

/// The whole training state of a checkpoint: the parameters and the optimizer's master
/// weights and moments as full tensors by [`MoeLm::full_tensors`]'s names. With a filter
/// ([`read_full_state`]'s `needed`), values no one asked for are zero.
#[derive(Debug, Clone, PartialEq)]
pub struct FullState {
    /// Optimizer steps taken.
    pub step: u64,
    /// Parameter classes of the optimizer state (dense, then expert).
    pub classes: usize,
    /// The parameters.
    pub params: FullTensors,
    /// Master weights, first and second moments of every trained tensor (empty before the
    /// first optimizer step).
    pub optimizer: [FullTensors; 3],
}

/// The checkpoint layout ([`SavedLayout`]) of the mesh of `groups` and `layout`.
pub fn saved_layout(groups: &ProcessGroups, layout: &StageLayout) -> SavedLayout {
    SavedLayout::new(
        groups.mesh(),
        layout.split.chunks(),
        layout.split.counts().to_vec(),
    )
}

/// The stage layout of a checkpoint layout of a model of `layers` layers (the all-to-all
/// dispatcher and ring attention: neither changes what a rank holds).
pub fn stage_layout(saved: &SavedLayout, layers: usize) -> Result<StageLayout> {
    let mut layout = StageLayout::single(layers);
    layout.split = LayerSplit::given(
        layers,
        saved.attention.pp,
        saved.chunks,
        &saved.stage_layers,
    )?;
    Ok(layout)
}

/// Global numbers of the full tensors' elements: tensor `t`'s element `i` is
/// `starts[t] + i`, numbers start at 1 (0 marks padding a layout adds).
#[derive(Debug, Clone)]
struct Numbering {
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    starts: Vec<u64>,
    total: u64,
}

/// Bits of a global number carried by each of the two index passes (f32 holds integers up
/// to 2^24 exactly).
const LOW_BITS: u32 = 20;

impl Numbering {
    fn new(config: &MoeLmConfig) -> Result<Self> {
        let (mut names, mut shapes, mut starts) = (Vec::new(), Vec::new(), Vec::new());
        let mut next = 1u64;
        for (name, shape) in config.full_shapes()? {
            starts.push(next);
            next += shape.iter().product::<usize>() as u64;
            names.push(name);
            shapes.push(shape);
        }
        if next >= 1 << (2 * LOW_BITS) {
            return Err(MoeError::InvalidArgument {
                name: "config",
                reason: format!("{next} parameters are more than a checkpoint map numbers"),
            });
        }
        Ok(Self {
            names,
            shapes,
            starts,
            total: next - 1,
        })
    }

    /// Index tensors: each element the low (`high == false`) or high bits of its number.
    fn tensors(&self, high: bool) -> FullTensors {
        let mask = (1u64 << LOW_BITS) - 1;
        let mut out = FullTensors::new();
        for ((name, shape), start) in self.names.iter().zip(&self.shapes).zip(&self.starts) {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n as u64)
                .map(|i| {
                    let id = start + i;
                    (if high { id >> LOW_BITS } else { id & mask }) as f32
                })
                .collect();
            out.insert(name.clone(), TensorData::new(values, shape.clone()));
        }
        out
    }

    /// The tensor and element of global number `id` (not 0).
    fn locate(&self, id: u64) -> (usize, usize) {
        let t = self.starts.partition_point(|&s| s <= id) - 1;
        (t, (id - self.starts[t]) as usize)
    }

    fn zeros(&self) -> Vec<Vec<f32>> {
        self.shapes
            .iter()
            .map(|s| vec![0.0; s.iter().product()])
            .collect()
    }

    fn to_tensors(&self, values: Vec<Vec<f32>>, keep: impl Fn(usize) -> bool) -> FullTensors {
        self.names
            .iter()
            .zip(&self.shapes)
            .zip(values)
            .enumerate()
            .filter(|(t, _)| keep(*t))
            .map(|(_, ((name, shape), v))| (name.clone(), TensorData::new(v, shape.clone())))
            .collect()
    }
}

/// One parameter of a rank: its module path, whether the optimizer trains it and in which
/// class, and the global number of each of its values (0: padding).
#[derive(Debug, Clone)]
struct Local {
    path: String,
    trained: bool,
    expert: bool,
    ids: Vec<u64>,
}

/// What a rank of a layout holds, parameter by parameter in module order.
#[derive(Debug, Clone)]
struct RankMap {
    params: Vec<Local>,
}

impl RankMap {
    /// The class's trained parameters (module order) of an optimizer with `classes` classes.
    fn class(&self, classes: usize, class: usize) -> impl Iterator<Item = &Local> {
        self.params
            .iter()
            .filter(move |p| p.trained && (classes == 1 || p.expert == (class == 1)))
    }
}

/// A parameter's module path, id, whether it is trained, and its values.
type Named = (String, ParamId, bool, Vec<f32>);

struct Values {
    path: Vec<String>,
    out: Vec<Named>,
    error: Option<MoeError>,
}

impl ModuleVisitor for Values {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
        let value = p.val();
        let trained = value.is_require_grad();
        match host::read_f32(value, "reading a checkpoint map") {
            Ok(v) => self.out.push((self.path.join("."), p.id, trained, v)),
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
    }
}

fn values_of(model: &MoeLm) -> Result<Vec<Named>> {
    let mut visitor = Values {
        path: Vec::new(),
        out: Vec::new(),
        error: None,
    };
    model.visit(&mut visitor);
    visitor.error.map_or(Ok(visitor.out), Err)
}

/// The map of the rank of `groups` under `layout`: the index tensors laid out on the CPU
/// (with autodiff, so that the trained parameters are the optimizer's).
fn rank_map(
    config: &MoeLmConfig,
    index: &[FullTensors; 2],
    groups: &ProcessGroups,
    layout: &StageLayout,
) -> Result<RankMap> {
    let device = Device::flex().autodiff();
    let low = MoeLm::from_tensors(config, &index[0], groups, layout, &device)?;
    let high = MoeLm::from_tensors(config, &index[1], groups, layout, &device)?;
    let experts: HashMap<ParamId, bool> = low
        .roles()
        .into_iter()
        .map(|(id, r)| (id, r.expert))
        .collect();
    let params = values_of(&low)?
        .into_iter()
        .zip(values_of(&high)?)
        .map(|((path, id, trained, lo), (_, _, _, hi))| Local {
            path,
            trained,
            expert: experts.get(&id).copied().unwrap_or(false),
            ids: lo
                .iter()
                .zip(&hi)
                .map(|(&l, &h)| ((h as u64) << LOW_BITS) | l as u64)
                .collect(),
        })
        .collect();
    Ok(RankMap { params })
}

fn damaged(dir: &Path, reason: String) -> MoeError {
    ParallelError::io(dir, reason).into()
}

/// Full tensors being filled from rank files: values and which numbers were written.
struct Filling<'a> {
    numbering: &'a Numbering,
    values: Vec<Vec<f32>>,
    written: Vec<bool>,
}

impl<'a> Filling<'a> {
    fn new(numbering: &'a Numbering) -> Self {
        Self {
            numbering,
            values: numbering.zeros(),
            written: vec![false; numbering.total as usize + 1],
        }
    }

    /// Reads the values of stored tensor `name` of `file` whose numbers (`ids`, one per
    /// element) are wanted: one read by offset of the range that spans them.
    fn read(
        &mut self,
        file: &mut RankFile,
        name: &str,
        ids: &[u64],
        wanted: &dyn Fn(u64) -> bool,
    ) -> Result<()> {
        let stored: usize = file.shape(name).map_or(0, |s| s.iter().product());
        if file.shape(name).is_none() || stored != ids.len() {
            return Err(MoeError::InvalidArgument {
                name: "checkpoint",
                reason: format!(
                    "tensor `{name}` has {stored} values, the recorded layout puts {} there",
                    ids.len()
                ),
            });
        }
        // Replicas of a value are read once.
        let at = |i: &usize| ids[*i] != 0 && !self.written[ids[*i] as usize] && wanted(ids[*i]);
        let (Some(lo), Some(hi)) = ((0..ids.len()).find(at), (0..ids.len()).rev().find(at)) else {
            return Ok(());
        };
        let values = file.read(name, lo..hi + 1)?;
        for (i, v) in (lo..=hi).zip(values) {
            let id = ids[i];
            if id != 0 && !self.written[id as usize] && wanted(id) {
                let (t, e) = self.numbering.locate(id);
                self.values[t][e] = v;
                self.written[id as usize] = true;
            }
        }
        Ok(())
    }

    /// Errors naming the first full tensor with a wanted value no file held.
    fn check(&self, dir: &Path, what: &str, wanted: &dyn Fn(u64) -> bool) -> Result<()> {
        match (1..=self.numbering.total).find(|&id| wanted(id) && !self.written[id as usize]) {
            Some(id) => {
                let (t, e) = self.numbering.locate(id);
                Err(damaged(
                    dir,
                    format!(
                        "holds no {what} value for element {e} of `{}` under its recorded \
                         layout",
                        self.numbering.names[t]
                    ),
                ))
            }
            None => Ok(()),
        }
    }
}

/// The trained parameters (module order) of every class of the optimizer state, as the
/// ranks of `mesh` hold them: for each class, each group of the class's data-parallel kind
/// with the map of its members (who all hold the same parameters).
fn class_groups(mesh: &Mesh, classes: usize) -> Vec<(usize, Vec<usize>)> {
    let kinds = [GroupKind::DpCp, GroupKind::ExpertDp];
    (0..classes)
        .flat_map(|c| {
            let kind = if classes == 1 { kinds[0] } else { kinds[c] };
            mesh.groups(kind)
                .iter()
                .map(move |g| (c, g.clone()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Reads checkpoint folder `dir` of a model of `config` written under `saved` as full tensors;
/// with `needed`, only the values whose full-tensor elements a rank asks for (the others stay
/// zero), each read by offset from the rank file that holds it.
pub fn read_full_state(
    dir: &Path,
    config: &MoeLmConfig,
    saved: &SavedLayout,
    needed: Option<&Needed>,
) -> Result<FullState> {
    verify(dir)?;
    let numbering = Numbering::new(config)?;
    let index = [numbering.tensors(false), numbering.tensors(true)];
    let mesh = saved.mesh()?;
    let layout = stage_layout(saved, config.layers)?;
    let world = mesh.world_size();
    let mut files = (0..world)
        .map(|r| RankFile::open(dir, r))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let maps = (0..world)
        .map(|r| {
            rank_map(
                config,
                &index,
                &ProcessGroups::detached(mesh.clone(), r)?,
                &layout,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let wanted = |id: u64| needed.is_none_or(|n| n.wants(id));
    let mut params = Filling::new(&numbering);
    for (file, map) in files.iter_mut().zip(&maps) {
        for p in &map.params {
            params.read(file, &format!("model.{}", p.path), &p.ids, &wanted)?;
        }
    }
    params.check(dir, "parameter", &wanted)?;
    let step = files[0].optimizer_step();
    if let Some(r) = files.iter().position(|f| f.optimizer_step() != step) {
        return Err(damaged(
            dir,
            format!("rank {r} has taken another number of optimizer steps than rank 0"),
        ));
    }
    let classes = (0..)
        .take_while(|c| files[0].shape(&format!("opt.{c}.master")).is_some())
        .count();
    let started = (0..classes).any(|c| {
        files[0]
            .shape(&format!("opt.{c}.master"))
            .is_some_and(|s| s.iter().product::<usize>() > 0)
    });
    let trained: Vec<bool> = {
        let mut t = vec![false; numbering.names.len()];
        for p in maps
            .iter()
            .flat_map(|m| m.params.iter().filter(|p| p.trained))
        {
            if let Some(&id) = p.ids.iter().find(|&&id| id != 0) {
                t[numbering.locate(id).0] = true;
            }
        }
        t
    };
    let mut optimizer = [FullTensors::new(), FullTensors::new(), FullTensors::new()];
    if started {
        for (which, out) in ["master", "m", "v"].iter().zip(optimizer.iter_mut()) {
            let mut state = Filling::new(&numbering);
            for (class, group) in class_groups(&mesh, classes) {
                let members: Vec<&Local> = maps[group[0]].class(classes, class).collect();
                let total: usize = members.iter().map(|p| p.ids.len()).sum();
                let mut flat: Vec<u64> = members.iter().flat_map(|p| p.ids.clone()).collect();
                let len = shard_range(total, group.len(), 0).len();
                flat.resize(len * group.len(), 0);
                for (g, &rank) in group.iter().enumerate() {
                    let name = format!("opt.{class}.{which}");
                    let ids = &flat[shard_range(total, group.len(), g)];
                    state.read(&mut files[rank], &name, ids, &wanted)?;
                }
            }
            let wanted_trained = |id: u64| wanted(id) && trained[numbering.locate(id).0];
            state.check(dir, which, &wanted_trained)?;
            *out = numbering.to_tensors(state.values, |t| trained[t]);
        }
    }
    Ok(FullState {
        step,
        classes,
        params: numbering.to_tensors(params.values, |_| true),
        optimizer,
    })
}

/// The full-tensor elements one rank of a layout holds: what it needs to read from a
/// checkpoint written under another.
#[derive(Debug, Clone)]
pub struct Needed {
    wanted: Vec<bool>,
    /// The numbering of the full tensors' elements.
    numbering: Numbering,
    /// What the rank holds, parameter by parameter.
    map: RankMap,
}

impl Needed {
    /// The elements the rank of `groups` holds under `layout` for a model of `config`.
    pub fn of(config: &MoeLmConfig, groups: &ProcessGroups, layout: &StageLayout) -> Result<Self> {
        let numbering = Numbering::new(config)?;
        let index = [numbering.tensors(false), numbering.tensors(true)];
        let detached = ProcessGroups::detached(groups.mesh().clone(), groups.rank())?;
        let map = rank_map(config, &index, &detached, layout)?;
        let mut wanted = vec![false; numbering.total as usize + 1];
        for id in map.params.iter().flat_map(|p| p.ids.iter()) {
            wanted[*id as usize] = true;
        }
        wanted[0] = false;
        Ok(Self {
            wanted,
            numbering,
            map,
        })
    }

    fn wants(&self, id: u64) -> bool {
        self.wanted.get(id as usize).copied().unwrap_or(false)
    }
}

/// This rank's model (on `device`) and optimizer state under `groups` and `layout` from a
/// checkpoint's full state: what a run resumed under another layout starts from. `needed` is
/// [`Needed::of`] the same rank and layout (its map places the optimizer state).
pub fn shard_state(
    full: &FullState,
    config: &MoeLmConfig,
    groups: &ProcessGroups,
    layout: &StageLayout,
    needed: &Needed,
    device: &Device,
) -> Result<(MoeLm, OptimizerState)> {
    let model = MoeLm::from_tensors(config, &full.params, groups, layout, device)?;
    let empty = || [Vec::new(), Vec::new(), Vec::new()];
    let mut shards: Vec<[Vec<f32>; 3]> = (0..full.classes).map(|_| empty()).collect();
    if full.optimizer[0].is_empty() {
        return Ok((
            model,
            OptimizerState {
                step: full.step,
                shards,
            },
        ));
    }
    let (numbering, map) = (&needed.numbering, &needed.map);
    let values: Vec<Vec<Vec<f32>>> = full
        .optimizer
        .iter()
        .map(|tensors| {
            numbering
                .names
                .iter()
                .map(|n| {
                    tensors
                        .get(n)
                        .and_then(|t| t.try_to_vec::<f32>().ok())
                        .unwrap_or_default()
                })
                .collect()
        })
        .collect();
    for (class, shard) in shards.iter_mut().enumerate() {
        let kind = if class == 0 || full.classes == 1 {
            GroupKind::DpCp
        } else {
            GroupKind::ExpertDp
        };
        let group = groups.group(kind);
        let ids: Vec<u64> = map
            .class(full.classes, class)
            .flat_map(|p| p.ids.iter().copied())
            .collect();
        let range = shard_range(ids.len(), group.size(), group.rank());
        for (out, v) in shard.iter_mut().zip(&values) {
            *out = range
                .clone()
                .map(|i| match ids.get(i) {
                    Some(&id) if id != 0 => {
                        let (t, e) = numbering.locate(id);
                        v[t].get(e).copied().unwrap_or(0.0)
                    }
                    _ => 0.0,
                })
                .collect();
        }
    }
    Ok((
        model,
        OptimizerState {
            step: full.step,
            shards,
        },
    ))
}

/// The whole model (one rank, on `device`) of checkpoint folder `dir` written under `saved`,
/// whatever that layout was.
pub fn load_whole(
    dir: &Path,
    config: &MoeLmConfig,
    saved: &SavedLayout,
    device: &Device,
) -> Result<MoeLm> {
    let full = read_full_state(dir, config, saved, None)?;
    let groups = ProcessGroups::single()?;
    MoeLm::from_tensors(
        config,
        &full.params,
        &groups,
        &StageLayout::single(config.layers),
        device,
    )
}
