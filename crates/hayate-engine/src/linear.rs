//! Linear layers over float or quantized weights, and the products that run them.

use hayate_formats::{FormatError, QuantTensors, Result, Tensor, TensorStore};
use hayate_kernels::hadamard::{BLOCK, hadamard_blocks};
use hayate_kernels::quant::{QuantJob, QuantMatRef, QuantizedMatrix, Rotation, qmatmul_many_in};
use hayate_kernels::{
    ActPrecision, Isa, MatRef, MatmulJob, ProductMode, ThreadPool, WeightSlice, matmul_many_in,
};
use std::ops::Range;
use std::sync::Arc;

thread_local! {
    /// A dequantized row, reused so that lookups do not allocate.
    static ROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Integer weights: mapped from a quantized checkpoint or quantized at load.
#[derive(Clone)]
enum QuantData {
    Mapped(Arc<QuantTensors>),
    Owned(Arc<QuantizedMatrix>),
}

/// `S_in` and `S_out` of a rotated matrix.
#[derive(Clone)]
pub struct Signs {
    /// ±1 per input.
    pub sign_in: Arc<[f32]>,
    /// ±1 per output.
    pub sign_out: Arc<[f32]>,
}

/// Floats in a checkpoint's dtype, copied out of it (rows regrouped at load).
#[derive(Clone)]
enum OwnedFloats {
    F32(Arc<[f32]>),
    Bf16(Arc<[u16]>),
    F16(Arc<[u16]>),
}

impl OwnedFloats {
    fn slice(&self) -> WeightSlice<'_> {
        match self {
            OwnedFloats::F32(v) => WeightSlice::F32(v),
            OwnedFloats::Bf16(v) => WeightSlice::Bf16(v),
            OwnedFloats::F16(v) => WeightSlice::F16(v),
        }
    }

    /// The rows `ranges` of `m`, in that order.
    fn gather(m: &MatRef<'_>, ranges: &[Range<usize>]) -> Self {
        match m.data {
            WeightSlice::F32(d) => OwnedFloats::F32(gather_rows(d, m.cols, ranges).into()),
            WeightSlice::Bf16(d) => OwnedFloats::Bf16(gather_rows(d, m.cols, ranges).into()),
            WeightSlice::F16(d) => OwnedFloats::F16(gather_rows(d, m.cols, ranges).into()),
        }
    }
}

/// The rows `ranges` of a row-major array of `width`-long rows, in that
/// order (weights, or with `width` 1 a bias).
pub(crate) fn gather_rows<T: Copy>(data: &[T], width: usize, ranges: &[Range<usize>]) -> Vec<T> {
    ranges
        .iter()
        .flat_map(|r| &data[r.start * width..r.end * width])
        .copied()
        .collect()
}

/// The weights of a linear layer.
#[derive(Clone)]
enum LinearWeight {
    /// Floats in their stored dtype, memory-mapped.
    Dense(Tensor),
    /// Floats in their stored dtype, some rows of a stored matrix.
    Gathered(OwnedFloats),
    /// q4 or q8 codes, with their signs when rotated.
    Quant {
        data: QuantData,
        signs: Option<Signs>,
    },
}

/// A linear layer `y = W·x (+ b)`.
#[derive(Clone)]
pub struct Linear {
    /// Name in the checkpoint, without `.weight` (e.g. `model.layers.0.mlp.up_proj`).
    pub name: String,
    /// The stored matrix it was read from: `name`, unless the translator
    /// took these rows out of a larger one (then quantizing replaces that).
    pub source: String,
    weight: LinearWeight,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Optional bias, widened to f32.
    pub bias: Option<Vec<f32>>,
}

/// What a product runs over.
pub enum LinearKernel<'a> {
    /// Float weights.
    Dense(MatRef<'a>),
    /// Quantized weights and their rotation.
    Quant(QuantMatRef<'a>, Option<Rotation<'a>>),
}

impl Linear {
    /// Loads `name` from `store`: `name.weight` (float) or the quantized
    /// tensors `name.qweight`, ... Checks shapes against `rows x cols`.
    pub fn load(
        store: &TensorStore,
        name: &str,
        rows: usize,
        cols: usize,
        bias: bool,
    ) -> Result<Self> {
        let bias = bias
            .then(|| store.require(&format!("{name}.bias")))
            .transpose()?
            .map(|b| b.vector_f32(rows))
            .transpose()?;
        let weight = match store.get(&format!("{name}.weight")) {
            Some(w) => {
                w.matrix(rows, cols)?;
                LinearWeight::Dense(w.clone())
            }
            None => match QuantTensors::load(store, name, rows, cols)? {
                Some(mut q) => {
                    let signs = q.signs.take().map(|(sign_in, sign_out)| Signs {
                        sign_in: sign_in.into(),
                        sign_out: sign_out.into(),
                    });
                    LinearWeight::Quant {
                        data: QuantData::Mapped(Arc::new(q)),
                        signs,
                    }
                }
                None => return Err(FormatError::MissingTensor(format!("{name}.weight"))),
            },
        };
        Ok(Linear {
            name: name.to_owned(),
            source: name.to_owned(),
            weight,
            rows,
            cols,
            bias,
        })
    }

