//! Where model and adapter tensors come from: safetensors files (one, or many through
//! `model.safetensors.index.json`), memory-mapped, or random values for `load_format: dummy`.
//! Shapes are checked here. [`WeightSource::get`] hands out f32 (norms, biases, the CUDA
//! loader); [`WeightSource::weight`] hands out a CPU weight matrix in the dtype it runs in,
//! borrowed from the memory map without a copy when the file already holds that dtype.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::ops::{Deref, Range};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;
use rand::{Rng, SeedableRng};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::error::{read_json, Error, Result};

/// A set of memory-mapped safetensors files and the tensors they hold. Each file's header is
/// parsed once, at open (a LoRA adapter has hundreds of tensors: parsing the header again for
/// each one was most of an adapter's load time).
pub struct SafetensorsFiles {
    files: Vec<(PathBuf, Arc<Mmap>)>,
    /// tensor name -> where it is
    index: HashMap<String, TensorEntry>,
}

/// One tensor of a [`SafetensorsFiles`], from its file's header.
struct TensorEntry {
    /// index into `files`
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// bytes of the memory map
    bytes: Range<usize>,
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
            for (name, view) in st.tensors() {
                let start = view.data().as_ptr() as usize - mmap.as_ptr() as usize;
                let entry = TensorEntry {
                    file: i,
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    bytes: start..start + view.data().len(),
                };
                index.insert(name, entry);
            }
            files.push((path.clone(), Arc::new(mmap)));
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
        let i = self.index.get(name).map_or(0, |t| t.file);
        &self.files[i].0
    }

    /// The tensor's shape, without reading its data.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.entry(name)?.shape.clone())
    }

    fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.index.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.files.first().map(|f| f.0.clone()).unwrap_or_default(),
            name: name.to_string(),
        })
    }

    fn view(&self, name: &str) -> Result<(&Path, TensorView<'_>)> {
        self.view_in_file(name)
            .map(|(i, view)| (self.files[i].0.as_path(), view))
    }

    /// The tensor and the index of the file that holds it.
    fn view_in_file(&self, name: &str) -> Result<(usize, TensorView<'_>)> {
        let t = self.entry(name)?;
        let (path, mmap) = &self.files[t.file];
        // Checked against the shape when the file was opened: this cannot fail.
        let view = TensorView::new(t.dtype, t.shape.clone(), &mmap[t.bytes.clone()])
            .map_err(|e| Error::model(path, format!("tensor {name:?}: {e}")))?;
        Ok((t.file, view))
    }

    /// The dtype `name` is stored in.
    pub fn dtype(&self, name: &str) -> Result<Dtype> {
        Ok(self.view(name)?.1.dtype())
    }

    /// Reads a weight matrix for the CPU kernels in `dtype`, checking its shape. A tensor stored
    /// in `dtype` is borrowed from the memory map (no copy) when it lies aligned in the file;
    /// any other F32/F16/BF16 tensor is converted (rounded to nearest even when narrowed).
    pub fn weight(&self, name: &str, shape: &[usize], dtype: WeightDtype) -> Result<Weight> {
        let (i, view) = self.view_in_file(name)?;
        let (path, mmap) = &self.files[i];
        if view.shape() != shape {
            return Err(Error::model(
                path,
                format!("tensor {name:?} has shape {:?}, expected {shape:?}", view.shape()),
            ));
        }
        let data = view.data();
        // `data` borrows from the mmap: its offset there locates the tensor in the file.
        let offset = data.as_ptr() as usize - mmap.as_ptr() as usize;
        let mapped = |elem: usize| {
            (cfg!(target_endian = "little") && offset.is_multiple_of(elem)).then(|| Arc::clone(mmap))
        };
        let bad_dtype = || {
            Error::model(
                path,
                format!(
                    "tensor {name:?} has dtype {:?}; the CPU backend runs F32, F16 and BF16 checkpoints",
                    view.dtype()
                ),
            )
        };
        let n: usize = shape.iter().product();
        Ok(match (view.dtype(), dtype) {
            (Dtype::F32, WeightDtype::F32) => Weight::F32(match mapped(4) {
                Some(mmap) => Storage::mapped(mmap, offset, n),
                None => Storage::Owned(to_f32(Dtype::F32, data).ok_or_else(bad_dtype)?),
            }),
            (Dtype::BF16, WeightDtype::Bf16) => Weight::Bf16(match mapped(2) {
                Some(mmap) => Storage::mapped(mmap, offset, n),
                None => Storage::Owned(
                    data.chunks_exact(2)
                        .map(|b| bf16::from_le_bytes([b[0], b[1]]))
                        .collect(),
                ),
            }),
            (Dtype::F16, WeightDtype::F16) => Weight::F16(match mapped(2) {
                Some(mmap) => Storage::mapped(mmap, offset, n),
                None => Storage::Owned(
                    data.chunks_exact(2)
                        .map(|b| f16::from_le_bytes([b[0], b[1]]))
                        .collect(),
                ),
            }),
            (stored, want) => {
                let v = to_f32(stored, data).ok_or_else(bad_dtype)?;
                let f16_max = f16::MAX.to_f32();
                if want == WeightDtype::F16 && v.iter().any(|x| x.is_finite() && x.abs() > f16_max) {
                    return Err(Error::model(
                        path,
                        format!(
                            "tensor {name:?} holds values beyond float16's range (±{f16_max}); run the model as bfloat16 or float32"
                        ),
                    ));
                }
                Weight::from_f32(v, want)
            }
        })
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

/// The dtype the CPU backend keeps weight matrices in; activations, norms, biases, LoRA weights
/// and the KV cache stay f32 whatever it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    Bf16,
    F16,
}

