//! The decode loop must not allocate: a counting allocator watches steady-state decode steps.

use hayate_engine::{
    EmbeddingFormat, LoadOptions, Logits, Model, QuantSpec, Sampler, SamplingParams,
};
use hayate_kernels::QuantFormat;
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, only counting calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The count is process-wide: tests take turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn decode_steps_do_not_allocate() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/pystd-qwen3-7m");
    let quantized = |format, embeddings| {
        Some(QuantSpec {
            embeddings,
            ..QuantSpec::new(format)
        })
    };
    let fixture = |name: &str| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(name)
    };
    // The hybrid architectures' state (sliding-window rings, DeltaNet and
    // convolution states) must not allocate either.
    let variants = [
        (dir.clone(), 1, None),
        (dir.clone(), 2, None),
        (
            dir.clone(),
            2,
            quantized(QuantFormat::Q4, EmbeddingFormat::Keep),
        ),
        (
            dir.clone(),
            2,
            quantized(QuantFormat::Q8, EmbeddingFormat::Q8),
        ),
        (fixture("qwen3_5-text-gdn"), 2, None),
        (
            fixture("qwen3_5-vl-layout"),
            1,
            quantized(QuantFormat::Q8, EmbeddingFormat::Keep),
        ),
        (fixture("gemma3-text-sliding"), 2, None),
        (fixture("lfm2-conv-attn"), 2, None),
    ];
    for (dir, threads, quantize) in variants {
        let what = format!("{dir:?}, {threads} threads, {quantize:?}");
        let options = LoadOptions {
            threads,
            quantize,
            ..LoadOptions::default()
        };
        let model = Model::load(&dir, &options).unwrap();
        let mut state = model.new_state(Some(256)).unwrap();
        let params = SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.9,
            min_p: 0.05,
            repetition_penalty: 1.1,
            presence_penalty: 0.4,
            frequency_penalty: 0.2,
            seed: 1,
        };
        let mut sampler = Sampler::new(params, model.info.vocab);
        let mut tokens = Vec::with_capacity(256);
        let mut logits = vec![0f32; model.info.vocab];
        tokens.extend_from_slice(&[0, 10, 20, 30]);
        logits.copy_from_slice(model.forward(&mut state, &tokens, Logits::Last).unwrap());
        // Warm up: thread-local buffers reach their size on the first steps.
        let mut step = |tokens: &mut Vec<u32>,
                        logits: &mut Vec<f32>,
                        state: &mut hayate_engine::InferenceState| {
            let next = sampler.sample(logits, tokens.len(), tokens);
            tokens.push(next);
            logits.copy_from_slice(model.forward(state, &[next], Logits::Last).unwrap());
        };
        for _ in 0..4 {
            step(&mut tokens, &mut logits, &mut state);
        }
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for _ in 0..32 {
            step(&mut tokens, &mut logits, &mut state);
        }
        let allocated = ALLOCATIONS.load(Ordering::Relaxed) - before;
        assert_eq!(
            allocated, 0,
            "{allocated} allocations in 32 decode steps ({what})"
        );
    }
}

/// Speculative decoding's loop does not allocate either, once the kernels'
/// buffers reached the size of its passes: with a draft model (the trained
/// pair) and with prompt lookup.
#[test]
fn speculative_decode_does_not_allocate() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    use hayate_engine::speculate::{
        Coupling, DraftLength, DraftModel, PromptLookup, Speculation, Speculator,
    };
    use hayate_engine::{Generator, StateOptions};
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models");
    let model = Model::load(&models.join("pystd-qwen3-7m"), &LoadOptions::default()).unwrap();
    let draft = Model::load(&models.join("pystd-qwen3-1m"), &LoadOptions::default()).unwrap();
    let params = SamplingParams {
        temperature: 0.8,
        top_k: 40,
        repetition_penalty: 1.1,
        seed: 3,
        ..SamplingParams::default()
    };
    let options = StateOptions {
        context: Some(512),
        rollback: 8,
        ..StateOptions::default()
    };
    let v = model.info.vocab;
    // Chains from each speculator, and trees from the draft.
    let speculators: [(Box<dyn Speculator + '_>, usize); 3] = [
        (
            Box::new(DraftModel::new(&draft, v, &params, Coupling::Shared, &options).unwrap()),
            1,
        ),
        (
            Box::new(DraftModel::new(&draft, v, &params, Coupling::Shared, &options).unwrap()),
            2,
        ),
        (Box::new(PromptLookup::new(3, 1)), 1),
    ];
    for (speculator, width) in speculators {
        let name = speculator.name();
        let mut speculation = Speculation::new(speculator, DraftLength::Fixed(6)).with_width(width);
        let mut generator = Generator::new(&model, &options).unwrap();
        // Text that repeats, so that prompt lookup drafts.
        let prompt: Vec<u32> = (0..60).map(|i| (i % 20 * 37 + 5) as u32).collect();
        generator.set_prompt(&prompt).unwrap();
        let mut sampler = Sampler::new(params.clone(), v);
        let (mut seen, mut before, mut after) = (0, 0, 0);
        generator
            .generate_with(&mut sampler, Some(&mut speculation), 200, &[], |_| {
                seen += 1;
                match seen {
                    40 => before = ALLOCATIONS.load(Ordering::Relaxed),
                    200 => after = ALLOCATIONS.load(Ordering::Relaxed),
                    _ => {}
                }
                Ok::<_, hayate_engine::EngineError>(true)
            })
            .unwrap();
        assert_eq!(seen, 200);
        assert!(
            speculation.stats.drafted > 100,
            "{name}: {:?}",
            speculation.stats
        );
        assert_eq!(
            after - before,
            0,
            "{name} (width {width}): allocations in 160 speculative tokens"
        );
        assert_eq!(
            speculation.stats.tree_passes > 0,
            width > 1,
            "{name} (width {width})"
        );
    }
}
