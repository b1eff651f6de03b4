//! Sharded, checksummed checkpoints of a module and its [`OptimizerState`]:
//! `RUN_DIR/checkpoints/step-NNNNNN/` with one safetensors file per rank (its parameter
//! shards and its optimizer shard) and `meta.json` (a trainer's [`CheckpointMeta`]). Written
//! atomically: every rank writes into `step-NNNNNN.tmp/`, then rank 0 renames the folder once
//! all have finished; only the newest `keep` checkpoints stay.
//!
//! `SHA256SUMS` lists the SHA-256 of every other file of the folder (written last, before the
//! rename; its own last line checks the list); a checkpoint whose files do not match it is
//! refused naming the file.
//!
//! Parameters are stored under their module paths (`model.blocks.0.attn.qkv.weight`), so a
//! checkpoint can be read by name. Checkpoints written before names (`param.00017`, by
//! position in module order) are still read, by position.
//!
//! ```
//! use burn::nn::LinearConfig;
//! use burn::tensor::Device;
//! use burn_parallel::checkpoint::{CheckpointMeta, latest, load, save};
//! use burn_parallel::comm::SingleRank;
//! use burn_parallel::optim::OptimizerState;
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Meta {
//!     step: usize,
//! }
//! impl CheckpointMeta for Meta {
//!     fn step(&self) -> usize {
//!         self.step
//!     }
//! }
//!
//! let run = std::env::temp_dir().join(format!("ckpt-doc-{}", std::process::id()));
//! let device = Device::flex();
//! let model = LinearConfig::new(3, 2).init(&device);
//! let state = OptimizerState { step: 7, shards: Vec::new() };
//! save(&run, &Meta { step: 7 }, &model, &state, &SingleRank::new(), 1).unwrap();
//! let (dir, meta) = latest::<Meta>(&run).unwrap().expect("a checkpoint");
//! let fresh = LinearConfig::new(3, 2).init(&device);
//! let (loaded, state) = load(&dir, fresh, 0).unwrap();
//! assert_eq!((meta.step, state.step), (7, 7));
//! assert_eq!(loaded.weight.val().into_data(), model.weight.val().into_data());
//! # std::fs::remove_dir_all(&run).unwrap();
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::comm::Communicator;
use crate::error::{ParallelError, Result};
use crate::mesh::{Mesh, MoeDims, ParallelDims};
use crate::optim::OptimizerState;

/// What `meta.json` of a checkpoint records: at least the optimizer steps completed when it
/// was written (a trainer adds what it needs to continue: the data position, the seed, …).
pub trait CheckpointMeta: Serialize + DeserializeOwned {
    /// Optimizer steps completed.
    fn step(&self) -> usize;
}

/// The `meta.json` of the project's trainers: the step, the world that wrote the checkpoint
/// and where the run's data stream and generators continue.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TrainingMeta {
    /// Optimizer steps completed.
    pub step: usize,
    /// Ranks that wrote the checkpoint.
    pub world: usize,
    /// Index of the next sequence (or clip batch) of the data stream.
    pub next_sequence: u64,
    /// The run's seed (the data and initialisation generators' state is (seed, position)).
    pub seed: u64,
    /// The parallel layout the checkpoint was written under, so that it can be read under
    /// another (absent in checkpoints written before layouts were recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<SavedLayout>,
}

/// The parallel layout of a checkpoint: the mesh and the pipeline's layer split, all a reader
/// needs to know which part of each tensor every rank file holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedLayout {
    /// Attention sizes `tp, cp, dp, pp`.
    pub attention: ParallelDims,
    /// MoE sizes `etp, ep, edp`.
    pub moe: MoeDims,
    /// The mesh's order string.
    pub order: String,
    /// Model chunks (virtual stages) per pipeline stage.
    pub chunks: usize,
    /// Layers of each virtual stage (virtual stage `chunk · pp + stage`).
    pub stage_layers: Vec<usize>,
}

impl SavedLayout {
    /// The layout of `mesh` with `chunks` model chunks per stage holding `stage_layers`.
    pub fn new(mesh: &Mesh, chunks: usize, stage_layers: Vec<usize>) -> Self {
        Self {
            attention: mesh.attention(),
            moe: mesh.moe(),
            order: mesh.order().to_string(),
            chunks,
            stage_layers,
        }
    }

    /// Ranks that wrote the checkpoint.
    pub fn world_size(&self) -> usize {
        self.attention.world_size()
    }

