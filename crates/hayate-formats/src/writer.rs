//! Streaming safetensors writer: the header is computed from the declared
//! tensors up front, then each tensor's bytes are written in order, so a
//! checkpoint larger than memory can be produced one tensor at a time.

use crate::{Dtype, FormatError, Result};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// A tensor the file will hold.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    /// Name in the file.
    pub name: String,
    /// Element type (one with a known size).
    pub dtype: Dtype,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Bytes of data.
    pub fn n_bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size().unwrap_or(0)
    }
}

/// Writes one safetensors file, tensor by tensor, in the declared order.
pub struct SafetensorsWriter {
    path: PathBuf,
    out: BufWriter<File>,
    specs: Vec<TensorSpec>,
    next: usize,
}

impl SafetensorsWriter {
    /// Creates `path` and writes the header for `specs` and `metadata`.
    pub fn create(
        path: &Path,
        specs: Vec<TensorSpec>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self> {
        let io = |cause| FormatError::Io {
            path: path.to_owned(),
            cause,
        };
        let mut header = serde_json::Map::new();
        if !metadata.is_empty() {
            header.insert(
                "__metadata__".into(),
                serde_json::to_value(metadata).expect("strings"),
            );
        }
        let mut offset = 0usize;
        for spec in &specs {
            if spec.dtype.size().is_none() {
                return Err(FormatError::BadTensor {
                    name: spec.name.clone(),
                    message: format!("cannot write dtype {}", spec.dtype.name()),
                });
            }
            let end = offset + spec.n_bytes();
            header.insert(
                spec.name.clone(),
                serde_json::json!({
                    "dtype": spec.dtype.name(),
                    "shape": spec.shape,
                    "data_offsets": [offset, end],
                }),
            );
            offset = end;
        }
        let mut text = serde_json::to_string(&header).expect("serialisable header");
        // The data starts 8-byte aligned, as the format recommends.
        while !(8 + text.len()).is_multiple_of(8) {
            text.push(' ');
        }
        let mut out = BufWriter::with_capacity(1 << 20, File::create(path).map_err(io)?);
        out.write_all(&(text.len() as u64).to_le_bytes())
            .map_err(io)?;
        out.write_all(text.as_bytes()).map_err(io)?;
        Ok(SafetensorsWriter {
            path: path.to_owned(),
            out,
            specs,
            next: 0,
        })
    }

    /// Writes the data of tensor `name`, which must be the next declared one
    /// and exactly its size (a caller bug otherwise, reported as an error).
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let spec = self
            .specs
            .get(self.next)
            .ok_or_else(|| FormatError::BadTensor {
                name: name.to_owned(),
                message: "written after every declared tensor".into(),
            })?;
        if spec.name != name || spec.n_bytes() != bytes.len() {
            return Err(FormatError::BadTensor {
                name: name.to_owned(),
                message: format!(
                    "written as {} bytes where `{}` of {} bytes is due",
                    bytes.len(),
                    spec.name,
                    spec.n_bytes()
                ),
            });
        }
        self.out.write_all(bytes).map_err(|cause| FormatError::Io {
            path: self.path.clone(),
            cause,
        })?;
        self.next += 1;
        Ok(())
    }

    /// Checks every tensor was written, then flushes and syncs the file.
    pub fn finish(self) -> Result<()> {
        if let Some(missing) = self.specs.get(self.next) {
            return Err(FormatError::BadTensor {
                name: missing.name.clone(),
                message: "declared but never written".into(),
            });
        }
        let path = self.path;
        let io = |cause| FormatError::Io {
            path: path.clone(),
            cause,
        };
        let file = self.out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TensorStore;

    #[test]
    fn written_files_read_back_with_their_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let specs = vec![
            TensorSpec {
                name: "a".into(),
                dtype: Dtype::U8,
                shape: vec![3],
            },
            TensorSpec {
                name: "b".into(),
                dtype: Dtype::Bf16,
                shape: vec![2, 2],
            },
        ];
        let meta = BTreeMap::from([("a".to_string(), "{\"x\":1}".to_string())]);
        let mut w = SafetensorsWriter::create(&path, specs, &meta).unwrap();
        assert!(w.write("b", &[0; 8]).is_err(), "out of order");
        w.write("a", &[1, 2, 3]).unwrap();
        assert!(w.write("b", &[0; 7]).is_err(), "wrong size");
        w.write("b", &[0, 0x3f, 0, 0x40, 0, 0, 0, 0]).unwrap();
        w.finish().unwrap();
        let store = TensorStore::open_dir(dir.path()).unwrap();
        assert_eq!(store.require("a").unwrap().bytes(), &[1, 2, 3]);
        assert_eq!(
            store.require("b").unwrap().bf16_array(&[2, 2]).unwrap(),
            &[0x3f00, 0x4000, 0, 0]
        );
        assert_eq!(store.metadata("a"), Some("{\"x\":1}"));
    }

    #[test]
    fn unfinished_files_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let specs = vec![TensorSpec {
            name: "a".into(),
            dtype: Dtype::I8,
            shape: vec![1],
        }];
        let w = SafetensorsWriter::create(&dir.path().join("x"), specs, &BTreeMap::new()).unwrap();
        assert!(w.finish().is_err());
    }
}