    /// The same layer over quantized weights (the bias is kept).
    pub fn with_quantized(&self, matrix: Arc<QuantizedMatrix>, signs: Option<Signs>) -> Self {
        Linear {
            weight: LinearWeight::Quant {
                data: QuantData::Owned(matrix),
                signs,
            },
            ..self.clone()
        }
    }

    /// The same layer with its quantized weights in strips of 16 rows, the
    /// layout of the AVX-512 short-pass kernels (a copy: files keep the
    /// row-major layout); `None` when the weights are not quantized or
    /// cannot be cut so.
    pub fn in_strips(&self, pool: &ThreadPool) -> Option<Self> {
        let LinearWeight::Quant { signs, data } = &self.weight else {
            return None;
        };
        let LinearKernel::Quant(view, _) = self.kernel() else {
            return None;
        };
        let strips = match data {
            // The mapped rows are handed back as they are copied; then the
            // pages that straddle two pieces.
            QuantData::Mapped(tensors) => {
                let strips =
                    QuantizedMatrix::strips_of(pool, &view, &|rows| tensors.release_rows(rows))?;
                tensors.release_pages();
                strips
            }
            QuantData::Owned(_) => QuantizedMatrix::strips_of(pool, &view, &|_| {})?,
        };
        Some(self.with_quantized(Arc::new(strips), signs.clone()))
    }

    /// A layer `name` of the rows `ranges` of this float layer, in that
    /// order (a translator regrouping rows the checkpoint interleaves).
    /// Quantized weights cannot be regrouped: their rotation mixes rows.
    pub fn gather_rows(&self, name: &str, ranges: &[Range<usize>]) -> Result<Self> {
        let bad = |message: String| FormatError::BadTensor {
            name: self.name.clone(),
            message,
        };
        let Some(m) = self.dense() else {
            return Err(bad(
                "was quantized before its rows were regrouped at load; quantize the original checkpoint again"
                    .into(),
            ));
        };
        if let Some(r) = ranges.iter().find(|r| r.start > r.end || r.end > self.rows) {
            return Err(bad(format!("rows {r:?} outside its {} rows", self.rows)));
        }
        Ok(Linear {
            name: name.to_owned(),
            source: self.source.clone(),
            weight: LinearWeight::Gathered(OwnedFloats::gather(&m, ranges)),
            rows: ranges.iter().map(|r| r.len()).sum(),
            cols: self.cols,
            bias: self.bias.as_deref().map(|b| gather_rows(b, 1, ranges)),
        })
    }

    /// The float weights, if the layer has them.
    pub fn dense(&self) -> Option<MatRef<'_>> {
        match &self.weight {
            LinearWeight::Dense(t) => Some(
                t.matrix(self.rows, self.cols)
                    .expect("shape and dtype validated at load"),
            ),
            LinearWeight::Gathered(owned) => {
                Some(MatRef::new(owned.slice(), self.rows, self.cols).expect("sized when gathered"))
            }
            LinearWeight::Quant { .. } => None,
        }
    }

    /// The weights as the kernels take them.
    pub fn kernel(&self) -> LinearKernel<'_> {
        match &self.weight {
            LinearWeight::Dense(_) | LinearWeight::Gathered(_) => {
                LinearKernel::Dense(self.dense().expect("dense"))
            }
            LinearWeight::Quant { data, signs } => {
                let view = match data {
                    QuantData::Mapped(t) => t.view().expect("layout validated at load"),
                    QuantData::Owned(m) => m.view(),
                };
                let rotation = signs.as_ref().map(|s| Rotation {
                    sign_in: &s.sign_in,
                    sign_out: &s.sign_out,
                });
                LinearKernel::Quant(view, rotation)
            }
        }
    }

    /// The input signs `S_in` when the weights are rotated.
    pub fn sign_in(&self) -> Option<&[f32]> {
        match &self.weight {
            LinearWeight::Quant { signs: Some(s), .. } => Some(&s.sign_in),
            _ => None,
        }
    }

    /// Row `r` of `W` (e.g. a token's embedding), un-rotated, into `out`.
    pub fn row(&self, isa: Isa, r: usize, out: &mut [f32]) {
        match self.kernel() {
            LinearKernel::Dense(m) => m.widen_row(r, out),
            LinearKernel::Quant(q, None) => q.dequantize_row(r, out),
            LinearKernel::Quant(q, Some(rot)) => {
                // W = S_out·H·W'·H·S_in: mix the 32 stored rows of r's block.
                let (block, i) = (r / BLOCK * BLOCK, r % BLOCK);
                out.fill(0.0);
                let norm = 1.0 / (BLOCK as f32).sqrt();
                ROW.with_borrow_mut(|stored| {
                    stored.resize(self.cols, 0.0);
                    for j in 0..BLOCK {
                        q.dequantize_row(block + j, stored);
                        let h = if (i & j).count_ones().is_multiple_of(2) {
                            norm
                        } else {
                            -norm
                        };
                        for (o, &v) in out.iter_mut().zip(stored.iter()) {
                            *o += h * v;
                        }
                    }
                });
                hadamard_blocks(isa, out);
                let so = rot.sign_out[r];
                for (o, &si) in out.iter_mut().zip(rot.sign_in) {
                    *o *= so * si;
                }
            }
        }
    }

    /// Bytes the weights occupy (read once per decoded token).
    pub fn n_bytes(&self) -> usize {
        match self.kernel() {
            LinearKernel::Dense(m) => m.rows * m.cols * m.data.element_size(),
            LinearKernel::Quant(q, rot) => {
                q.n_bytes() + rot.map_or(0, |r| r.sign_in.len() + r.sign_out.len())
            }
        }
    }

    /// Adds the bias to each of the `n_tok` output rows in `y`.
    pub fn add_bias(&self, y: &mut [f32], n_tok: usize) {
        if let Some(bias) = &self.bias {
            for row in y[..n_tok * self.rows].chunks_exact_mut(self.rows) {
                for (v, b) in row.iter_mut().zip(bias) {
                    *v += b;
                }
            }
        }
    }
}