    /// The mesh.
    pub fn mesh(&self) -> Result<Mesh> {
        Mesh::with_order(self.world_size(), self.attention, self.moe, &self.order)
    }
}

impl CheckpointMeta for TrainingMeta {
    fn step(&self) -> usize {
        self.step
    }
}

/// The checkpoint folder of `step`.
pub fn step_dir(run_dir: &Path, step: usize) -> PathBuf {
    run_dir.join("checkpoints").join(format!("step-{step:06}"))
}

/// The complete checkpoint folders of a run, oldest first.
fn complete_steps(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let dir = run_dir.join("checkpoints");
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut steps: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| ParallelError::io(&dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-") && !n.ends_with(".tmp"))
        })
        .collect();
    steps.sort();
    Ok(steps)
}

/// The file listing the checksums of a checkpoint folder.
const SUMS: &str = "SHA256SUMS";

fn text_digest(bytes: impl AsRef<[u8]>) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes.as_ref())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn sha256_hex(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| ParallelError::io(path, e))?;
    Ok(text_digest(bytes))
}

/// Writes `SHA256SUMS` of every file of `dir` (`sha256sum` format, sorted by name).
fn write_checksums(dir: &Path) -> Result<()> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| ParallelError::io(dir, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n != SUMS)
        .collect();
    names.sort();
    let mut text = String::new();
    for name in names {
        text.push_str(&format!("{}  {name}\n", sha256_hex(&dir.join(&name))?));
    }
    // The last line checks the lines above it, so a damaged list names itself.
    let own = text_digest(&text);
    text.push_str(&format!("{own}  {SUMS}\n"));
    let path = dir.join(SUMS);
    std::fs::write(&path, text).map_err(|e| ParallelError::io(&path, e))
}

/// Checks every file of checkpoint folder `dir` against its `SHA256SUMS`; errors name the
/// file that differs, is missing, or is not listed. A folder without the list (written
/// before checksums) is accepted as it is.
pub fn verify(dir: &Path) -> Result<()> {
    let path = dir.join(SUMS);
    if !path.exists() {
        return Ok(());
    }
    let damaged = || ParallelError::io(&path, "is damaged: its own checksum does not match");
    let bytes = std::fs::read(&path).map_err(|e| ParallelError::io(&path, e))?;
    let text = String::from_utf8(bytes).map_err(|_| damaged())?;
    let body_end = text.trim_end_matches('\n').rfind('\n').map_or(0, |i| i + 1);
    let (body, own) = text.split_at(body_end);
    let own_sum = own
        .strip_suffix(&format!("  {SUMS}\n"))
        .ok_or_else(damaged)?;
    if own_sum != text_digest(body) {
        return Err(damaged());
    }
    let mut listed = std::collections::BTreeSet::new();
    for line in body.lines() {
        let (sum, name) = line
            .split_once("  ")
            .filter(|(s, n)| s.len() == 64 && !n.is_empty() && !n.contains('/'))
            .ok_or_else(|| ParallelError::io(&path, format!("malformed line {line:?}")))?;
        let file = dir.join(name);
        if !file.exists() {
            return Err(ParallelError::io(&file, "is missing from the checkpoint"));
        }
        if sha256_hex(&file)? != sum {
            return Err(ParallelError::io(
                &file,
                "does not match its checksum: the checkpoint is damaged",
            ));
        }
        listed.insert(name.to_string());
    }
    for entry in std::fs::read_dir(dir).map_err(|e| ParallelError::io(dir, e))? {
        let entry = entry.map_err(|e| ParallelError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != SUMS && !listed.contains(&name) {
            return Err(ParallelError::io(
                &entry.path(),
                "is not listed in the checkpoint's SHA256SUMS",
            ));
        }
    }
    Ok(())
}

/// The newest complete checkpoint of a run, if any, its files checked against their
/// checksums.
pub fn latest<T: CheckpointMeta>(run_dir: &Path) -> Result<Option<(PathBuf, T)>> {
    match complete_steps(run_dir)?.pop() {
        None => Ok(None),
        Some(path) => {
            verify(&path)?;
            let meta_path = path.join("meta.json");
            let text = std::fs::read_to_string(&meta_path)
                .map_err(|e| ParallelError::io(&meta_path, e))?;
            let meta: T =
                serde_json::from_str(&text).map_err(|e| ParallelError::io(&meta_path, e))?;
            // The folder's name and its meta.json must agree on the step.
            let named = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("step-"))
                .and_then(|n| n.parse::<usize>().ok());
            if named != Some(meta.step()) {
                return Err(ParallelError::io(
                    &meta_path,
                    format!(
                        "says step {} but its folder is {}; the checkpoint is inconsistent",
                        meta.step(),
                        path.display()
                    ),
                ));
            }
            Ok(Some((path, meta)))
        }
    }
}

