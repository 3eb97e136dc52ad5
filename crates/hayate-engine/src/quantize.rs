//! Quantizing a model's linear layers: in memory at load, or into a new
//! checkpoint (written tensor by tensor, so memory stays bounded).

use crate::arch::Translated;
use crate::calibrate::{self, Calibration, Objective};
use crate::linear::{Linear, LinearKernel, Signs};
use crate::refine;
use crate::{EngineError, Result};
use hayate_formats::{
    FormatError, QuantInfo, ROTATION, SafetensorsWriter, TensorSpec, TensorStore,
};
use hayate_kernels::quant::{GROUP_SIZES, QuantFormat, QuantLayout, Rotation, quantize_matrix};
use hayate_kernels::{ActPrecision, Isa, ThreadPool};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;

/// Seed of the rotation signs unless the user picks one.
pub const DEFAULT_SEED: u64 = 0x4841_5941_5445;

/// What the embedding table and output head become.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EmbeddingFormat {
    /// Kept as stored (bf16 for most checkpoints).
    #[default]
    Keep,
    /// q8 (the head rotated like the other matrices; an untied table is not,
    /// since it is only read row by row).
    Q8,
}

impl EmbeddingFormat {
    /// `bf16` (kept) or `q8`.
    pub fn name(self) -> &'static str {
        match self {
            EmbeddingFormat::Keep => "bf16",
            EmbeddingFormat::Q8 => "q8",
        }
    }
}

/// How to quantize a model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuantSpec {
    /// Format of the block matrices.
    pub format: QuantFormat,
    /// Inputs per group (32, 64 or 128).
    pub group_size: usize,
    /// Whether to apply the block Hadamard rotation.
    pub rotation: bool,
    /// Seed the rotation signs are drawn from.
    pub seed: u64,
    /// Embedding table and output head.
    pub embeddings: EmbeddingFormat,
}

impl QuantSpec {
    /// The defaults for `format`: groups of 32, rotated, bf16 embeddings.
    pub fn new(format: QuantFormat) -> Self {
        QuantSpec {
            format,
            group_size: 32,
            rotation: true,
            seed: DEFAULT_SEED,
            embeddings: EmbeddingFormat::Keep,
        }
    }

    /// Checks the group size.
    pub fn validate(&self) -> Result<()> {
        if !GROUP_SIZES.contains(&self.group_size) {
            return Err(EngineError::Quantize(format!(
                "group size {} is not one of {GROUP_SIZES:?}",
                self.group_size
            )));
        }
        Ok(())
    }

    /// The `quantization` section of a quantized checkpoint's `config.json`
    /// (with how it was calibrated, if it was).
    pub fn config_section(
        &self,
        quantized: &[String],
        calibration: Option<&Calibration>,
    ) -> serde_json::Value {
        let calibration = calibration.map(|c| {
            serde_json::json!({
                "method": "gptq",
                "objective": match c.objective() {
                    Objective::Float => "float",
                    Objective::Layer => "layer",
                },
                "tokens": c.tokens(),
                "context": c.context(),
                "damp": c.damp(),
                "refinement": c.refinement().map(|r| serde_json::json!({
                    "objective": "kl",
                    "steps": r.steps,
                    "lr": r.lr,
                })),
            })
        });
        serde_json::json!({
            "method": "hayate",
            "format": self.format.name(),
            "group_size": self.group_size,
            "rotation": if self.rotation { ROTATION } else { "none" },
            "seed": self.seed,
            "embeddings": self.embeddings.name(),
            "calibration": calibration,
            "quantized_tensors": quantized,
        })
    }
}

/// ±1 signs for `key`, reproducible from `seed` (SplitMix64 over an FNV-1a hash).
pub fn signs(seed: u64, key: &str, n: usize) -> Vec<f32> {
    let mut state = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    }) ^ seed;
    let mut bits = 0u64;
    (0..n)
        .map(|i| {
            if i % 64 == 0 {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                bits = z ^ (z >> 31);
            }
            if (bits >> (i % 64)) & 1 == 0 {
                1.0
            } else {
                -1.0
            }
        })
        .collect()
}

