//! Quantized matrices in a checkpoint: metadata entries and tensors that
//! lie about each other must give an error, never a panic or an
//! out-of-bounds read; a matrix that loads must dequantize and multiply.
//!
//! Input: a control byte, rows and cols (the shape the configuration
//! implies), then the metadata entry (used as given when the control byte
//! says so, else built from the control byte), then bytes that fill the
//! tensors. Shapes and dtypes are right unless the control bits bend them.
#![no_main]

use hayate_formats::{QuantTensors, TensorStore};
use hayate_kernels::quant::{QuantJob, Rotation, qmatmul_many};
use hayate_kernels::{ActPrecision, Isa, ThreadPool};
use libfuzzer_sys::fuzz_target;
use safetensors::{Dtype, tensor::TensorView};
use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

fn pool() -> &'static ThreadPool {
    static POOL: OnceLock<ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| ThreadPool::new(2).expect("two threads"))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 7 {
        return;
    }
    let control = u16::from_le_bytes([data[0], data[1]]);
    let rows = 1 + usize::from(data[2]) + (usize::from(data[3] & 1) << 8);
    let cols = 32 * (1 + usize::from(data[4] % 8)) + usize::from(control >> 15);
    let meta_len = usize::from(data[5]) + (usize::from(data[6]) << 8);
    let body = &data[7..];
    let (meta_raw, fill) = body.split_at(meta_len.min(body.len()));

    let q4 = control & 1 == 0;
    let group = [32, 64, 128, 16][usize::from(control >> 1) & 3];
    let rotated = control & 8 != 0;
    let bit = |i: u16| control & (1 << i) != 0;
    let metadata = if bit(4) {
        String::from_utf8_lossy(meta_raw).into_owned()
    } else {
        let (mrows, mcols) = if bit(5) {
            (rows + 1, cols)
        } else {
            (rows, cols)
        };
        serde_json::json!({
            "format": if q4 { "q4" } else { "q8" },
            "group_size": group,
            "rows": mrows,
            "cols": mcols,
            "rotation": if rotated { "hadamard32" } else { "none" },
        })
        .to_string()
    };
    // The layout the metadata implies, bent by the control bits.
    let groups = cols / group.max(1);
    let code_cols = if q4 { cols / 2 } else { cols } + usize::from(bit(6));
    let mut tensors: Vec<(String, Dtype, Vec<usize>)> = vec![
        (
            "w.qweight".into(),
            if q4 ^ bit(7) { Dtype::U8 } else { Dtype::I8 },
            vec![rows, code_cols],
        ),
        (
            "w.scales".into(),
            if bit(8) { Dtype::F16 } else { Dtype::BF16 },
            vec![rows, groups + usize::from(bit(9))],
        ),
    ];
    if q4 ^ bit(10) {
        tensors.push(("w.qzeros".into(), Dtype::U8, vec![rows, groups.div_ceil(2)]));
    }
    if rotated ^ bit(11) {
        tensors.push(("w.sign_in".into(), Dtype::I8, vec![cols]));
        tensors.push((
            "w.sign_out".into(),
            Dtype::I8,
            vec![rows + usize::from(bit(12))],
        ));
    }
    let mut buffers = Vec::new();
    let mut k = 0;
    for (name, dtype, shape) in &tensors {
        let n = shape.iter().product::<usize>() * dtype.bitsize() / 8;
        let mut bytes: Vec<u8> = (0..n)
            .map(|_| {
                let b = fill.get(k % fill.len().max(1)).copied().unwrap_or(0);
                k += 1;
                b
            })
            .collect();
        // Signs are ±1 unless bit 13 leaves them raw.
        if name.contains("sign") && !bit(13) {
            bytes
                .iter_mut()
                .for_each(|b| *b = if *b & 1 == 0 { 1 } else { 0xFF });
        }
        buffers.push(bytes);
    }
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&buffers)
        .map(|((name, dtype, shape), bytes)| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    let file =
        safetensors::serialize(views, Some(HashMap::from([("w".to_owned(), metadata)]))).unwrap();
    let store = TensorStore::from_bytes(Path::new("fuzz.safetensors"), &file).unwrap();
    let Ok(Some(q)) = QuantTensors::load(&store, "w", rows, cols) else {
        return;
    };
    let view = q.view().expect("a loaded matrix has a valid view");
    let mut row = vec![0f32; cols];
    view.dequantize_row(rows - 1, &mut row);
    // One product on every kernel path this machine has.
    let x: Vec<f32> = (0..2 * cols).map(|i| (i % 7) as f32 - 3.0).collect();
    let rotation = q.signs.as_ref().map(|(si, so)| Rotation {
        sign_in: si,
        sign_out: so,
    });
    for isa in Isa::supported() {
        for precision in [ActPrecision::Int8, ActPrecision::F32] {
            let mut y = vec![0f32; 2 * rows];
            let mut jobs = [QuantJob {
                w: view,
                sign_out: rotation.map(|r| r.sign_out),
                y: &mut y,
            }];
            qmatmul_many(
                pool(),
                isa,
                precision,
                &mut jobs,
                rotation.map(|r| r.sign_in),
                &x,
                2,
            );
        }
    }
});
