//! Hugging Face checkpoints as training runs: [`import_hf`] turns a hub folder (Mixtral,
//! Qwen3-MoE, OLMoE, Qwen2-MoE; [`burn_moe::lm::hf`]) into a run folder — a recipe derived
//! from its `config.json` and a step-0 checkpoint — that `train --resume` fine-tunes under
//! any `[parallel]` layout; `export hf` hands a run back in the hub's format.

use std::path::{Path, PathBuf};

use burn_moe::lm::{MoeLm, MoeLmConfig, QkNorm};
use burn_moe::prelude::Activation;

use crate::error::{RecipeError, Result};
use crate::recipe::{ExpertActivation, ModelConfig, QkNormName, Recipe, RouterTable};

fn unsupported(reason: impl Into<String>) -> RecipeError {
    RecipeError::invalid("DIR", reason)
}

/// The recipe's `[model]` table of a library configuration read from the hub; refused when
/// the model has an option a recipe cannot state (then the table would train another model).
pub fn model_table(config: &MoeLmConfig) -> Result<ModelConfig> {
    let moe = config
        .moe
        .as_ref()
        .ok_or_else(|| unsupported("a model without MoE layers has no recipe"))?;
    let r = &moe.router;
    if moe.experts.activation != Activation::SwiGlu {
        return Err(unsupported("only SwiGLU experts come from the hub"));
    }
    let table = ModelConfig {
        vocab: config.vocab,
        hidden: config.hidden,
        layers: config.layers,
        heads: config.heads,
        kv_heads: config.kv_heads,
        ffn_hidden: config.ffn_hidden,
        moe_every: config.moe_every,
        experts: r.num_experts,
        topk: r.topk,
        expert_ffn_hidden: Some(moe.experts.ffn_hidden),
        shared_expert_ffn_hidden: moe.shared.as_ref().map(|s| s.ffn_hidden),
        aux_loss_coeff: r.aux_loss_coeff,
        z_loss_coeff: r.z_loss_coeff,
        capacity_factor: None,
        rope_theta: config.rope_theta,
        init_std: config.init_std,
        norm_eps: config.norm_eps,
        tie_embeddings: config.tie_embeddings,
        shared_expert_gate: moe.shared.as_ref().is_some_and(|s| s.gate),
        expert_activation: ExpertActivation::Swiglu,
        router: Some(RouterTable {
            pre_softmax: Some(r.pre_softmax),
            ..RouterTable::default()
        }),
        head_dim: config.head_dim,
        qk_norm: match config.qk_norm {
            QkNorm::Off => QkNormName::Off,
            QkNorm::PerHead => QkNormName::PerHead,
            QkNorm::Whole => QkNormName::Whole,
        },
        qkv_bias: config.qkv_bias,
        dense_layers: config.dense_layers.clone(),
    };
    // The table must give back the very configuration (every field, the router's and the
    // experts' included).
    let (want, got) = (format!("{config:?}"), format!("{:?}", table.lm_config()));
    if want != got {
        return Err(unsupported(format!(
            "the model has options a recipe cannot state: {want} (a recipe gives {got})"
        )));
    }
    Ok(table)
}

/// The recipe of a run fine-tuning `config` into `out`: its `[model]` table, the Markov
/// source over its vocabulary, a short fine-tuning schedule, one rank; then `overrides`
/// (`SECTION.KEY=VALUE`, as `--set`), and validated.
pub fn import_recipe(config: &MoeLmConfig, out: &Path, overrides: &[String]) -> Result<Recipe> {
    #[derive(serde::Serialize)]
    struct Model<'a> {
        model: &'a ModelConfig,
    }
    let model = toml::to_string(&Model {
        model: &model_table(config)?,
    })
    .map_err(|e| unsupported(e.to_string()))?;
    let run = toml::Value::String(out.display().to_string());
    let text = format!(
        "[run]\ndir = {run}\nseed = 0\n\n{model}\n\
         [data]\nsource = \"markov\"\nseq_len = 64\n\n\
         [training]\nsteps = 100\nmicro_batch = 4\nglobal_batch = 8\nlr = 1e-4\n\
         min_lr = 1e-5\nwarmup_steps = 10\ngrad_clip = 1.0\ncheckpoint_every = 0\n"
    );
    let recipe = Recipe::parse(&text, overrides)?;
    recipe.validate()?;
    if recipe.run.dir != out {
        return Err(RecipeError::invalid(
            "run.dir",
            "is the folder `--out` names; it cannot be set",
        ));
    }
    Ok(recipe)
}

/// `import hf DIR --out OUT`: reads the hub checkpoint in `dir` whole (every tensor checked
/// against `config.json`), derives its recipe ([`import_recipe`], with `overrides`), and
/// writes `OUT/recipe.toml` and `OUT/checkpoints/step-000000` (the model, no optimizer
/// state yet; [`burn_moe::lm::save_initial`]). Nothing is written unless all of that
/// succeeds; `OUT` must not exist. Returns the recipe.
pub fn import_hf(dir: &Path, out: &Path, overrides: &[String]) -> Result<Recipe> {
    if out.exists() {
        return Err(RecipeError::invalid(
            "--out",
            format!("{} already exists", out.display()),
        ));
    }
    let device = burn::tensor::Device::flex();
    let model = MoeLm::from_hf(dir, &device).map_err(|e| unsupported(e.to_string()))?;
    let out = absolute(out)?;
    let recipe = import_recipe(model.config(), &out, overrides)?;
    let written = (|| -> Result<()> {
        std::fs::create_dir_all(&out).map_err(|e| RecipeError::io(&out, e))?;
        let path = out.join("recipe.toml");
        let text = toml::to_string_pretty(&recipe).map_err(|e| RecipeError::io(&path, e))?;
        std::fs::write(&path, text).map_err(|e| RecipeError::io(&path, e))?;
        burn_moe::lm::save_initial(&model, &out, recipe.run.seed)?;
        Ok(())
    })();
    if let Err(e) = written {
        // Nothing half-written stays behind.
        let _ = std::fs::remove_dir_all(&out);
        return Err(e);
    }
    Ok(recipe)
}

/// `path` from the working directory (the recipe records where the run is, wherever it is
/// resumed from).
fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).map_err(|e| RecipeError::io(path, e))
}
