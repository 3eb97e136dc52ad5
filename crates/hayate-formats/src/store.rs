use crate::{FormatError, Result};
use hayate_kernels::{MatRef, WeightSlice};
use memmap2::Mmap;
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

/// Element type of a stored tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dtype {
    /// 32-bit float.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
    /// Unsigned bytes (packed quantized codes, zero points).
    U8,
    /// Signed bytes (quantized codes, signs).
    I8,
    /// Anything else, by its safetensors name (I64, U8, ...): readable as bytes only.
    Other(String),
}

impl Dtype {
    fn from_safetensors(d: safetensors::Dtype) -> Self {
        match d {
            safetensors::Dtype::F32 => Dtype::F32,
            safetensors::Dtype::BF16 => Dtype::Bf16,
            safetensors::Dtype::F16 => Dtype::F16,
            safetensors::Dtype::U8 => Dtype::U8,
            safetensors::Dtype::I8 => Dtype::I8,
            other => Dtype::Other(format!("{other:?}")),
        }
    }

    /// Alignment the element type needs to be borrowed in place.
    fn alignment(&self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
            Dtype::U8 | Dtype::I8 | Dtype::Other(_) => 1,
        }
    }

    /// The name safetensors files use (`F32`, `BF16`, `U8`, ...).
    pub fn name(&self) -> &str {
        match self {
            Dtype::F32 => "F32",
            Dtype::Bf16 => "BF16",
            Dtype::F16 => "F16",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::Other(name) => name,
        }
    }

    /// Bytes per element, for the types Hayate writes.
    pub fn size(&self) -> Option<usize> {
        match self {
            Dtype::F32 => Some(4),
            Dtype::Bf16 | Dtype::F16 => Some(2),
            Dtype::U8 | Dtype::I8 => Some(1),
            Dtype::Other(_) => None,
        }
    }
}

enum Storage {
    /// The file, mapped read-only; pages are loaded on first touch.
    Mapped(Mmap),
    /// A copy, for the rare tensor whose offset in the file is misaligned.
    Owned(Vec<u64>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => {
                // SAFETY: any initialised u64 buffer is valid as bytes.
                unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), v.len() * 8) }
            }
        }
    }
}

/// A tensor of a checkpoint, borrowed from the mapped file in its stored dtype.
#[derive(Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    offset: usize,
    n_bytes: usize,
    name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({} {:?} {:?})", self.name, self.dtype, self.shape)
    }
}

