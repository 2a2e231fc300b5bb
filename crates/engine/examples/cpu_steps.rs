//! Times the CPU backend's forward on fixed shapes, for `bench/cpu_peer.py`: `B` prompts of `P`
//! tokens prefilled in one step, then `D` decode steps of the whole batch. Dummy weights from
//! `MODEL_DIR/config.json`; the engine's scheduler and sampling are left out on purpose, so the
//! figures compare with a bare transformers forward.
//!
//! usage: cargo run --release --example cpu_steps -- MODEL_DIR B P D [DTYPE [R]]
//! (DTYPE: float32, the default, bfloat16 or float16: what the weights are kept in; R: how many
//! times the prefill is timed, 1 by default)
//! prints one JSON line: {"batch", "prompt", "dtype", "prefill_ms" (median of R), "decode_ms"
//! (median step)}

use std::time::Instant;

use multilora_engine::backend::{Backend, BackendConfig, StepBatch};
use multilora_engine::cpu::CpuBackend;
use multilora_engine::weights::{WeightDtype, WeightSource};
use multilora_engine::ModelConfig;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        (4..=6).contains(&args.len()),
        "usage: cpu_steps MODEL_DIR B P D [DTYPE [R]]"
    );
    let prefill_runs: usize = match args.get(5) {
        None => 1,
        Some(r) => r
            .parse()
            .map_err(|_| anyhow::anyhow!("R {r:?}: expected how many times to time the prefill, e.g. 3"))?,
    };
    let dtype_name = args.get(4).map_or("float32", String::as_str);
    let dtype = WeightDtype::from_name(dtype_name)
        .ok_or_else(|| anyhow::anyhow!("DTYPE {dtype_name:?}: expected float32, bfloat16 or float16"))?;
    let cfg = ModelConfig::from_dir(std::path::Path::new(&args[0]))?;
    let (b, p, d): (usize, usize, usize) = (args[1].parse()?, args[2].parse()?, args[3].parse()?);
    let block_size = 16;
    let blocks_per_seq = (p + d).div_ceil(block_size);
    let bc = BackendConfig {
        max_num_batched_tokens: b * p,
        max_num_seqs: b,
        max_model_len: p + d,
        block_size,
        kv: multilora_engine::backend::KvBudget {
            wanted_blocks: b * blocks_per_seq,
            num_blocks_override: Some(b * blocks_per_seq),
            memory_bytes: None,
            gpu_memory_utilization: 0.9,
        },
        max_loras: 0,
        max_lora_rank: 0,
        tensor_parallel_size: 1,
        enforce_eager: true,
        sync_lora_uploads: false,
        dtype: dtype.name().into(),
        seed: 0,
        cuda: Default::default(),
    };
    let mut backend = CpuBackend::new(&cfg, &mut WeightSource::dummy(0), &bc)?;
    let mut batch = StepBatch::default();
    // Step `s` of the run: s == 0 is the prefill, then one token a sequence.
    let fill = |batch: &mut StepBatch, s: usize| {
        batch.clear();
        batch.max_blocks_per_seq = blocks_per_seq;
        for seq in 0..b {
            let range = if s == 0 { 0..p } else { p + s - 1..p + s };
            for pos in range {
                batch
                    .token_ids
                    .push(((seq * 7919 + pos * 104729) % cfg.vocab_size) as u32);
                batch.positions.push(pos as u32);
                let block = seq * blocks_per_seq + pos / block_size;
                batch
                    .slot_mapping
                    .push((block * block_size + pos % block_size) as u32);
                batch.token_lora.push(None);
            }
            batch.query_start.push(batch.token_ids.len() as u32);
            batch
                .block_tables
                .extend((0..blocks_per_seq).map(|i| (seq * blocks_per_seq + i) as u32));
        }
    };
    let mut step = |s: usize| -> anyhow::Result<f64> {
        fill(&mut batch, s);
        let t = Instant::now();
        let logits = backend.forward(&batch)?;
        std::hint::black_box(logits);
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    // A warm-up run, then the measured one.
    for s in 0..=d.min(2) {
        step(s)?;
    }
    let mut prefill: Vec<f64> = (0..prefill_runs.max(1))
        .map(|_| step(0))
        .collect::<anyhow::Result<_>>()?;
    prefill.sort_by(f64::total_cmp);
    let prefill_ms = prefill[prefill.len() / 2];
    let mut decode: Vec<f64> = (1..=d).map(&mut step).collect::<anyhow::Result<_>>()?;
    decode.sort_by(f64::total_cmp);
    let decode_ms = decode.get(decode.len() / 2).copied().unwrap_or(f64::NAN);
    println!(
        r#"{{"batch": {b}, "prompt": {p}, "dtype": "{}", "prefill_ms": {prefill_ms:.3}, "decode_ms": {decode_ms:.3}}}"#,
        dtype.name()
    );
    Ok(())
}