/// Sees the input of every product: the name of the group's first layer
/// and its `n x cols` input rows (calibration gathers its statistics so).
pub(crate) type InputTap<'a> = &'a dyn Fn(&str, &[f32]);

/// What the products run on: the kernel threads, the instruction set, and
/// how activations enter quantized products.
#[derive(Clone, Copy)]
pub(crate) struct Compute<'a> {
    pub pool: &'a ThreadPool,
    pub isa: Isa,
    pub precision: ActPrecision,
    /// Which kernels the products may take ([`ProductMode::TokenExact`] for
    /// speculative verification).
    pub mode: ProductMode,
    /// Called with each product's input before it runs (calibration only).
    pub tap: Option<InputTap<'a>>,
}

impl Compute<'_> {
    /// `y_i = x · W_iᵀ (+ b_i)` for layers that share the input `x` (`n`
    /// rows): one fused product when their weights allow it, else one each.
    pub fn project<const N: usize>(&self, jobs: [(&Linear, &mut [f32]); N], x: &[f32], n: usize) {
        let layers = jobs.each_ref().map(|(l, _)| *l);
        if let Some(tap) = self.tap
            && let Some(first) = layers.first()
        {
            tap(&first.name, &x[..n * first.cols]);
        }
        let kernels = layers.map(Linear::kernel);
        if kernels.iter().all(|k| matches!(k, LinearKernel::Dense(_))) {
            let mut kernels = kernels.into_iter();
            let mut dense = jobs.map(|(_, y)| {
                let Some(LinearKernel::Dense(w)) = kernels.next() else {
                    unreachable!("checked above")
                };
                MatmulJob { w, y }
            });
            matmul_many_in(self.pool, self.isa, self.mode, &mut dense, x, n);
            for (l, job) in layers.iter().zip(&mut dense) {
                l.add_bias(job.y, n);
            }
        } else if kernels.iter().all(|k| matches!(k, LinearKernel::Quant(..))) {
            let signs_in = layers.map(|l| l.sign_in());
            let mut kernels = kernels.into_iter();
            let mut quant = jobs.map(|(_, y)| {
                let Some(LinearKernel::Quant(w, rotation)) = kernels.next() else {
                    unreachable!("checked above")
                };
                QuantJob {
                    w,
                    sign_out: rotation.map(|r| r.sign_out),
                    y,
                }
            });
            // One fused product per run of layers sharing `S_in` (a group
            // may mix rotated matrices with small unrotated ones).
            let mut first = 0;
            while first < N {
                let sign_in = signs_in[first];
                let end = (first..N).find(|&i| signs_in[i] != sign_in).unwrap_or(N);
                let run = &mut quant[first..end];
                let cx = (self.pool, self.isa, self.precision, self.mode);
                qmatmul_many_in(cx, run, sign_in, x, n);
                first = end;
            }
            for (l, job) in layers.iter().zip(&mut quant) {
                l.add_bias(job.y, n);
            }
        } else {
            // One at a time, without tapping the same input again.
            let untapped = Compute { tap: None, ..*self };
            for (l, y) in jobs {
                untapped.project([(l, y)], x, n);
            }
        }
    }
}
