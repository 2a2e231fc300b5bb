//! Where model and adapter tensors come from: safetensors files (one, or many through
//! `model.safetensors.index.json`), memory-mapped, or random values for `load_format: dummy`.
//! Every tensor is handed out as f32 with its shape checked; bf16/f16 are widened here, once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use rand::{Rng, SeedableRng};
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::error::{read_json, Error, Result};

/// A set of memory-mapped safetensors files and the tensor names they hold.
pub struct SafetensorsFiles {
    files: Vec<(PathBuf, Mmap)>,
    /// tensor name -> index into `files`
    index: HashMap<String, usize>,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

impl SafetensorsFiles {
    /// Opens the weights of a HF model directory: `model.safetensors`, or the shards listed in
    /// `model.safetensors.index.json`.
    pub fn open_model_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        if index_path.exists() {
            let index: ShardIndex = read_json(&index_path)?;
            let mut names: Vec<&String> = index.weight_map.values().collect();
            names.sort();
            names.dedup();
            let paths: Vec<PathBuf> = names.into_iter().map(|n| dir.join(n)).collect();
            Self::open(&paths)
        } else if single.exists() {
            Self::open(&[single])
        } else {
            let has_bin =
                dir.join("pytorch_model.bin").exists() || dir.join("pytorch_model.bin.index.json").exists();
            let msg = if has_bin {
                "only PyTorch .bin weights found; multilora reads safetensors (convert the checkpoint, or use load_format \"dummy\")"
            } else {
                "no model.safetensors or model.safetensors.index.json found"
            };
            Err(Error::model(dir, msg))
        }
    }

    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the file is opened read-only; like every mmap-based loader we assume it is
            // not truncated while the engine holds it.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let st = SafeTensors::deserialize(&mmap)
                .map_err(|e| Error::model(path, format!("not a valid safetensors file: {e}")))?;
            for name in st.names() {
                index.insert(name.to_string(), i);
            }
            files.push((path.clone(), mmap));
        }
        Ok(SafetensorsFiles { files, index })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Path of the file holding `name` (or the first file), for error messages.
    pub fn path_of(&self, name: &str) -> &Path {
        let i = self.index.get(name).copied().unwrap_or(0);
        &self.files[i].0
    }

    /// The tensor's shape, without reading its data.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let (path, view) = self.view(name)?;
        let _ = path;
        Ok(view.shape().to_vec())
    }

    fn view(&self, name: &str) -> Result<(&Path, safetensors::tensor::TensorView<'_>)> {
        let &i = self.index.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.files.first().map(|f| f.0.clone()).unwrap_or_default(),
            name: name.to_string(),
        })?;
        let (path, mmap) = &self.files[i];
        let st = SafeTensors::deserialize(mmap)
            .map_err(|e| Error::model(path, format!("not a valid safetensors file: {e}")))?;
        let view = st
            .tensor(name)
            .map_err(|e| Error::model(path, format!("tensor {name:?}: {e}")))?;
        Ok((path, view))
    }

    /// Reads a tensor as f32, checking its shape.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (path, view) = self.view(name)?;
        if view.shape() != shape {
            return Err(Error::model(
                path,
                format!("tensor {name:?} has shape {:?}, expected {shape:?}", view.shape()),
            ));
        }
        to_f32(view.dtype(), view.data()).ok_or_else(|| {
            Error::model(
                path,
                format!(
                    "tensor {name:?} has dtype {:?}; expected F32, F16 or BF16",
                    view.dtype()
                ),
            )
        })
    }
}

/// Widens little-endian f32/f16/bf16 bytes to f32. The data may be unaligned in the file, so
/// bytes are decoded rather than cast.
pub fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

/// The source of a model's weights: a checkpoint, or seeded random values (vLLM's
/// `load_format="dummy"`), so large shapes can be benchmarked from `config.json` alone.
pub enum WeightSource {
    Files {
        dir: PathBuf,
        files: SafetensorsFiles,
    },
    Dummy {
        seed: u64,
        /// Tensors handed out so far; each tensor gets its own stream.
        num_tensors: u64,
    },
}

impl WeightSource {
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(WeightSource::Files {
            dir: dir.to_path_buf(),
            files: SafetensorsFiles::open_model_dir(dir)?,
        })
    }

    pub fn dummy(seed: u64) -> Self {
        WeightSource::Dummy { seed, num_tensors: 0 }
    }

    pub fn contains(&self, name: &str) -> bool {
        match self {
            WeightSource::Files { files, .. } => files.contains(name),
            WeightSource::Dummy { .. } => true,
        }
    }

    /// A weight matrix or vector of the given shape. Dummy norms (`is_norm`) are ones so
    /// activations stay in range; other dummy weights are small uniform values, as vLLM's are.
    pub fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        match self {
            WeightSource::Files { dir, files } => files.f32(name, shape).map_err(|e| match e {
                Error::MissingTensor { name, .. } => Error::MissingTensor {
                    path: dir.clone(),
                    name,
                },
                e => e,
            }),
            WeightSource::Dummy { seed, num_tensors } => {
                let n: usize = shape.iter().product();
                *num_tensors += 1;
                if name.ends_with("norm.weight") {
                    return Ok(vec![1.0; n]);
                }
                // Filled in parallel, chunk by chunk, each chunk from its own seeded stream: the
                // values do not depend on the number of threads.
                use rayon::prelude::*;
                const CHUNK: usize = 1 << 16;
                let bound = 1.0 / (shape.last().copied().unwrap_or(1) as f32).sqrt();
                let base = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (*num_tensors << 32);
                let mut v = vec![0.0f32; n];
                v.par_chunks_mut(CHUNK).enumerate().for_each(|(i, chunk)| {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(base.wrapping_add(i as u64));
                    chunk
                        .iter_mut()
                        .for_each(|x| *x = rng.random_range(-bound..bound));
                });
                Ok(v)
            }
        }
    }
}