/// One matrix to quantize and how.
pub(crate) struct Planned {
    /// The float layer (a cheap clone: the weights stay mapped).
    pub linear: Linear,
    pub format: QuantFormat,
    pub group_size: usize,
    pub rotated: bool,
    /// Key of the `S_in` shared by the group.
    pub sign_in_key: String,
}

impl Planned {
    fn info(&self) -> QuantInfo {
        QuantInfo {
            format: self.format,
            group_size: self.group_size,
            rows: self.linear.rows,
            cols: self.linear.cols,
            rotated: self.rotated,
        }
    }

    /// The rotation signs, `S_in` being the group's.
    pub fn signs(&self, seed: u64, sign_in: &Arc<[f32]>) -> Option<Signs> {
        self.rotated.then(|| Signs {
            sign_in: Arc::clone(sign_in),
            sign_out: signs(
                seed,
                &format!("{}.sign_out", self.linear.name),
                self.linear.rows,
            )
            .into(),
        })
    }
}

/// The matrices of one group of layers sharing an input, in order.
pub(crate) struct PlannedGroup {
    /// The block the group belongs to (`None`: embedding or output head).
    pub block: Option<usize>,
    /// Its place among the block's groups ([`crate::layers::Block::linear_groups`]).
    pub index: usize,
    /// Name of the group's first layer, quantized or not: products report
    /// their input under it.
    pub input_name: String,
    pub members: Vec<Planned>,
}

impl PlannedGroup {
    /// The group's `S_in`.
    pub fn sign_in(&self, seed: u64) -> Arc<[f32]> {
        let first = &self.members[0];
        signs(seed, &first.sign_in_key, first.linear.cols).into()
    }
}

/// What quantization did, for the user.
#[derive(Clone, Debug, Default)]
pub struct QuantReport {
    /// Names of the quantized matrices.
    pub quantized: Vec<String>,
    /// Matrices left as stored because their shape does not allow groups of 32.
    pub kept: Vec<String>,
    /// Matrices quantized with a smaller group or without rotation than asked.
    pub adapted: Vec<String>,
}

/// Decides how every selected matrix is quantized, groups sharing an input
/// together, in the order of the forward pass.
pub(crate) fn plan(
    parts: &Translated,
    spec: &QuantSpec,
) -> Result<(Vec<PlannedGroup>, QuantReport)> {
    spec.validate()?;
    // (block, index in the block), the layers, their format, whether rotated.
    type Candidate<'a> = ((Option<usize>, usize), Vec<&'a Linear>, QuantFormat, bool);
    let mut groups: Vec<Candidate<'_>> = Vec::new();
    for (b, block) in parts.blocks.iter().enumerate() {
        for (i, g) in block.linear_groups().into_iter().enumerate() {
            groups.push(((Some(b), i), g, spec.format, spec.rotation));
        }
    }
    if spec.embeddings == EmbeddingFormat::Q8 {
        if parts.embedding.name != parts.lm_head.name {
            groups.push(((None, 0), vec![&parts.embedding], QuantFormat::Q8, false));
        }
        groups.push((
            (None, 1),
            vec![&parts.lm_head],
            QuantFormat::Q8,
            spec.rotation,
        ));
    }
    let mut report = QuantReport::default();
    let mut planned = Vec::new();
    for ((block, index), members, format, rotate) in groups {
        let input_name = members[0].name.clone();
        let key = format!("{input_name}.sign_in");
        let mut out = Vec::new();
        for linear in members {
            if linear.dense().is_none() {
                return Err(EngineError::Quantize(format!(
                    "`{}` is already quantized; quantize the original checkpoint instead",
                    linear.name
                )));
            }
            let (rows, cols) = (linear.rows, linear.cols);
            let Some(&group_size) = GROUP_SIZES
                .iter()
                .rev()
                .find(|&&g| g <= spec.group_size && cols.is_multiple_of(g))
            else {
                report.kept.push(linear.name.clone());
                continue;
            };
            let rotated = rotate && rows.is_multiple_of(32);
            if group_size != spec.group_size || rotated != rotate {
                report.adapted.push(linear.name.clone());
            }
            report.quantized.push(linear.name.clone());
            out.push(Planned {
                linear: linear.clone(),
                format,
                group_size,
                rotated,
                sign_in_key: key.clone(),
            });
        }
        if !out.is_empty() {
            planned.push(PlannedGroup {
                block,
                index,
                input_name,
                members: out,
            });
        }
    }
    Ok((planned, report))
}