struct Collect {
    path: Vec<String>,
    out: Vec<(String, Vec<usize>, Vec<f32>)>,
}

impl ModuleVisitor for Collect {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
        let t = p.val();
        let shape = t.dims().to_vec();
        crate::transfers::read(
            "checkpoint: a parameter",
            4 * t.shape().num_elements() as u64,
        );
        let values = t
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap_or_default();
        self.out.push((self.path.join("."), shape, values));
    }
}

/// Every float parameter of `module` by module path (`blocks.0.attn.qkv.weight`), with its
/// shape and values, in module order.
pub fn named_params<M: Module>(module: &M) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut collect = Collect {
        path: Vec::new(),
        out: Vec::new(),
    };
    module.visit(&mut collect);
    collect.out
}

fn bytes_of(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn floats_of(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Writes rank `rank`'s file of a checkpoint into folder `dir`: its parameters under their
/// module paths and its optimizer state. [`save`] calls it on every rank; a converter that
/// lays out every rank of another layout in one process calls it for each, then
/// [`finish`].
pub fn write_rank<M: Module>(
    dir: &Path,
    module: &M,
    optimizer: &OptimizerState,
    rank: usize,
) -> Result<()> {
    let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = named_params(module)
        .into_iter()
        .map(|(path, shape, v)| (format!("model.{path}"), shape, bytes_of(&v)))
        .collect();
    for (c, shard) in optimizer.shards.iter().enumerate() {
        for (name, v) in ["master", "m", "v"].iter().zip(shard) {
            named.push((format!("opt.{c}.{name}"), vec![v.len()], bytes_of(v)));
        }
    }
    let views: Vec<(String, TensorView<'_>)> = named
        .iter()
        .map(|(n, shape, b)| {
            TensorView::new(Dtype::F32, shape.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| ParallelError::io(dir, e))
        })
        .collect::<Result<_>>()?;
    let mut info = HashMap::new();
    info.insert("optimizer_step".to_string(), optimizer.step.to_string());
    let file = dir.join(format!("rank-{rank:05}.safetensors"));
    let bytes =
        safetensors::serialize(views, Some(info)).map_err(|e| ParallelError::io(&file, e))?;
    std::fs::write(&file, bytes).map_err(|e| ParallelError::io(&file, e))
}

/// Completes checkpoint folder `dir` once every rank file is in it: writes `meta.json` and
/// `SHA256SUMS`.
pub fn finish<T: CheckpointMeta>(dir: &Path, meta: &T) -> Result<()> {
    let meta_path = dir.join("meta.json");
    let text = serde_json::to_string_pretty(meta).map_err(|e| ParallelError::io(&meta_path, e))?;
    std::fs::write(&meta_path, text).map_err(|e| ParallelError::io(&meta_path, e))?;
    write_checksums(dir)
}

/// Writes this rank's part of a checkpoint and, collectively, publishes it.
pub fn save<M: Module, T: CheckpointMeta>(
    run_dir: &Path,
    meta: &T,
    module: &M,
    optimizer: &OptimizerState,
    world: &dyn Communicator,
    keep: usize,
) -> Result<PathBuf> {
    let final_dir = step_dir(run_dir, meta.step());
    let tmp = final_dir.with_extension("tmp");
    if world.rank() == 0 {
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| ParallelError::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| ParallelError::io(&tmp, e))?;
    }
    world.barrier()?;
    write_rank(&tmp, module, optimizer, world.rank())?;
    world.barrier()?;
    if world.rank() == 0 {
        finish(&tmp, meta)?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(|e| ParallelError::io(&final_dir, e))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(|e| ParallelError::io(&final_dir, e))?;
        prune(run_dir, keep)?;
    }
    world.barrier()?;
    Ok(final_dir)
}

fn prune(run_dir: &Path, keep: usize) -> Result<()> {
    let steps = complete_steps(run_dir)?;
    let excess = steps.len().saturating_sub(keep);
    for old in steps.into_iter().take(excess) {
        std::fs::remove_dir_all(&old).map_err(|e| ParallelError::io(&old, e))?;
    }
    Ok(())
}

struct Load {
    values: Vec<(Vec<usize>, Vec<f32>)>,
    next: usize,
    error: Option<String>,
}

impl ModuleMapper for Load {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let i = self.next;
        self.next += 1;
        let Some((shape, values)) = self.values.get(i).cloned() else {
            self.error
                .get_or_insert(format!("no tensor for parameter {i}"));
            return param;
        };
        param.map(|t| {
            if t.dims().as_slice() != shape.as_slice() {
                self.error.get_or_insert(format!(
                    "parameter {i} has shape {:?}, the checkpoint {shape:?}",
                    t.dims()
                ));
                return t;
            }
            let device = t.device();
            let track = t.is_require_grad();
            crate::transfers::upload("checkpoint: a parameter", 4 * values.len() as u64);
            // In the parameter's own precision (checkpoints hold f32).
            let fresh =
                Tensor::<D>::from_data(TensorData::new(values, shape), &device).cast(t.dtype());
            if track { fresh.require_grad() } else { fresh }
        })
    }
}

/// Every float parameter of `module` (shape and values), in module order.
pub fn read_params<M: Module>(module: &M) -> Vec<(Vec<usize>, Vec<f32>)> {
    named_params(module)
        .into_iter()
        .map(|(_, shape, values)| (shape, values))
        .collect()
}

/// `module` with its float parameters replaced by `values` (module order, as
/// [`read_params`] gives them), keeping devices and gradient tracking; errors name the first
/// parameter whose shape differs and a count that does not match.
pub fn write_params<M: Module>(module: M, values: Vec<(Vec<usize>, Vec<f32>)>) -> Result<M> {
    let invalid = |reason: String| ParallelError::InvalidArgument {
        name: "values",
        reason,
    };
    let mut loader = Load {
        values,
        next: 0,
        error: None,
    };
    let module = module.map(&mut loader);
    if let Some(e) = loader.error {
        return Err(invalid(e));
    }
    if loader.next != loader.values.len() {
        return Err(invalid(format!(
            "{} tensors for {} parameters",
            loader.values.len(),
            loader.next
        )));
    }
    Ok(module)
}

/// Loads this rank's parameters and optimizer state from a checkpoint folder.
pub fn load<M: Module>(dir: &Path, module: M, rank: usize) -> Result<(M, OptimizerState)> {
    verify(dir)?;
    let file = dir.join(format!("rank-{rank:05}.safetensors"));
    let bytes = std::fs::read(&file).map_err(|e| ParallelError::io(&file, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| ParallelError::io(&file, e))?;
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    // Parameters by module path (this format), or by position (`param.NNNNN`, the earlier one).
    let mut by_path = HashMap::new();
    let mut by_position = Vec::new();
    let mut shards: Vec<[Vec<f32>; 3]> = Vec::new();
    for name in &names {
        let view = st.tensor(name).map_err(|e| ParallelError::io(&file, e))?;
        let values = floats_of(view.data());
        if let Some(path) = name.strip_prefix("model.") {
            by_path.insert(path.to_string(), (view.shape().to_vec(), values));
        } else if name.starts_with("param.") {
            by_position.push((view.shape().to_vec(), values));
        } else if let Some(rest) = name.strip_prefix("opt.") {
            let (class, which) = rest
                .split_once('.')
                .ok_or_else(|| ParallelError::io(&file, "bad tensor name"))?;
            let class: usize = class
                .parse()
                .map_err(|_| ParallelError::io(&file, "bad tensor name"))?;
            while shards.len() <= class {
                shards.push([Vec::new(), Vec::new(), Vec::new()]);
            }
            let slot = match which {
                "master" => 0,
                "m" => 1,
                "v" => 2,
                _ => return Err(ParallelError::io(&file, format!("unknown tensor {name}"))),
            };
            shards[class][slot] = values;
        }
    }
    let params = if by_position.is_empty() {
        let mut params = Vec::new();
        for (path, shape, _) in named_params(&module) {
            let (got, values) = by_path.remove(&path).ok_or_else(|| {
                ParallelError::io(&file, format!("no tensor for parameter `{path}`"))
            })?;
            if got != shape {
                return Err(ParallelError::io(
                    &file,
                    format!("parameter `{path}` has shape {shape:?}, the checkpoint {got:?}"),
                ));
            }
            params.push((shape, values));
        }
        if let Some(extra) = by_path.keys().min() {
            return Err(ParallelError::io(
                &file,
                format!("tensor `model.{extra}` is no parameter of this model"),
            ));
        }
        params
    } else {
        by_position
    };
    let module = write_params(module, params).map_err(|e| ParallelError::io(&file, e))?;
    let meta_step = {
        let (_, metadata) =
            SafeTensors::read_metadata(&bytes).map_err(|e| ParallelError::io(&file, e))?;
        metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get("optimizer_step"))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| ParallelError::io(&file, "no optimizer_step in the metadata"))?
    };
    Ok((
        module,
        OptimizerState {
            step: meta_step,
            shards,
        },
    ))
}

