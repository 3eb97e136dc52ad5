//! Quantized matrices in a checkpoint (the layout `docs/format.md` describes).
//!
//! A linear layer `P` (e.g. `model.layers.0.mlp.up_proj`) quantized by
//! Hayate is stored as the tensors `P.qweight` (codes), `P.scales` (bf16),
//! `P.qzeros` (q4 only) and, when rotated, `P.sign_in` / `P.sign_out`
//! (I8, ±1); the file's `__metadata__` entry `P` describes it in JSON.

use crate::{Dtype, FormatError, Result, TensorStore};
use crate::{Tensor, TensorSpec};
use hayate_kernels::quant::{QuantFormat, QuantMatRef, check_shape, layout_sizes};

/// Name of the rotation in files.
pub const ROTATION: &str = "hadamard32";

/// What the metadata says about one quantized matrix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuantInfo {
    /// Format of the codes.
    pub format: QuantFormat,
    /// Inputs per group.
    pub group_size: usize,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Whether `W' = H·S_out·W·S_in·H` is stored instead of `W`.
    pub rotated: bool,
}

impl QuantInfo {
    /// The metadata entry (JSON).
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "format": self.format.name(),
            "group_size": self.group_size,
            "rows": self.rows,
            "cols": self.cols,
            "rotation": if self.rotated { ROTATION } else { "none" },
        })
        .to_string()
    }

    /// Parses the metadata entry of `prefix`.
    pub fn parse(prefix: &str, text: &str) -> Result<Self> {
        let bad = |message: String| FormatError::BadTensor {
            name: prefix.to_owned(),
            message: format!("quantization metadata: {message}"),
        };
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not JSON ({e})")))?;
        let field = |key: &str| v.get(key).ok_or_else(|| bad(format!("no `{key}`")));
        let size = |key: &str| {
            field(key)?
                .as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| bad(format!("`{key}` is not a non-negative integer")))
        };
        let format_name = field("format")?
            .as_str()
            .ok_or_else(|| bad("`format` is not a string".into()))?;
        let format = QuantFormat::parse(format_name)
            .ok_or_else(|| bad(format!("unknown format `{format_name}` (known: q4, q8)")))?;
        let rotated = match field("rotation")?.as_str() {
            Some(ROTATION) => true,
            Some("none") => false,
            _ => {
                return Err(bad(format!(
                    "`rotation` must be \"{ROTATION}\" or \"none\""
                )));
            }
        };
        let info = QuantInfo {
            format,
            group_size: size("group_size")?,
            rows: size("rows")?,
            cols: size("cols")?,
            rotated,
        };
        check_shape(info.rows, info.cols, info.group_size).map_err(bad)?;
        if rotated && !info.rows.is_multiple_of(32) {
            return Err(bad(format!(
                "{} rows cannot be rotated in blocks of 32",
                info.rows
            )));
        }
        Ok(info)
    }

    /// The tensors this matrix is stored as, in file order.
    pub fn tensor_specs(&self, prefix: &str) -> Vec<TensorSpec> {
        let (nc, ns, nz) = layout_sizes(self.format, self.rows, self.cols, self.group_size);
        let spec = |suffix: &str, dtype: Dtype, shape: Vec<usize>| TensorSpec {
            name: format!("{prefix}.{suffix}"),
            dtype,
            shape,
        };
        let code_dtype = match self.format {
            QuantFormat::Q4 => Dtype::U8,
            QuantFormat::Q8 => Dtype::I8,
        };
        let mut specs = vec![
            spec("qweight", code_dtype, vec![self.rows, nc / self.rows]),
            spec("scales", Dtype::Bf16, vec![self.rows, ns / self.rows]),
        ];
        if nz > 0 {
            specs.push(spec("qzeros", Dtype::U8, vec![self.rows, nz / self.rows]));
        }
        if self.rotated {
            specs.push(spec("sign_in", Dtype::I8, vec![self.cols]));
            specs.push(spec("sign_out", Dtype::I8, vec![self.rows]));
        }
        specs
    }
}

