//! A loaded model: its blocks, its files, and the threads that run it.

use crate::arch::{self, Translated};
use crate::budget::{Budget, StateShape};
use crate::calibrate::Calibration;
use crate::layers::{KV_PAGE, KvFormat, KvPool};
use crate::linear::Linear;
use crate::quantize::{QuantReport, QuantSpec, quantize_parts, write_quantized};
use crate::state::InferenceState;
use crate::{EngineError, Result};
use hayate_formats::{GenerationConfig, HfConfig, TensorStore};
use hayate_kernels::{ActPrecision, Isa, ThreadPool};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Tokens processed per step of a long prefill by default; bounds the
/// scratch memory.
pub const PREFILL_CHUNK: usize = 512;

/// Default context length when the user does not choose one.
pub const DEFAULT_CONTEXT: usize = 4096;

/// Tokens a new state can roll back by default (enough for chat turns and
/// short speculative drafts).
pub const DEFAULT_ROLLBACK: usize = 8;

/// How to size a sequence's state.
#[derive(Clone, Debug)]
pub struct StateOptions {
    /// Most tokens the state holds; `None`: the model's maximum, capped at
    /// [`DEFAULT_CONTEXT`].
    pub context: Option<usize>,
    /// Tokens that can be rolled back at once (from 1 to the context). Recurrent
    /// layers keep one state per such token; sliding-window caches keep
    /// that many positions beyond the window.
    pub rollback: usize,
    /// Most tokens one step of the forward pass processes: bounds the
    /// scratch memory, and sliding-window caches keep this many positions
    /// beyond the window.
    pub prefill_chunk: usize,
    /// How attention caches store keys and values (default f32, exact).
    pub kv_cache: KvFormat,
    /// Positions per page of a full attention cache (rounded up to 16):
    /// caches grow, and share prefixes, a page at a time.
    pub kv_page: usize,
}

impl Default for StateOptions {
    fn default() -> Self {
        StateOptions {
            context: None,
            rollback: DEFAULT_ROLLBACK,
            prefill_chunk: PREFILL_CHUNK,
            kv_cache: KvFormat::F32,
            kv_page: KV_PAGE,
        }
    }
}

/// How to load and run a model.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Threads for the kernels; 0 means one per available core.
    pub threads: usize,
    /// Quantize the float weights at load.
    pub quantize: Option<QuantSpec>,
    /// How activations enter products with quantized weights.
    pub activations: ActPrecision,
    /// Calibrate the quantization at load (GPTQ over these tokens).
    pub calibration: Option<Arc<Calibration>>,
}

/// Facts about a loaded model, for reports and benchmarks.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// `model_type` from the config.
    pub model_type: String,
    /// Hidden size.
    pub hidden: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Number of layers.
    pub n_layers: usize,
    /// Longest context the model was configured for.
    pub max_positions: usize,
    /// Parameters in the checkpoint (a tied embedding counted once).
    pub n_params: usize,
    /// Bytes of weights in the checkpoint.
    pub weight_bytes: usize,
    /// Weight bytes read to decode one token (every matrix once, plus one embedding row).
    pub bytes_per_token: usize,
    /// Weights of the blocks' linear layers (embedding and output head excluded).
    pub linear_params: usize,
    /// Bytes of the blocks' linear layers, as they are held (quantized ones
    /// with their scales and zero points).
    pub linear_bytes: usize,
}

impl ModelInfo {
    /// Average stored bits per parameter.
    pub fn bits_per_weight(&self) -> f64 {
        8.0 * self.weight_bytes as f64 / self.n_params.max(1) as f64
    }

    /// Average bits per weight of the blocks' linear layers alone: what a
    /// quantization format costs, without the embedding, head and norms.
    pub fn linear_bits_per_weight(&self) -> f64 {
        8.0 * self.linear_bytes as f64 / self.linear_params.max(1) as f64
    }
}

/// Tells models apart, so that a state is only ever run by the model that made it.
static NEXT_MODEL_ID: AtomicU64 = AtomicU64::new(0);

/// A model ready to run: blocks bound to memory-mapped weights.
///
/// A model is `Sync`: threads may share one and call [`Model::forward`] at
/// once, each with its own [`InferenceState`]. The weights are read-only;
/// everything a sequence writes (caches, recurrent states, scratch buffers)
/// lives in its state; the kernel threads run one job at a time, so
/// concurrent calls take turns per kernel rather than share its threads
/// (see [`hayate_kernels::pool`]).
pub struct Model {
    pub(crate) id: u64,
    /// What the model is.
    pub info: ModelInfo,
    /// Its `config.json`.
    pub config: HfConfig,
    /// Its `generation_config.json` (defaults when absent).
    pub generation: GenerationConfig,
    pub(crate) parts: Translated,
    pub(crate) pool: Arc<ThreadPool>,
    pub(crate) isa: Isa,
    pub(crate) precision: ActPrecision,
    /// What in-memory quantization did, when asked for.
    pub quantization: Option<QuantReport>,
    // Keeps the mapped files alive for the tensors the blocks borrow.
    pub(crate) store: TensorStore,
}