/// One rank's file of a checkpoint, opened to read tensors by their byte offsets (only the
/// header is read on opening; [`read`](Self::read) reads one tensor's bytes, or a range of
/// its elements): what a rank reading a checkpoint written under another layout uses, so that
/// it reads only the parts it needs.
#[derive(Debug)]
pub struct RankFile {
    path: PathBuf,
    file: std::fs::File,
    data_start: u64,
    tensors: HashMap<String, (Vec<usize>, (usize, usize))>,
    optimizer_step: u64,
}

impl RankFile {
    /// Rank `rank`'s file of checkpoint folder `dir` (checked with [`verify`] by the caller).
    pub fn open(dir: &Path, rank: usize) -> Result<Self> {
        use std::io::Read;
        let path = dir.join(format!("rank-{rank:05}.safetensors"));
        let mut file = std::fs::File::open(&path).map_err(|e| ParallelError::io(&path, e))?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len)
            .map_err(|e| ParallelError::io(&path, e))?;
        let n = u64::from_le_bytes(len);
        let size = file
            .metadata()
            .map_err(|e| ParallelError::io(&path, e))?
            .len();
        if n.saturating_add(8) > size {
            return Err(ParallelError::io(
                &path,
                "its header is longer than the file",
            ));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header)
            .map_err(|e| ParallelError::io(&path, e))?;
        // The header alone: the tensors' offsets (checked to tile the data) and the metadata.
        let metadata: safetensors::tensor::Metadata =
            serde_json::from_slice(&header).map_err(|e| ParallelError::io(&path, e))?;
        let data_len = metadata
            .tensors()
            .values()
            .map(|info| info.data_offsets.1)
            .max()
            .unwrap_or(0) as u64;
        if 8 + n + data_len != size {
            return Err(ParallelError::io(
                &path,
                format!(
                    "is {size} bytes but its header describes {}",
                    8 + n + data_len
                ),
            ));
        }
        let mut tensors = HashMap::new();
        for (name, info) in metadata.tensors() {
            if info.dtype != Dtype::F32 {
                return Err(ParallelError::io(
                    &path,
                    format!("tensor `{name}` is {:?}; checkpoints hold f32", info.dtype),
                ));
            }
            tensors.insert(name, (info.shape.clone(), info.data_offsets));
        }
        let optimizer_step = metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get("optimizer_step"))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| ParallelError::io(&path, "no optimizer_step in the metadata"))?;
        Ok(Self {
            path,
            file,
            data_start: 8 + n,
            tensors,
            optimizer_step,
        })
    }

    /// The optimizer steps recorded in the file.
    pub fn optimizer_step(&self) -> u64 {
        self.optimizer_step
    }

    /// The shape of tensor `name`, if the file has it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|(shape, _)| shape.as_slice())
    }

    /// The names of the file's tensors, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Elements `range` of tensor `name` (flat, row-major), read from their offsets.
    pub fn read(&mut self, name: &str, range: std::ops::Range<usize>) -> Result<Vec<f32>> {
        use std::io::{Read, Seek, SeekFrom};
        let Some((_, (start, end))) = self.tensors.get(name) else {
            return Err(ParallelError::io(
                &self.path,
                format!("has no tensor `{name}`"),
            ));
        };
        let numel = (end - start) / 4;
        if range.start > range.end || range.end > numel {
            return Err(ParallelError::io(
                &self.path,
                format!("tensor `{name}` has {numel} values; {range:?} was asked for"),
            ));
        }
        let at = self.data_start + (start + 4 * range.start) as u64;
        let mut bytes = vec![0u8; 4 * range.len()];
        self.file
            .seek(SeekFrom::Start(at))
            .and_then(|_| self.file.read_exact(&mut bytes))
            .map_err(|e| ParallelError::io(&self.path, e))?;
        Ok(floats_of(&bytes))
    }

    /// Every element of tensor `name`.
    pub fn read_all(&mut self, name: &str) -> Result<Vec<f32>> {
        let numel = self
            .tensors
            .get(name)
            .map_or(0, |(_, (start, end))| (end - start) / 4);
        self.read(name, 0..numel)
    }
}