/// Quantizes one planned group by round-to-nearest; members share `S_in`.
fn quantize_group(group: &PlannedGroup, seed: u64, pool: &ThreadPool, isa: Isa) -> Vec<Linear> {
    let sign_in = group.sign_in(seed);
    group
        .members
        .iter()
        .map(|p| {
            let l = &p.linear;
            let signs = p.signs(seed, &sign_in);
            let rotation = signs.as_ref().map(|s| Rotation {
                sign_in: &s.sign_in,
                sign_out: &s.sign_out,
            });
            let dense = l.dense().expect("planned matrices are dense");
            let m = quantize_matrix(pool, isa, p.format, p.group_size, dense, rotation);
            l.with_quantized(Arc::new(m), signs)
        })
        .collect()
}

/// Every planned group quantized, in order, each handed to `emit`: by
/// round-to-nearest, or with `calibration` by GPTQ layer after layer (then
/// `keep` leaves the quantized layers in `parts`).
#[allow(clippy::too_many_arguments)]
fn quantize_groups(
    parts: &mut Translated,
    cx: (&ThreadPool, Isa, ActPrecision),
    spec: &QuantSpec,
    planned: &[PlannedGroup],
    calibration: Option<&Calibration>,
    keep: bool,
    emit: &mut dyn FnMut(Vec<Linear>) -> Result<()>,
) -> Result<()> {
    match calibration {
        Some(c) => match c.refinement() {
            None => calibrate::quantize_calibrated(parts, cx, spec.seed, planned, c, keep, emit),
            Some(refinement) => {
                // Refinement tunes every layer at once: all stay quantized
                // until it is done, then go out group by group.
                let mut groups = Vec::new();
                calibrate::quantize_calibrated(parts, cx, spec.seed, planned, c, true, &mut |g| {
                    groups.push(g);
                    Ok(())
                })?;
                let (refined, report) =
                    refine::refine(parts, planned, (cx.0, cx.1), c.windows(), refinement)?;
                tracing::info!(
                    "refined {} layers in {:.1} s: mean KL on the calibration windows {:.4e} -> {:.4e}",
                    refined.len(),
                    report.seconds,
                    report.kl_first,
                    report.kl_last
                );
                for group in groups {
                    let done = group
                        .into_iter()
                        .map(|l| {
                            refined
                                .iter()
                                .find(|r| r.name == l.name)
                                .cloned()
                                .unwrap_or(l)
                        })
                        .collect();
                    emit(done)?;
                }
                if !keep {
                    let float: Vec<Linear> = planned
                        .iter()
                        .flat_map(|g| g.members.iter().map(|p| p.linear.clone()))
                        .collect();
                    replace_layers(parts, &float);
                }
                Ok(())
            }
        },
        None => {
            for group in planned {
                let done = quantize_group(group, spec.seed, cx.0, cx.1);
                if keep {
                    replace_layers(parts, &done);
                }
                emit(done)?;
            }
            Ok(())
        }
    }
}

/// Puts `layers` in place of the layers of `parts` with their names.
pub(crate) fn replace_layers(parts: &mut Translated, layers: &[Linear]) {
    let mut replace = |l: &mut Linear| {
        if let Some(q) = layers.iter().find(|q| q.name == l.name) {
            *l = q.clone();
        }
    };
    for block in &mut parts.blocks {
        for group in block.linear_groups_mut() {
            group.into_iter().for_each(&mut replace);
        }
    }
    replace(&mut parts.embedding);
    replace(&mut parts.lm_head);
}