/// A quantized matrix found in a checkpoint, validated.
#[derive(Clone, Debug)]
pub struct QuantTensors {
    /// Its description.
    pub info: QuantInfo,
    codes: Tensor,
    scales: Tensor,
    zeros: Option<Tensor>,
    /// `S_in` and `S_out` as ±1.0, when rotated.
    pub signs: Option<(Vec<f32>, Vec<f32>)>,
}

impl QuantTensors {
    /// Hands the mapped pages of the three arrays back (see
    /// [`Tensor::release_pages`]), once the engine holds a copy.
    pub fn release_pages(&self) {
        self.codes.release_pages();
        self.scales.release_pages();
        if let Some(z) = &self.zeros {
            z.release_pages();
        }
    }

    /// [`QuantTensors::release_pages`] for the rows `rows` of the row-major
    /// arrays (whole pages only), as a copy of them is made.
    pub fn release_rows(&self, rows: std::ops::Range<usize>) {
        let n = self.info.rows.max(1);
        for t in [Some(&self.codes), Some(&self.scales), self.zeros.as_ref()]
            .into_iter()
            .flatten()
        {
            let per_row = t.n_bytes() / n;
            t.release_range(rows.start * per_row..rows.end * per_row);
        }
    }

    /// The quantized matrix `prefix` of `store`, `None` if it has no `prefix.qweight`.
    /// Checks dtypes, shapes, sizes and signs against the metadata and
    /// against the `rows x cols` the configuration implies.
    pub fn load(
        store: &TensorStore,
        prefix: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Option<Self>> {
        if store.get(&format!("{prefix}.qweight")).is_none() {
            return Ok(None);
        }
        let text = store
            .metadata(prefix)
            .ok_or_else(|| FormatError::BadTensor {
                name: prefix.to_owned(),
                message: "quantized tensors without a metadata entry describing them".into(),
            })?;
        let info = QuantInfo::parse(prefix, text)?;
        if (info.rows, info.cols) != (rows, cols) {
            return Err(FormatError::BadTensor {
                name: prefix.to_owned(),
                message: format!(
                    "quantized as {} x {}, but the configuration implies {rows} x {cols}",
                    info.rows, info.cols
                ),
            });
        }
        let mut found = Vec::new();
        for spec in info.tensor_specs(prefix) {
            let t = store.require(&spec.name)?;
            if t.dtype != spec.dtype {
                return Err(FormatError::BadTensor {
                    name: spec.name.clone(),
                    message: format!(
                        "dtype {} where {} is expected",
                        t.dtype.name(),
                        spec.dtype.name()
                    ),
                });
            }
            t.expect_shape(&spec.shape)?;
            found.push(t.clone());
        }
        let mut it = found.into_iter();
        let codes = it.next().expect("qweight");
        let scales = it.next().expect("scales");
        let zeros = (info.format == QuantFormat::Q4).then(|| it.next().expect("qzeros"));
        let signs = if info.rotated {
            let read = |t: Tensor| -> Result<Vec<f32>> {
                t.bytes()
                    .iter()
                    .map(|&b| match b as i8 {
                        1 => Ok(1.0),
                        -1 => Ok(-1.0),
                        other => Err(FormatError::BadTensor {
                            name: t.name().to_owned(),
                            message: format!("sign {other} is neither 1 nor -1"),
                        }),
                    })
                    .collect()
            };
            let sign_in = read(it.next().expect("sign_in"))?;
            Some((sign_in, read(it.next().expect("sign_out"))?))
        } else {
            None
        };
        let q = QuantTensors {
            info,
            codes,
            scales,
            zeros,
            signs,
        };
        q.view().map_err(|message| FormatError::BadTensor {
            name: prefix.to_owned(),
            message,
        })?;
        Ok(Some(q))
    }

    /// The kernel view of the codes, scales and zero points.
    pub fn view(&self) -> std::result::Result<QuantMatRef<'_>, String> {
        let scales = self
            .scales
            .bf16_array(&self.scales.shape)
            .map_err(|e| e.to_string())?;
        let zeros = self.zeros.as_ref().map_or(&[][..], |z| z.bytes());
        QuantMatRef::new(
            self.info.format,
            self.info.rows,
            self.info.cols,
            self.info.group_size,
            self.codes.bytes(),
            scales,
            zeros,
        )
    }
}