impl Tensor {
    /// Name in the checkpoint.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The raw bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.storage.bytes()[self.offset..self.offset + self.n_bytes]
    }

    /// Hands this tensor's mapped pages back to the system, for data that
    /// was copied elsewhere: they stay in the page cache and are read back
    /// if touched again, but no longer count in the process's memory.
    pub fn release_pages(&self) {
        self.release_range(0..self.n_bytes);
    }

    /// [`Tensor::release_pages`] for the whole pages inside bytes `range`
    /// of this tensor (clamped to it).
    pub fn release_range(&self, range: std::ops::Range<usize>) {
        #[cfg(not(unix))]
        let _ = range;
        #[cfg(unix)]
        if let Storage::Mapped(map) = &*self.storage {
            const PAGE: usize = 4096;
            let (lo, hi) = (range.start.min(self.n_bytes), range.end.min(self.n_bytes));
            let start = (self.offset + lo).next_multiple_of(PAGE);
            let end = (self.offset + hi) / PAGE * PAGE;
            if start < end {
                // SAFETY: the map is a shared read-only file mapping, so
                // dropping its pages loses nothing (they are read from the
                // file again on the next touch); failure only leaves them
                // resident, which is harmless.
                let _ = unsafe {
                    map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        end - start,
                    )
                };
            }
        }
    }

    /// Size in bytes.
    pub fn n_bytes(&self) -> usize {
        self.n_bytes
    }

    /// Number of elements.
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }

    fn bad(&self, message: String) -> FormatError {
        FormatError::BadTensor {
            name: self.name.clone(),
            message,
        }
    }

    /// The elements as a kernel view; an error for non-float dtypes.
    pub fn weights(&self) -> Result<WeightSlice<'_>> {
        let bytes = self.bytes();
        let n = self.n_elements();
        // SAFETY (all three): `load` placed every float tensor at an offset
        // aligned for its element type, and its byte length is n * size.
        Ok(match self.dtype {
            Dtype::F32 => {
                WeightSlice::F32(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), n) })
            }
            Dtype::Bf16 => {
                WeightSlice::Bf16(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), n) })
            }
            Dtype::F16 => {
                WeightSlice::F16(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), n) })
            }
            ref d => {
                return Err(self.bad(format!(
                    "dtype {} is not a float type (F32, BF16, F16)",
                    d.name()
                )));
            }
        })
    }

    /// Checks the shape is exactly `expected`.
    pub fn expect_shape(&self, expected: &[usize]) -> Result<()> {
        if self.shape == expected {
            Ok(())
        } else {
            Err(self.bad(format!(
                "shape {:?} does not match the configuration, which implies {:?}",
                self.shape, expected
            )))
        }
    }

    /// A `[rows, cols]` matrix view, after checking the shape.
    pub fn matrix(&self, rows: usize, cols: usize) -> Result<MatRef<'_>> {
        self.expect_shape(&[rows, cols])?;
        let data = self.weights()?;
        MatRef::new(data, rows, cols)
            .ok_or_else(|| self.bad("size does not match its shape".into()))
    }

    /// The bytes of a `U8` or `I8` tensor of exactly `shape`.
    pub fn byte_array(&self, dtype: Dtype, shape: &[usize]) -> Result<&[u8]> {
        if self.dtype != dtype {
            return Err(self.bad(format!(
                "dtype {} where {} is expected",
                self.dtype.name(),
                dtype.name()
            )));
        }
        self.expect_shape(shape)?;
        Ok(self.bytes())
    }

    /// The bf16 bit patterns of a `BF16` tensor of exactly `shape`.
    pub fn bf16_array(&self, shape: &[usize]) -> Result<&[u16]> {
        self.expect_shape(shape)?;
        match self.weights()? {
            WeightSlice::Bf16(bits) => Ok(bits),
            _ => Err(self.bad(format!(
                "dtype {} where BF16 is expected",
                self.dtype.name()
            ))),
        }
    }

    /// A vector of `len` elements widened to f32 (norm weights, biases).
    pub fn vector_f32(&self, len: usize) -> Result<Vec<f32>> {
        self.array_f32(&[len])
    }

    /// The whole tensor widened to f32, row-major, after checking its shape.
    pub fn array_f32(&self, shape: &[usize]) -> Result<Vec<f32>> {
        self.expect_shape(shape)?;
        let data = self.weights()?;
        let mut out = vec![0f32; shape.iter().product()];
        data.widen_into(0, &mut out);
        Ok(out)
    }
}

/// The tensors of a checkpoint, from one or several safetensors files.
pub struct TensorStore {
    tensors: HashMap<String, Tensor>,
    /// The `__metadata__` entries of all files.
    metadata: HashMap<String, String>,
}

