//! The 16-bit element type of the CUDA backend: what weights, activations fed to GEMMs, LoRA
//! weights and the KV cache are stored as (accumulation is f32 either way). It picks the
//! kernels' build ([`Elem::source_prefix`], read by the `kernels.rs` prelude), the cuBLAS data
//! type, and how the host encodes f32 values it uploads.

use cudarc::cublas::sys::cudaDataType;
use half::{bf16, f16};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Elem {
    /// bfloat16: f32's range, 8 bits of mantissa
    #[default]
    Bf16,
    /// IEEE float16: 11 bits of mantissa, largest finite 65504
    F16,
}

impl Elem {
    pub const ALL: [Elem; 2] = [Elem::Bf16, Elem::F16];

    /// The element type for the engine's `dtype` (`auto` reads the checkpoint's `torch_dtype`,
    /// bfloat16 where it has none); `None` where that is not a 16-bit type (float32), which the
    /// caller runs as bf16.
    pub fn from_dtype(dtype: &str, torch_dtype: Option<&str>) -> Option<Elem> {
        let wanted = match dtype {
            "auto" => torch_dtype.unwrap_or("bfloat16"),
            d => d,
        };
        match wanted {
            "bfloat16" | "bf16" => Some(Elem::Bf16),
            "float16" | "half" | "fp16" => Some(Elem::F16),
            _ => None,
        }
    }

    /// torch's name, as `dtype` and `torch_dtype` spell it.
    pub fn name(self) -> &'static str {
        match self {
            Elem::Bf16 => "bfloat16",
            Elem::F16 => "float16",
        }
    }

    /// What goes before the prelude of every module built for this type.
    pub fn source_prefix(self) -> &'static str {
        match self {
            Elem::Bf16 => "",
            Elem::F16 => "#define ML_F16 1\n",
        }
    }

    /// cuBLAS's name for the type (inputs of `Gpu::gemm`).
    pub fn cuda_type(self) -> cudaDataType {
        match self {
            Elem::Bf16 => cudaDataType::CUDA_R_16BF,
            Elem::F16 => cudaDataType::CUDA_R_16F,
        }
    }

    /// The bits of `v` rounded to this type (nearest even).
    pub fn encode(self, v: f32) -> u16 {
        match self {
            Elem::Bf16 => bf16::from_f32(v).to_bits(),
            Elem::F16 => f16::from_f32(v).to_bits(),
        }
    }

    pub fn decode(self, bits: u16) -> f32 {
        match self {
            Elem::Bf16 => bf16::from_bits(bits).to_f32(),
            Elem::F16 => f16::from_bits(bits).to_f32(),
        }
    }

    pub fn encode_all(self, v: &[f32]) -> Vec<u16> {
        v.iter().map(|&x| self.encode(x)).collect()
    }

    /// `v` rounded to this type, as f32.
    pub fn round(self, v: f32) -> f32 {
        self.decode(self.encode(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_resolution() {
        assert_eq!(Elem::from_dtype("bfloat16", Some("float16")), Some(Elem::Bf16));
        assert_eq!(Elem::from_dtype("float16", None), Some(Elem::F16));
        assert_eq!(Elem::from_dtype("half", Some("bfloat16")), Some(Elem::F16));
        assert_eq!(Elem::from_dtype("auto", Some("float16")), Some(Elem::F16));
        assert_eq!(Elem::from_dtype("auto", Some("bfloat16")), Some(Elem::Bf16));
        assert_eq!(Elem::from_dtype("auto", None), Some(Elem::Bf16));
        assert_eq!(Elem::from_dtype("auto", Some("float32")), None);
        assert_eq!(Elem::from_dtype("float32", Some("bfloat16")), None);
        assert_eq!(Elem::from_dtype("float", None), None);
    }

    #[test]
    fn encodings_round_trip_and_differ() {
        for e in Elem::ALL {
            for v in [0.0f32, 1.0, -2.5, 0.1, 1e-3, 1000.0] {
                let r = e.round(v);
                assert!((r - v).abs() <= v.abs() * 4e-3, "{e:?} {v} -> {r}");
                assert_eq!(e.encode(r), e.encode(v), "{e:?}: rounding is idempotent");
            }
        }
        assert_eq!(Elem::Bf16.encode(1.0), 0x3f80);
        assert_eq!(Elem::F16.encode(1.0), 0x3c00);
        // f16 keeps more mantissa, bf16 more range.
        assert!((Elem::F16.round(0.1) - 0.1).abs() < (Elem::Bf16.round(0.1) - 0.1).abs());
        assert!(Elem::F16.round(1e5).is_infinite() && Elem::Bf16.round(1e5).is_finite());
    }
}