impl WeightDtype {
    /// vLLM's name.
    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "float32",
            WeightDtype::Bf16 => "bfloat16",
            WeightDtype::F16 => "float16",
        }
    }

    /// From a vLLM `dtype` or a config's `torch_dtype` (`float32`, `bfloat16`, `float16` and
    /// the aliases `float`, `half`); `None` for `auto` and anything else.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "float32" | "float" => Some(WeightDtype::F32),
            "bfloat16" => Some(WeightDtype::Bf16),
            "float16" | "half" => Some(WeightDtype::F16),
            _ => None,
        }
    }

    /// The dtype a checkpoint tensor is stored in, where the CPU can keep it as it is.
    pub fn of_stored(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::F32 => Some(WeightDtype::F32),
            Dtype::BF16 => Some(WeightDtype::Bf16),
            Dtype::F16 => Some(WeightDtype::F16),
            _ => None,
        }
    }
}

/// Elements either owned or read in place from a memory-mapped checkpoint.
pub enum Storage<T> {
    Owned(Vec<T>),
    /// `len` elements at byte `offset` of `mmap`; the offset is aligned for `T`.
    Mapped {
        mmap: Arc<Mmap>,
        offset: usize,
        len: usize,
        elem: PhantomData<T>,
    },
}

impl<T: Pod> Storage<T> {
    fn mapped(mmap: Arc<Mmap>, offset: usize, len: usize) -> Self {
        assert!(offset.is_multiple_of(std::mem::align_of::<T>()));
        assert!(offset + len * std::mem::size_of::<T>() <= mmap.len());
        Storage::Mapped {
            mmap,
            offset,
            len,
            elem: PhantomData,
        }
    }

    pub fn is_mapped(&self) -> bool {
        matches!(self, Storage::Mapped { .. })
    }

    /// Elements `range`, still read in place when mapped.
    fn slice(&self, range: Range<usize>) -> Self {
        match self {
            Storage::Owned(v) => Storage::Owned(v[range].to_vec()),
            Storage::Mapped {
                mmap, offset, len, ..
            } => {
                assert!(range.end <= *len, "slice within the tensor");
                Storage::mapped(
                    Arc::clone(mmap),
                    offset + range.start * std::mem::size_of::<T>(),
                    range.len(),
                )
            }
        }
    }

    /// Columns `cols` of each `row_len`-long row, copied.
    fn columns(&self, cols: Range<usize>, row_len: usize) -> Self {
        Storage::Owned(
            self.chunks_exact(row_len)
                .flat_map(|row| &row[cols.clone()])
                .copied()
                .collect(),
        )
    }
}