impl Model {
    /// Loads a Hugging Face model directory (`config.json`, safetensors,
    /// optional `generation_config.json`). Weights are mapped, not read.
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Self> {
        let config = HfConfig::load(&dir.join("config.json"))?;
        let generation = GenerationConfig::load(&dir.join("generation_config.json"))?;
        // Find the architecture before touching the weights, for a clearer error.
        let translator = arch::translator(&config)?;
        let model_type = config.model_type()?.to_owned();
        let isa = Isa::from_env().map_err(EngineError::State)?;
        // Every size is checked before a file is mapped or a buffer allocated.
        let geometry = (translator.geometry)(&config)?;
        let store = TensorStore::open_dir(dir)?;
        let mut parts = (translator.build)(&config, &geometry, &store)?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = match options.threads {
            0 => cores,
            n if n > cores => {
                tracing::warn!(
                    "{n} threads asked for, but this machine has {cores} cores: using {cores}"
                );
                cores
            }
            n => n,
        };
        let pool = ThreadPool::new(threads).map_err(|e| {
            EngineError::State(format!("cannot start {threads} kernel threads: {e}"))
        })?;
        let pool = Arc::new(pool);
        let quantization = options
            .quantize
            .as_ref()
            .map(|spec| {
                let cx = (&*pool, isa, options.activations);
                quantize_parts(&mut parts, cx, spec, options.calibration.as_deref())
            })
            .transpose()?;
        // The AVX-512 short passes read q4 and q8 in strips of 16 rows (a copy made
        // here; files keep rows). Lower levels (`with_isa`) still run them,
        // on the reference for passes of up to 4 tokens.
        if isa.has_avx512() {
            to_strips(&mut parts, &pool);
        }
        let info = describe(model_type, &parts, &store);
        Ok(Model {
            id: NEXT_MODEL_ID.fetch_add(1, Ordering::Relaxed),
            info,
            config,
            generation,
            parts,
            pool,
            isa,
            precision: options.activations,
            quantization,
            store,
        })
    }

    /// How activations enter quantized products.
    pub fn activations(&self) -> ActPrecision {
        self.precision
    }

    /// Threads the kernels use.
    pub fn n_threads(&self) -> usize {
        self.pool.n_threads()
    }

    /// The thread pool the kernels run on.
    pub fn pool(&self) -> Arc<ThreadPool> {
        Arc::clone(&self.pool)
    }

    /// Instruction set the kernels use.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Runs the kernels at `isa` instead (for comparisons); `None` if the CPU lacks it.
    /// Quantized layers keep the layout chosen at load: strips, made for AVX-512,
    /// run short passes at a lower level on the scalar reference, so compare
    /// speeds by loading with `HAYATE_ISA` instead.
    pub fn with_isa(mut self, isa: Isa) -> Option<Self> {
        isa.is_supported().then(|| {
            self.isa = isa;
            self
        })
    }

    /// A fresh state holding up to `context` tokens (`None`: the model's
    /// maximum, capped at [`DEFAULT_CONTEXT`]), able to roll back
    /// [`DEFAULT_ROLLBACK`] tokens. Asking for more than the model supports
    /// is an error.
    pub fn new_state(&self, context: Option<usize>) -> Result<InferenceState> {
        self.new_state_with(&StateOptions {
            context,
            ..StateOptions::default()
        })
    }

    /// A fresh state as `options` say, its attention caches' pages from
    /// a pool of its own that holds its whole context, all taken at once
    /// (memory is committed only as they fill), so that decoding never
    /// takes a page.
    pub fn new_state_with(&self, options: &StateOptions) -> Result<InferenceState> {
        let pool = KvPool::new(0);
        let (mut state, mut budget) = self.state_in(options, &pool)?;
        let bytes = state.kv_bytes_at(state.capacity());
        budget.take(bytes)?;
        pool.set_limit(bytes);
        state.prepare(state.capacity())?;
        Ok(state)
    }

    /// A fresh state as `options` say whose attention caches take their
    /// pages from `pool`, shared with other states: each holds only the
    /// pages its tokens fill, and a step that needs a page the pool no
    /// longer has fails with [`EngineError::KvMemory`].
    pub fn new_state_in(&self, options: &StateOptions, pool: &KvPool) -> Result<InferenceState> {
        Ok(self.state_in(options, pool)?.0)
    }