impl TensorStore {
    /// Opens the checkpoint of a model directory: `model.safetensors.index.json`
    /// and its shards if present, else `model.safetensors`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            return Self::open_sharded(dir, &index);
        }
        let single = dir.join("model.safetensors");
        if !single.exists() {
            return Err(FormatError::NoWeights(dir.to_owned()));
        }
        let mut store = TensorStore {
            tensors: HashMap::new(),
            metadata: HashMap::new(),
        };
        store.add_file(&single)?;
        Ok(store)
    }

    fn open_sharded(dir: &Path, index: &Path) -> Result<Self> {
        let json = |message: String| FormatError::Json {
            path: index.to_owned(),
            message,
        };
        let bytes = std::fs::read(index).map_err(|cause| FormatError::Io {
            path: index.to_owned(),
            cause,
        })?;
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| json(e.to_string()))?;
        let map = value
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| json("no `weight_map` object".into()))?;
        let mut files: Vec<&str> = Vec::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| json(format!("`weight_map.{name}` must be a file name")))?;
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(json(format!(
                    "shard name `{file}` must be a plain file name"
                )));
            }
            if !files.contains(&file) {
                files.push(file);
            }
        }
        let mut store = TensorStore {
            tensors: HashMap::new(),
            metadata: HashMap::new(),
        };
        let mut placed: HashMap<String, &str> = HashMap::new();
        for file in &files {
            for name in store.add_file(&dir.join(file))? {
                placed.insert(name, file);
            }
        }
        for (name, file) in map {
            let file = file.as_str().unwrap_or_default();
            if placed.get(name) != Some(&file) {
                return Err(json(format!(
                    "the index places `{name}` in {file}, which does not contain it"
                )));
            }
        }
        Ok(store)
    }

    /// A store of the tensors of one safetensors file held in memory
    /// (`label` names it in errors); validated like a file on disk.
    pub fn from_bytes(label: &Path, bytes: &[u8]) -> Result<Self> {
        let mut copy = vec![0u64; bytes.len().div_ceil(8)];
        // SAFETY: `copy` holds at least `bytes.len()` bytes, and a u64 buffer
        // may be written as bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                copy.as_mut_ptr().cast::<u8>(),
                bytes.len(),
            )
        };
        let mut store = TensorStore {
            tensors: HashMap::new(),
            metadata: HashMap::new(),
        };
        store.add_storage(label, Storage::Owned(copy), bytes.len())?;
        Ok(store)
    }

    /// Maps one safetensors file and adds its tensors; returns their names.
    pub fn add_file(&mut self, path: &Path) -> Result<Vec<String>> {
        let file = File::open(path).map_err(|cause| FormatError::Io {
            path: path.to_owned(),
            cause,
        })?;
        // SAFETY: the map is read-only; a model file changed by another process
        // while we run is outside what we can guard against (as in every engine).
        let map = unsafe { Mmap::map(&file) }.map_err(|cause| FormatError::Io {
            path: path.to_owned(),
            cause,
        })?;
        let len = map.len();
        self.add_storage(path, Storage::Mapped(map), len)
    }

    /// Adds the tensors of the safetensors file in the first `len` bytes of `storage`.
    fn add_storage(&mut self, path: &Path, storage: Storage, len: usize) -> Result<Vec<String>> {
        let invalid = |message: String| FormatError::Safetensors {
            path: path.to_owned(),
            message,
        };
        let map = &storage.bytes()[..len];
        // Parsing validates the header: size limits, offsets inside the file,
        // contiguous non-overlapping data, byte sizes that match shapes.
        let parsed =
            safetensors::SafeTensors::deserialize(map).map_err(|e| invalid(e.to_string()))?;
        let base = map.as_ptr() as usize;
        let mut found: Vec<(String, Dtype, Vec<usize>, usize, usize)> = Vec::new();
        for (name, view) in parsed.tensors() {
            let dtype = Dtype::from_safetensors(view.dtype());
            let shape = view.shape().to_vec();
            let offset = view.data().as_ptr() as usize - base;
            let n_bytes = view.data().len();
            let elements = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let elem_size = view.dtype().bitsize() / 8;
            if elements.and_then(|e| e.checked_mul(elem_size)) != Some(n_bytes) {
                return Err(invalid(format!(
                    "tensor `{name}`: byte size disagrees with shape {shape:?}"
                )));
            }
            found.push((name, dtype, shape, offset, n_bytes));
        }
        drop(parsed);
        let (_, header) =
            safetensors::SafeTensors::read_metadata(map).map_err(|e| invalid(e.to_string()))?;
        if let Some(entries) = header.metadata() {
            for (key, value) in entries {
                self.metadata.insert(key.clone(), value.clone());
            }
        }
        let mapped = Arc::new(storage);
        let names = found.iter().map(|f| f.0.clone()).collect();
        for (name, dtype, shape, offset, n_bytes) in found {
            let (storage, offset) = if offset % dtype.alignment() == 0 {
                (Arc::clone(&mapped), offset)
            } else {
                let mut copy = vec![0u64; n_bytes.div_ceil(8)];
                // SAFETY: `copy` has at least `n_bytes` bytes; the source range was validated.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        mapped.bytes()[offset..].as_ptr(),
                        copy.as_mut_ptr().cast::<u8>(),
                        n_bytes,
                    )
                };
                (Arc::new(Storage::Owned(copy)), 0)
            };
            if self.tensors.contains_key(&name) {
                return Err(invalid(format!(
                    "tensor `{name}` also appears in another shard"
                )));
            }
            self.tensors.insert(
                name.clone(),
                Tensor {
                    storage,
                    offset,
                    n_bytes,
                    name,
                    dtype,
                    shape,
                },
            );
        }
        Ok(names)
    }

    /// The tensor called `name`, if present.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// The tensor called `name`, or an error naming it.
    pub fn require(&self, name: &str) -> Result<&Tensor> {
        self.get(name)
            .ok_or_else(|| FormatError::MissingTensor(name.to_owned()))
    }

    /// A `__metadata__` entry of the checkpoint's files.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    /// Names of all tensors (unordered).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the store holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
}