/// Element types any bit pattern of which is a valid value (so they may be read from a file).
pub trait Pod: Copy + Send + Sync + 'static {}
impl Pod for f32 {}
impl Pod for bf16 {}
impl Pod for f16 {}

impl<T: Pod> Deref for Storage<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Storage::Owned(v) => v,
            // SAFETY: `mapped` checked the range lies in the map and is aligned for T; every
            // bit pattern is a valid T (`Pod`); the map is read-only and lives as long as self.
            Storage::Mapped {
                mmap, offset, len, ..
            } => unsafe { std::slice::from_raw_parts(mmap.as_ptr().add(*offset).cast::<T>(), *len) },
        }
    }
}

/// A weight matrix as the CPU kernels read it, row-major as in the checkpoint.
pub enum Weight {
    F32(Storage<f32>),
    Bf16(Storage<bf16>),
    F16(Storage<f16>),
}

impl Weight {
    /// Narrows (round to nearest even) or keeps f32 values.
    pub fn from_f32(v: Vec<f32>, dtype: WeightDtype) -> Self {
        match dtype {
            WeightDtype::F32 => Weight::F32(Storage::Owned(v)),
            WeightDtype::Bf16 => Weight::Bf16(Storage::Owned(v.iter().map(|&x| bf16::from_f32(x)).collect())),
            WeightDtype::F16 => Weight::F16(Storage::Owned(v.iter().map(|&x| f16::from_f32(x)).collect())),
        }
    }

    pub fn dtype(&self) -> WeightDtype {
        match self {
            Weight::F32(_) => WeightDtype::F32,
            Weight::Bf16(_) => WeightDtype::Bf16,
            Weight::F16(_) => WeightDtype::F16,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Weight::F32(w) => w.len(),
            Weight::Bf16(w) => w.len(),
            Weight::F16(w) => w.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Read in place from the checkpoint's memory map.
    pub fn is_mapped(&self) -> bool {
        match self {
            Weight::F32(w) => w.is_mapped(),
            Weight::Bf16(w) => w.is_mapped(),
            Weight::F16(w) => w.is_mapped(),
        }
    }

    /// Rows `rows` of this `[_, row_len]` matrix; read in place still when mapped.
    pub fn rows(&self, rows: Range<usize>, row_len: usize) -> Weight {
        let r = rows.start * row_len..rows.end * row_len;
        match self {
            Weight::F32(w) => Weight::F32(w.slice(r)),
            Weight::Bf16(w) => Weight::Bf16(w.slice(r)),
            Weight::F16(w) => Weight::F16(w.slice(r)),
        }
    }

    /// Columns `cols` of this `[_, row_len]` matrix, copied.
    pub fn columns(&self, cols: Range<usize>, row_len: usize) -> Weight {
        match self {
            Weight::F32(w) => Weight::F32(w.columns(cols, row_len)),
            Weight::Bf16(w) => Weight::Bf16(w.columns(cols, row_len)),
            Weight::F16(w) => Weight::F16(w.columns(cols, row_len)),
        }
    }

    /// Widens `len` elements from `start` into `out`.
    pub fn read_f32(&self, start: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            Weight::F32(w) => out.copy_from_slice(&w[start..start + n]),
            Weight::Bf16(w) => out
                .iter_mut()
                .zip(&w[start..start + n])
                .for_each(|(o, v)| *o = v.to_f32()),
            Weight::F16(w) => out
                .iter_mut()
                .zip(&w[start..start + n])
                .for_each(|(o, v)| *o = v.to_f32()),
        }
    }
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

    /// A weight matrix for the CPU kernels, kept in `dtype` (see [`SafetensorsFiles::weight`]).
    /// Dummy values are those [`Self::get`] would give, rounded to `dtype`; 16-bit ones are
    /// made chunk by chunk, so a 7B model never exists in f32.
    pub fn weight(&mut self, name: &str, shape: &[usize], dtype: WeightDtype) -> Result<Weight> {
        let fill = match self {
            WeightSource::Files { dir, files } => {
                return files.weight(name, shape, dtype).map_err(|e| missing_in(dir, e))
            }
            WeightSource::Dummy { seed, num_tensors } => DummyFill::next(*seed, num_tensors, name, shape),
        };
        let n: usize = shape.iter().product();
        Ok(match dtype {
            WeightDtype::F32 => Weight::F32(Storage::Owned(fill.values(n, |x| x))),
            WeightDtype::Bf16 => Weight::Bf16(Storage::Owned(fill.values(n, bf16::from_f32))),
            WeightDtype::F16 => Weight::F16(Storage::Owned(fill.values(n, f16::from_f32))),
        })
    }

    /// A weight matrix or vector of the given shape. Dummy norms (`is_norm`) are ones so
    /// activations stay in range; other dummy weights are small uniform values, as vLLM's are.
    pub fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        match self {
            WeightSource::Files { dir, files } => files.f32(name, shape).map_err(|e| missing_in(dir, e)),
            WeightSource::Dummy { seed, num_tensors } => {
                let n: usize = shape.iter().product();
                Ok(DummyFill::next(*seed, num_tensors, name, shape).values(n, |x| x))
            }
        }
    }
}

