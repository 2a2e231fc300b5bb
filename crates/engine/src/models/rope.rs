//! Rotary position embedding math both backends share: HF's inverse frequencies (with the
//! `rope_scaling` rules) and the cos/sin tables built from them, so the CPU oracle and the CUDA
//! backend rotate by the same f32 values.

use crate::model_config::RopeScaling;
use crate::ModelConfig;

/// HF's inverse frequencies, with the scaling rules of `rope_type` linear and llama3.
pub fn inv_freq(cfg: &ModelConfig) -> Vec<f32> {
    let dim = cfg.head_dim;
    let base = cfg.rope_theta as f64;
    let mut f: Vec<f64> = (0..dim / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f64 / dim as f64))
        .collect();
    match cfg.rope_scaling {
        None => {}
        Some(RopeScaling::Linear { factor }) => f.iter_mut().for_each(|v| *v /= factor as f64),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let (factor, low, high, old) = (
                factor as f64,
                low_freq_factor as f64,
                high_freq_factor as f64,
                original_max_position_embeddings as f64,
            );
            let low_wavelen = old / low;
            let high_wavelen = old / high;
            for v in f.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *v;
                if wavelen > low_wavelen {
                    *v /= factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (old / wavelen - low) / (high - low);
                    *v = (1.0 - smooth) * *v / factor + smooth * *v;
                }
            }
        }
    }
    f.into_iter().map(|v| v as f32).collect()
}

/// cos and sin tables, `[max_positions, head_dim / 2]` each (HF's non-interleaved layout):
/// entry (p, i) is the angle `p · inv_freq[i]`, computed in f32 as HF does.
pub fn tables(cfg: &ModelConfig, max_positions: usize) -> (Vec<f32>, Vec<f32>) {
    let inv = inv_freq(cfg);
    let mut cos = Vec::with_capacity(max_positions * inv.len());
    let mut sin = Vec::with_capacity(max_positions * inv.len());
    for p in 0..max_positions {
        for &f in &inv {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    (cos, sin)
}