    /// A state and what is left of its budget.
    fn state_in(&self, options: &StateOptions, pool: &KvPool) -> Result<(InferenceState, Budget)> {
        let max = self.info.max_positions;
        let capacity = match options.context {
            None => max.min(DEFAULT_CONTEXT),
            Some(c) if c == 0 || c > max => {
                return Err(EngineError::ContextSize { requested: c, max });
            }
            Some(c) => c,
        };
        let shape = StateShape {
            capacity,
            chunk: options.prefill_chunk.clamp(1, capacity),
            rollback: options.rollback.clamp(1, capacity),
            threads: self.n_threads(),
            kv: options.kv_cache,
            page: options.kv_page.clamp(1, capacity).next_multiple_of(16),
        };
        let mut budget = Budget::for_context(capacity, pool.clone());
        let p = &self.parts;
        let layers = (&p.blocks[..], &p.ropes[..]);
        let state = InferenceState::new(self.id, layers, (p.hidden, p.vocab), &shape, &mut budget)?;
        Ok((state, budget))
    }

    /// Writes the weights of this (unquantized) model, quantized by `spec`
    /// (calibrated over `calibration` when given), to `path` as one
    /// safetensors file. `progress(done, total)` is called after each
    /// matrix. The caller owns the directory (temporary, renamed when
    /// complete) and the other files. The model is left as it was loaded
    /// (calibration swaps layers while it runs, hence `&mut`).
    pub fn write_quantized(
        &mut self,
        spec: &QuantSpec,
        calibration: Option<&Calibration>,
        path: &Path,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<QuantReport> {
        let cx = (&*self.pool, self.isa, self.precision);
        write_quantized(
            &mut self.parts,
            &self.store,
            cx,
            (spec, calibration),
            path,
            progress,
        )
    }

    /// Token ids that end generation: `generation_config.json`'s, else `config.json`'s.
    pub fn eos_ids(&self) -> Vec<u32> {
        if !self.generation.eos_token_id.is_empty() {
            return self.generation.eos_token_id.clone();
        }
        self.config.token_ids("eos_token_id").unwrap_or_default()
    }
}

/// Sizes of a translated model: parameters and bytes as the layers hold
/// them (quantized ones at their quantized size), a tied matrix counted once.
fn describe(model_type: String, parts: &Translated, store: &TensorStore) -> ModelInfo {
    let mut linears: Vec<&Linear> = parts.blocks.iter().flat_map(|b| b.linears()).collect();
    linears.push(&parts.embedding);
    linears.push(&parts.lm_head);
    let mut seen = HashSet::new();
    linears.retain(|l| seen.insert(l.name.as_str()));
    // Matrices are counted as the layers hold them; what they were read
    // from is not counted again below.
    let sources: HashSet<&str> = linears.iter().map(|l| l.source.as_str()).collect();
    let (mut n_params, mut weight_bytes) = (0, 0);
    for l in &linears {
        n_params += l.rows * l.cols;
        weight_bytes += l.n_bytes();
    }
    // Everything else (norms, biases) as stored.
    const MATRIX_PARTS: [&str; 6] = [
        "weight", "qweight", "scales", "qzeros", "sign_in", "sign_out",
    ];
    for name in store.names() {
        let is_matrix = name
            .rsplit_once('.')
            .is_some_and(|(prefix, part)| sources.contains(prefix) && MATRIX_PARTS.contains(&part));
        if !is_matrix && let Some(t) = store.get(name) {
            n_params += t.n_elements();
            weight_bytes += t.n_bytes();
        }
    }
    let (mut linear_params, mut linear_bytes) = (0, 0);
    for l in parts.blocks.iter().flat_map(|b| b.linears()) {
        linear_params += l.rows * l.cols;
        linear_bytes += l.n_bytes();
    }
    let embedding_row = parts.embedding.n_bytes() / parts.vocab;
    ModelInfo {
        model_type,
        hidden: parts.hidden,
        vocab: parts.vocab,
        n_layers: parts.blocks.len(),
        max_positions: parts.max_positions,
        n_params,
        weight_bytes,
        bytes_per_token: linear_bytes + parts.lm_head.n_bytes() + embedding_row,
        linear_params,
        linear_bytes,
    }
}

/// Lays out every quantized layer of `parts` in strips for the AVX-512 kernels.
fn to_strips(parts: &mut Translated, pool: &ThreadPool) {
    // By name, so that tied layers keep sharing one copy.
    let mut done: std::collections::HashMap<String, Option<Linear>> = Default::default();
    let mut convert = |l: &mut Linear| {
        let strips = done
            .entry(l.name.clone())
            .or_insert_with(|| l.in_strips(pool));
        if let Some(strips) = strips {
            *l = strips.clone();
        }
    };
    for block in &mut parts.blocks {
        for group in block.linear_groups_mut() {
            group.into_iter().for_each(&mut convert);
        }
    }
    convert(&mut parts.embedding);
    convert(&mut parts.lm_head);
}
