//! `config.json` → model geometry: any bytes must give a checked geometry
//! or an error, never a panic; a geometry that passes must keep its
//! promises (sizes in bounds, heads that divide, products that fit, finite
//! rotary frequencies).
#![no_main]

use hayate_engine::arch::geometry::{self, LayerDims};
use hayate_engine::rope::Rope;
use hayate_formats::{GenerationConfig, HfConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<GenerationConfig>(data);
    let Ok(cfg) = HfConfig::from_slice(data) else {
        return;
    };
    let _ = cfg.token_ids("eos_token_id");
    let Ok(g) = hayate_engine::arch::geometry(&cfg) else {
        return;
    };
    assert!((1..=geometry::MAX_HIDDEN).contains(&g.hidden));
    assert!((1..=geometry::MAX_VOCAB).contains(&g.vocab));
    assert!((1..=geometry::MAX_POSITIONS).contains(&g.max_positions));
    assert!((1..=geometry::MAX_LAYERS).contains(&g.layers.len()));
    g.matrix_params()
        .expect("the bounds keep the parameter count in range");
    for layer in &g.layers {
        match layer {
            LayerDims::Attention(a) => {
                assert!(a.n_heads % a.n_kv_heads == 0 && a.head_dim % 2 == 0);
                assert!(a.rotary_dim > 0 && a.rotary_dim <= a.head_dim);
                assert!(
                    a.window
                        .is_none_or(|w| (1..=geometry::MAX_POSITIONS).contains(&w))
                );
            }
            LayerDims::DeltaNet(d) => assert!(d.n_v_heads % d.n_k_heads == 0),
            LayerDims::ShortConv(c) => assert!(c.kernel >= 1 && c.channels == g.hidden),
        }
    }
    // The rotary tables the translators would build are finite everywhere.
    let text = cfg.text_config().expect("the geometry read it");
    for rope in [
        text.rope(),
        text.rope_for_layer_type("sliding_attention", Some("rope_local_base_freq"), 1e4),
        text.rope_for_layer_type("full_attention", None, 1e6),
    ]
    .into_iter()
    .flatten()
    {
        for layer in &g.layers {
            if let LayerDims::Attention(a) = layer {
                let r = Rope::new(&rope, a.rotary_dim);
                assert!(r.inv_freq.iter().all(|f| f.is_finite()), "{rope:?}");
            }
        }
    }
});