/// Replaces the selected linear layers of `parts` by quantized ones
/// (calibrated when `calibration` is given).
pub(crate) fn quantize_parts(
    parts: &mut Translated,
    cx: (&ThreadPool, Isa, ActPrecision),
    spec: &QuantSpec,
    calibration: Option<&Calibration>,
) -> Result<QuantReport> {
    let (planned, report) = plan(parts, spec)?;
    quantize_groups(
        parts,
        cx,
        spec,
        &planned,
        calibration,
        true,
        &mut |_| Ok(()),
    )?;
    Ok(report)
}

fn bytes_of_u16(v: &[u16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn sign_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().map(|&s| if s < 0.0 { 0xff } else { 1 }).collect()
}

/// Writes the weights of `parts` (unquantized, read from `store`),
/// quantized by `spec`, to `path` as one safetensors file (see
/// [`crate::Model::write_quantized`]).
pub(crate) fn write_quantized(
    parts: &mut Translated,
    store: &TensorStore,
    cx: (&ThreadPool, Isa, ActPrecision),
    (spec, calibration): (&QuantSpec, Option<&Calibration>),
    path: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<QuantReport> {
    let (planned, report) = plan(parts, spec)?;
    // A quantized layer replaces the matrix it was read from (rows a
    // translator regrouped are stored under the layer's own name).
    let replaced: HashSet<String> = planned
        .iter()
        .flat_map(|g| &g.members)
        .map(|p| format!("{}.weight", p.linear.source))
        .collect();
    let mut specs: Vec<TensorSpec> = Vec::new();
    let mut metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    for p in planned.iter().flat_map(|g| &g.members) {
        let info = p.info();
        specs.extend(info.tensor_specs(&p.linear.name));
        metadata.insert(p.linear.name.clone(), info.to_json());
    }
    metadata.insert(
        "hayate.quantization".into(),
        spec.config_section(&report.quantized, calibration)
            .to_string(),
    );
    let mut copied: Vec<&str> = store.names().filter(|n| !replaced.contains(*n)).collect();
    copied.sort_unstable();
    for name in &copied {
        let t = store.require(name)?;
        if t.dtype.size().is_none() {
            return Err(EngineError::Format(FormatError::BadTensor {
                name: name.to_string(),
                message: format!("cannot copy dtype {}", t.dtype.name()),
            }));
        }
        specs.push(TensorSpec {
            name: name.to_string(),
            dtype: t.dtype.clone(),
            shape: t.shape.clone(),
        });
    }
    let mut writer = SafetensorsWriter::create(path, specs, &metadata)?;
    let total = planned.iter().map(|g| g.members.len()).sum::<usize>();
    let mut done = 0;
    quantize_groups(
        parts,
        cx,
        spec,
        &planned,
        calibration,
        false,
        &mut |group| {
            for q in group {
                let LinearKernel::Quant(m, rot) = q.kernel() else {
                    unreachable!("just quantized")
                };
                assert_eq!(m.layout, QuantLayout::Rows, "files store rows");
                let name = &q.name;
                writer.write(&format!("{name}.qweight"), m.codes)?;
                writer.write(&format!("{name}.scales"), &bytes_of_u16(m.scales))?;
                if m.format == QuantFormat::Q4 {
                    writer.write(&format!("{name}.qzeros"), m.zeros)?;
                }
                if let Some(r) = rot {
                    writer.write(&format!("{name}.sign_in"), &sign_bytes(r.sign_in))?;
                    writer.write(&format!("{name}.sign_out"), &sign_bytes(r.sign_out))?;
                }
                done += 1;
                progress(done, total);
            }
            Ok(())
        },
    )?;
    for name in copied {
        writer.write(name, store.require(name)?.bytes())?;
    }
    writer.finish()?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_are_reproducible_balanced_and_keyed() {
        let a = signs(1, "x", 4096);
        assert_eq!(a, signs(1, "x", 4096));
        assert_ne!(a, signs(2, "x", 4096));
        assert_ne!(a, signs(1, "y", 4096));
        let positive = a.iter().filter(|&&s| s > 0.0).count();
        assert!((1800..2300).contains(&positive), "{positive}");
        assert!(a.iter().all(|&s| s == 1.0 || s == -1.0));
    }
}
