//! The requests of every point of a run, built and checked before anything is measured, so a
//! mistake in the config fails in the first second with a message that names the file, the key
//! and the value, instead of after half an hour of measurements.

use anyhow::{bail, Context};
use multilora_engine::lora::adapter::LoraAdapter;
use multilora_engine::ModelConfig;

use super::backend::{Backend, BenchLora, BenchRequest};
use super::config::BenchConfig;
use super::inputs::AdapterSet;
use super::workload::Series;

/// One series at one batch size, ready to run.
pub struct PlannedPoint {
    pub series: Series,
    pub batch_size: usize,
    pub adapter_indices: Vec<usize>,
    pub requests: Vec<BenchRequest>,
    /// Known before running: why this point will not run as one batch.
    pub warnings: Vec<String>,
}

/// The original's naming: adapter index `i` is `lora-{i+1}` with int id `i+1`.
fn lora_request(set: &AdapterSet, i: usize) -> BenchLora {
    BenchLora {
        name: format!("lora-{}", i + 1),
        int_id: i as u32 + 1,
        path: set.path(i),
    }
}

pub fn build(
    cfg: &BenchConfig,
    prompts: Option<&[String]>,
    adapters: Option<&AdapterSet>,
) -> anyhow::Result<Vec<PlannedPoint>> {
    let e = &cfg.engine;
    let f = cfg.config_path.display();
    let mut points = Vec::new();
    for series in cfg.series() {
        for &b in &cfg.batch_sizes {
            if b > e.max_num_seqs {
                bail!(
                    "batch size {b} is above max_num_seqs {} ({f} or --max-num-seqs): the engine would run the batch in waves and the decode steps would not be the batch's; raise max_num_seqs or drop the batch size",
                    e.max_num_seqs
                );
            }
            let point = match series {
                Series::NoLora => {
                    let prompts = prompts.context("no-LoRA needs no_lora_prompts_path")?;
                    let file = cfg
                        .no_lora_prompts_path
                        .as_ref()
                        .map_or(String::new(), |p| p.display().to_string());
                    if prompts.len() < b {
                        bail!(
                            "{file} holds {} prompts, fewer than batch size {b}: no-LoRA request i uses prompt i; add prompts or drop the batch size",
                            prompts.len()
                        );
                    }
                    PlannedPoint {
                        series,
                        batch_size: b,
                        adapter_indices: Vec::new(),
                        requests: (0..b)
                            .map(|j| BenchRequest {
                                request_id: j.to_string(),
                                prompt: prompts[j].clone(),
                                lora: None,
                            })
                            .collect(),
                        warnings: Vec::new(),
                    }
                }
                Series::Lora(w) => {
                    let set = adapters.context("multi-LoRA needs adapters")?;
                    let file = set.file.display();
                    let need = w.num_adapters_needed(b, cfg.identical_lora_id);
                    if set.len() < need {
                        match w {
                            super::workload::Workload::Identical => bail!(
                                "identical_lora_id {} ({f} or --identical-lora-id) is out of range: the rank-{} group of {file} has {} adapters (0..{})",
                                cfg.identical_lora_id,
                                set.rank,
                                set.len(),
                                set.len() - 1
                            ),
                            _ => bail!(
                                "workload {} at batch size {b} needs {need} adapters, but the rank-{} group of {file} lists {}; add adapters (multilora adapters synth) or drop the batch size",
                                w.name(),
                                set.rank,
                                set.len()
                            ),
                        }
                    }
                    let indices = w.adapter_indices(b, cfg.random_seed, cfg.identical_lora_id);
                    let mut requests = Vec::with_capacity(b);
                    for (j, &i) in indices.iter().enumerate() {
                        let prompt = set.prompts[i].clone().with_context(|| {
                            format!(
                                "adapter {:?} (index {i} in the rank-{} group of {file}) has no \"prompt\", and prompts.json has no prompt {i} to fall back to",
                                set.names[i], set.rank
                            )
                        })?;
                        requests.push(BenchRequest {
                            request_id: j.to_string(),
                            prompt,
                            lora: Some(lora_request(set, i)),
                        });
                    }
                    let mut distinct = indices.clone();
                    distinct.sort_unstable();
                    distinct.dedup();
                    let mut warnings = Vec::new();
                    if distinct.len() > e.max_loras {
                        warnings.push(format!(
                            "{} distinct adapters but max_loras {}: the engine runs the batch in waves",
                            distinct.len(),
                            e.max_loras
                        ));
                    }
                    let max_cpu = e.max_cpu_loras.unwrap_or(e.max_loras);
                    if distinct.len() > max_cpu {
                        warnings.push(format!(
                            "{} distinct adapters but max_cpu_loras {max_cpu}: adapters are reloaded from disk during the run",
                            distinct.len()
                        ));
                    }
                    PlannedPoint {
                        series,
                        batch_size: b,
                        adapter_indices: indices,
                        requests,
                        warnings,
                    }
                }
            };
            points.push(point);
        }
    }
    Ok(points)
}

/// Every adapter a point uses must be a folder with `adapter_config.json` and, given the base
/// model's config, must load: its config, every tensor read and its shapes and rank checked
/// against the model, so a broken adapter stops the run before anything is measured.
pub fn check_adapters(
    cfg: &BenchConfig,
    set: &AdapterSet,
    points: &[PlannedPoint],
    model: Option<&ModelConfig>,
) -> anyhow::Result<()> {
    let mut used: Vec<usize> = points
        .iter()
        .flat_map(|p| p.adapter_indices.iter().copied())
        .collect();
    used.sort_unstable();
    used.dedup();
    for i in used {
        let dir = set.path(i);
        if !dir.join("adapter_config.json").is_file() {
            let what = if dir.is_dir() {
                "has no adapter_config.json"
            } else {
                "is missing"
            };
            bail!(
                "adapter folder {} {what} (adapter {:?}, index {i} in the rank-{} group of {}, under lora_adapters_path {})",
                dir.display(),
                set.names[i],
                set.rank,
                set.file.display(),
                set.root.display()
            );
        }
        if let Some(model) = model {
            LoraAdapter::load(&set.names[i], &dir, model, cfg.engine.max_lora_rank).with_context(|| {
                format!(
                    "index {i} in the rank-{} group of {}",
                    set.rank,
                    set.file.display()
                )
            })?;
        }
    }
    Ok(())
}

/// Every prompt plus `num_tokens` (and the warm-up's) must fit `max_model_len`.
pub fn check_prompt_lengths(
    cfg: &BenchConfig,
    points: &[PlannedPoint],
    backend: &mut dyn Backend,
) -> anyhow::Result<()> {
    let max_model_len = backend.max_model_len();
    let num_tokens = cfg.num_tokens.max(cfg.warmup_num_tokens);
    for p in points {
        for r in &p.requests {
            let n = backend.num_prompt_tokens(&r.prompt)?;
            if n + num_tokens > max_model_len {
                let source = match (&r.lora, &cfg.no_lora_prompts_path) {
                    (Some(l), _) => format!("the prompt of adapter {}", l.path.display()),
                    // Request i of a no-LoRA batch uses prompt i (0-based, as the list's index).
                    (None, Some(file)) => format!("prompt {} of {}", r.request_id, file.display()),
                    (None, None) => format!("no-LoRA prompt {}", r.request_id),
                };
                bail!(
                    "{source} has {n} tokens; with num_tokens {num_tokens} that is {} tokens, above max_model_len {max_model_len} ({} or --max-model-len); raise max_model_len or lower num_tokens",
                    n + num_tokens,
                    cfg.config_path.display()
                );
            }
        }
    }
    Ok(())
}