/// A missing tensor is reported against the model folder rather than one shard.
fn missing_in(dir: &Path, e: Error) -> Error {
    match e {
        Error::MissingTensor { name, .. } => Error::MissingTensor {
            path: dir.to_path_buf(),
            name,
        },
        e => e,
    }
}

/// How one dummy tensor is filled.
struct DummyFill {
    is_norm: bool,
    /// seed of the tensor's first chunk
    base: u64,
    /// values are uniform in `[-bound, bound)`
    bound: f32,
}

impl DummyFill {
    /// Values for the next tensor handed out: each gets its own streams.
    fn next(seed: u64, num_tensors: &mut u64, name: &str, shape: &[usize]) -> Self {
        *num_tensors += 1;
        DummyFill {
            is_norm: name.ends_with("norm.weight"),
            base: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (*num_tensors << 32),
            bound: 1.0 / (shape.last().copied().unwrap_or(1) as f32).sqrt(),
        }
    }

    /// `n` values, made in parallel chunk by chunk, each chunk from its own seeded stream: the
    /// values do not depend on the number of threads. `cast` stores each value.
    fn values<T: Copy + Send + Default>(&self, n: usize, cast: fn(f32) -> T) -> Vec<T> {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 16;
        if self.is_norm {
            return vec![cast(1.0); n];
        }
        let mut v = vec![T::default(); n];
        v.par_chunks_mut(CHUNK).enumerate().for_each(|(i, chunk)| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(self.base.wrapping_add(i as u64));
            chunk
                .iter_mut()
                .for_each(|x| *x = cast(rng.random_range(-self.bound..self.bound)));
        });
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    /// A safetensors file of `(name, dtype, shape, bytes)`.
    fn write(dir: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> PathBuf {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        let path = dir.join("model.safetensors");
        std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
        path
    }

    fn values(n: usize) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.731).sin() * 3.0 + 1e-3).collect()
    }

    #[test]
    fn sixteen_bit_weights_are_read_in_place_and_others_converted() {
        let tmp = tempfile::tempdir().unwrap();
        let v = values(6 * 5);
        let b16: Vec<u8> = v.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect();
        let h16: Vec<u8> = v.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect();
        let f32s: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let path = write(
            tmp.path(),
            &[
                ("b", Dtype::BF16, vec![6, 5], b16),
                ("h", Dtype::F16, vec![6, 5], h16),
                ("f", Dtype::F32, vec![6, 5], f32s),
                ("i", Dtype::I32, vec![6, 5], vec![0; 120]),
            ],
        );
        let files = SafetensorsFiles::open(std::slice::from_ref(&path)).unwrap();
        let shape = [6, 5];
        let widened = |w: &Weight| {
            let mut out = vec![0.0; w.len()];
            w.read_f32(0, &mut out);
            out
        };
        // Stored as asked: borrowed from the map, bit for bit.
        for (name, dtype) in [
            ("b", WeightDtype::Bf16),
            ("h", WeightDtype::F16),
            ("f", WeightDtype::F32),
        ] {
            let w = files.weight(name, &shape, dtype).unwrap();
            assert_eq!(w.dtype(), dtype);
            assert!(w.is_mapped(), "{name} copied");
            let want = files.f32(name, &shape).unwrap();
            assert_eq!(widened(&w), want, "{name}");
        }
        // Narrowed: f32 rounded to the nearest bf16/f16.
        let w = files.weight("f", &shape, WeightDtype::Bf16).unwrap();
        assert!(!w.is_mapped());
        let want: Vec<f32> = v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
        assert_eq!(widened(&w), want);
        let w = files.weight("f", &shape, WeightDtype::F16).unwrap();
        let want: Vec<f32> = v.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
        assert_eq!(widened(&w), want);
        // Widened: exact.
        let w = files.weight("b", &shape, WeightDtype::F32).unwrap();
        assert_eq!(w.dtype(), WeightDtype::F32);
        assert_eq!(widened(&w), files.f32("b", &shape).unwrap());
        // A part of a row, as the embedding reads it.
        let mut row = [0.0; 5];
        files
            .weight("b", &shape, WeightDtype::Bf16)
            .unwrap()
            .read_f32(10, &mut row);
        assert_eq!(row.to_vec(), files.f32("b", &shape).unwrap()[10..15]);

        // A dtype the CPU cannot run, and a wrong shape: the error names file, tensor, dtype.
        let Err(e) = files.weight("i", &shape, WeightDtype::Bf16) else {
            panic!("an I32 weight loaded")
        };
        let msg = e.to_string();
        assert!(
            msg.contains("\"i\"") && msg.contains("I32") && msg.contains(&path.display().to_string()),
            "{msg}"
        );
        let Err(e) = files.weight("b", &[5, 6], WeightDtype::Bf16) else {
            panic!("a wrong shape loaded")
        };
        assert!(e.to_string().contains("[5, 6]"), "{e}");

        // Narrowing to f16 would turn a finite value into infinity: refused.
        let big: Vec<u8> = [1.0f32, 7e4, -2.0]
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect();
        let tmp2 = tempfile::tempdir().unwrap();
        let path = write(tmp2.path(), &[("big", Dtype::BF16, vec![3], big)]);
        let files = SafetensorsFiles::open(std::slice::from_ref(&path)).unwrap();
        let Err(e) = files.weight("big", &[3], WeightDtype::F16) else {
            panic!("7e4 narrowed to f16")
        };
        assert!(
            e.to_string().contains("\"big\"") && e.to_string().contains("float16"),
            "{e}"
        );
        assert!(files.weight("big", &[3], WeightDtype::Bf16).is_ok());
    }

    #[test]
    fn dummy_weights_are_the_f32_values_rounded() {
        let shape = [300, 700]; // several fill chunks
        let f = WeightSource::dummy(5)
            .get("model.layers.0.mlp.up_proj.weight", &shape)
            .unwrap();
        for dtype in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16] {
            let w = WeightSource::dummy(5)
                .weight("model.layers.0.mlp.up_proj.weight", &shape, dtype)
                .unwrap();
            assert_eq!(w.dtype(), dtype);
            let mut got = vec![0.0; w.len()];
            w.read_f32(0, &mut got);
            let want: Vec<f32> = match dtype {
                WeightDtype::F32 => f.clone(),
                WeightDtype::Bf16 => f.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
                WeightDtype::F16 => f.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
            };
            assert_eq!(got, want, "{dtype:?}");
        }
    }

    #[test]
    fn dtype_names_follow_vllm() {
        for (name, want) in [
            ("float32", Some(WeightDtype::F32)),
            ("float", Some(WeightDtype::F32)),
            ("bfloat16", Some(WeightDtype::Bf16)),
            ("float16", Some(WeightDtype::F16)),
            ("half", Some(WeightDtype::F16)),
            ("auto", None),
            ("int8", None),
        ] {
            assert_eq!(WeightDtype::from_name(name), want, "{name}");
        }
        for d in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16] {
            assert_eq!(WeightDtype::from_name(d.name()), Some(d));
        }
    }
}
