//! What a training step needs in memory, known before the first step: a probe runs the student's forward on
//! one and on two images of each crop size (evaluation mode: no drop-path draw, no BatchNorm statistic
//! and no other state of the run is touched) and counts the bytes its activations hold through
//! [`TensorAlloc`](crate::runtime::TensorAlloc); activations grow linearly with the images, so the two
//! probes give each resolution's bytes per image. [`StepMemory::peak`] adds what the step holds beside them.
//! The run warns before the first step when that will not fit in the memory the machine has available (a
//! process the kernel kills for memory says nothing).

use std::ops::Range;

use candle_core::Tensor;
use dino_core::IbotPatchLoss;

use crate::config::StudentPasses;
use crate::error::{Error, Result};
use crate::runtime::{allocated_bytes, gib};
use crate::trainer::Trainer;

/// One resolution group's activation bytes, as the probe measured them.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupBytes {
    /// The group's crops (indices into the step's crop list).
    pub crops: Range<usize>,
    /// Bytes per image: one more image in each of the group's crops.
    pub per_image: u64,
    /// Bytes that do not grow with the images (one image's measurement less `per_image`).
    pub fixed: u64,
}

impl GroupBytes {
    /// The group's activation bytes at `batch` images per crop, all its crops in one pass.
    pub fn at(&self, batch: usize) -> u64 {
        self.fixed + self.per_image * batch as u64
    }
}

/// A step's memory, from the probe: the bytes held before it and each resolution's activations.
#[derive(Debug, Clone, PartialEq)]
pub struct StepMemory {
    /// Bytes this process held through the allocator when probed, before the data loader started (student,
    /// teacher, optimiser state, the evaluation's datasets).
    pub held: u64,
    /// Bytes of the trainable parameters: one set of gradients.
    pub params: u64,
    /// The resolution groups, in crop order (2 global crops, then the local crops).
    pub groups: Vec<GroupBytes>,
    /// Whether the global crops go through the student with iBOT's masked patch tokens (they then stay in
    /// one pass, as the step runs them).
    pub ibot: bool,
    /// Bytes of one image's crops (all of them, f32): the data loader holds `prefetch_batches` batches and
    /// the step one more.
    pub crops_per_image: u64,
    /// Batches the data loader and the step hold at once (`prefetch_batches` + 1).
    pub batches_held: u64,
}

/// Headroom on the probed activations for what a step holds beside them while it runs backward (the
/// gradients of the layer at hand, the loss's buffers, drop path's masks). With it, [`StepMemory::peak`] was
/// 0.93-1.26x the bytes a step's peak held, over ViT-Tiny at 32 and 224 px, ViT-Small at 224 px, iBOT,
/// ResNet-18 and ResNet-50, in every student-pass mode (34th session, docs/PERFORMANCE-LOG.md).
pub const BACKWARD_HEADROOM: f64 = 1.1;

impl StepMemory {
    /// Probes `trainer`'s student on crops of its configured sizes, two images each. `None` where the count
    /// is not kept: another device than the CPU, or a process whose global allocator is not
    /// [`TensorAlloc`](crate::runtime::TensorAlloc). Run it while no other thread allocates (before the
    /// data loader starts): the count is the process's.
    pub fn probe(trainer: &Trainer) -> Result<Option<Self>> {
        let cfg = &trainer.cfg;
        let Some((_, first)) = trainer.params.first() else {
            return Ok(None);
        };
        let dev = first.device();
        if !dev.is_cpu() || allocated_bytes().is_none() {
            return Ok(None);
        }
        // Two images of each crop size (the step benchmark's pattern; only the shapes matter).
        let crops = crate::bench::pattern_crops(
            &crate::TrainConfig {
                batch_size: 2,
                ..cfg.clone()
            },
            dev,
        )?;
        let groups = dino_models::multicrop::resolution_groups(&crops)?;
        // The student's forward on `k` images of each of a group's crops; iBOT's forward for the global ones.
        let forward = |g: &Range<usize>, k: usize| {
            let ibot = trainer.ibot.as_ref().filter(|_| g.start == 0);
            Self::forward(trainer, &crops[g.clone()], ibot, k)
        };
        // The first forward at a shape grows thread-local scratch (gemm's packing buffers) that stays: run
        // each group once before counting.
        for g in &groups {
            drop(forward(g, 2)?);
        }
        let held = allocated_bytes().unwrap_or(0) as u64;
        let mut out = Vec::with_capacity(groups.len());
        for g in groups {
            let mut bytes = [0u64; 2];
            for (slot, k) in bytes.iter_mut().zip([1usize, 2]) {
                let before = allocated_bytes().unwrap_or(0);
                let held_out = forward(&g, k)?;
                *slot = allocated_bytes().unwrap_or(0).saturating_sub(before) as u64;
                drop(held_out);
            }
            let per_image = bytes[1].saturating_sub(bytes[0]);
            out.push(GroupBytes {
                crops: g,
                per_image,
                fixed: bytes[0].saturating_sub(per_image),
            });
        }
        let params = trainer
            .params
            .iter()
            .map(|(_, v)| (v.elem_count() * v.dtype().size_in_bytes()) as u64)
            .sum();
        let pixels =
            2 * cfg.global_crops_size.pow(2) + cfg.local_crops_number * cfg.local_crops_size.pow(2);
        Ok(Some(Self {
            held,
            params,
            groups: out,
            ibot: trainer.ibot.is_some(),
            crops_per_image: (3 * 4 * pixels) as u64,
            batches_held: cfg.prefetch_batches as u64 + 1,
        }))
    }

    /// The student's forward on the first `k` images of each of `crops`, its outputs returned (they hold
    /// the activations); with the iBOT `loss`, iBOT's forward with the expected share of each global crop's
    /// patches masked, and the masked-patch loss.
    fn forward(
        trainer: &Trainer,
        crops: &[Tensor],
        ibot: Option<&IbotPatchLoss>,
        k: usize,
    ) -> Result<Vec<Tensor>> {
        let sub = crops
            .iter()
            .map(|c| c.narrow(0, 0, k))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let student = &trainer.student.model;
        let cfg = &trainer.cfg;
        dino_models::with_matmul_precision(cfg.matmul_precision, || {
            let Some(loss) = ibot else {
                return Ok(vec![student.forward(&sub, false)?]);
            };
            // The masked crops' share times their mean mask ratio.
            let r = cfg.ibot_mask_ratio_min_max;
            let masked_fraction = cfg.ibot_mask_sample_probability * (r[0] + r[1]) / 2.0;
            let (rows, _, h, w) = sub[0].dims4()?;
            let n = (h / cfg.patch_size) * (w / cfg.patch_size);
            let q = ((masked_fraction * n as f64).round() as usize).min(n);
            let dev = sub[0].device();
            let mask: Vec<u8> = (0..2 * rows)
                .flat_map(|_| (0..n).map(move |i| u8::from(i < q)))
                .collect();
            let idx: Vec<u32> = (0..2 * rows)
                .flat_map(|c| (0..q).map(move |i| (c * n + i) as u32))
                .collect();
            let m = idx.len();
            let mask = Tensor::from_vec(mask, (2 * rows, n), dev)?;
            let idx = Tensor::from_vec(idx, m, dev)?;
            let (f, o, pt) = student.forward_ibot(&sub, Some(&mask), &idx, false)?;
            // The masked-patch loss keeps its own f64 buffers of the patch logits for the backward pass:
            // run it on uniform targets.
            let k = cfg.out_dim;
            let targets = Tensor::full(1.0 / k as f32, (m, k), dev)?;
            let weights = Tensor::full(1.0 / q.max(1) as f32, m, dev)?;
            let l = loss.forward_masked(&pt, &targets, &weights, 2 * rows)?;
            Ok::<_, Error>(vec![f, o, pt, l])
        })
    }

    /// The activation bytes of each pass of `passes` (resolved) at `batch` images per crop.
    fn pass_bytes(&self, passes: StudentPasses, batch: usize) -> Vec<u64> {
        match passes {
            StudentPasses::All | StudentPasses::Auto => {
                vec![self.groups.iter().map(|g| g.at(batch)).sum()]
            }
            StudentPasses::Resolution => self.groups.iter().map(|g| g.at(batch)).collect(),
            StudentPasses::Crop => self
                .groups
                .iter()
                .flat_map(|g| {
                    // A crop is its group's share; with iBOT the 2 global crops are one pass.
                    let len = g.crops.len().max(1);
                    let share = g.at(batch) / len as u64;
                    let together = if self.ibot && g.crops.start == 0 {
                        len.min(2)
                    } else {
                        1
                    };
                    std::iter::once(share * together as u64)
                        .chain(std::iter::repeat_n(share, len - together))
                })
                .collect(),
        }
    }

    /// The student's activation bytes of the largest pass of `passes` at `batch` images per crop.
    pub fn activations(&self, passes: StudentPasses, batch: usize) -> u64 {
        self.pass_bytes(passes, batch)
            .into_iter()
            .max()
            .unwrap_or(0)
    }

    /// The bytes this process will hold at the peak of a step in `passes` (resolved) at `batch` images per
    /// crop: what it held when probed, the batches in flight, two parameter-sized sets (the gradients, and
    /// what the optimiser and the clip allocate beside them; four with several passes, whose gradients are
    /// summed while the next pass's are made) and the largest pass's activations with
    /// [`BACKWARD_HEADROOM`].
    pub fn peak(&self, passes: StudentPasses, batch: usize) -> u64 {
        let several = self.pass_bytes(passes, batch).len() > 1;
        let grads = self.params * if several { 4 } else { 2 };
        let batches = self.batches_held * self.crops_per_image * batch as u64;
        self.held
            + batches
            + grads
            + (self.activations(passes, batch) as f64 * BACKWARD_HEADROOM) as u64
    }

    /// The resident bytes a step in `passes` (resolved) at `batch` images per crop will add to this process:
    /// its peak over what the process holds now, times [`RESIDENT_PER_BYTE`].
    pub fn resident_growth(&self, passes: StudentPasses, batch: usize) -> u64 {
        let more = self.peak(passes, batch).saturating_sub(self.held);
        (more as f64 * RESIDENT_PER_BYTE) as u64
    }

    /// The largest images per crop whose [`resident_growth`](Self::resident_growth) in `passes` stays within
    /// `budget` bytes; 0 if none.
    pub fn largest_batch(&self, passes: StudentPasses, budget: u64) -> usize {
        // The growth rises with the batch: a doubling search, then bisection.
        let fits = |b: usize| self.resident_growth(passes, b) <= budget;
        if !fits(1) {
            return 0;
        }
        let mut hi = 2usize;
        while fits(hi) && hi < 1 << 20 {
            hi *= 2;
        }
        let mut lo = hi / 2;
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    }
}

/// Resident bytes a process gains for each byte its allocator adds at a step's peak: freed activations of
/// one size leave holes that blocks of another size do not fill (glibc's heap, never trimmed, see
/// [`tune_allocator`](crate::runtime::tune_allocator)). Measured over the cases of [`BACKWARD_HEADROOM`] and
/// ResNet-50: peak RSS growth over peak allocated growth 0.92-1.46 (34th session; the ResNets' convolution
/// buffers spread it most, see [`WARN_ABOVE`]).
pub const RESIDENT_PER_BYTE: f64 = 1.25;

/// The share of the available memory above which an estimated step is warned about: the resident estimate
/// was 0.77-1.31x the measured peak (34th session: ViT-Small per crop 0.94, ResNet-18 at batch 32 0.77), so a
/// step estimated at 85% of what is free may well not fit.
pub const WARN_ABOVE: f64 = 0.85;

/// A warning when a step in `passes` (resolved) at `batch` images per crop will not fit: `ranks` processes
/// like this one on this machine, each growing by its [`StepMemory::resident_growth`], against `available`
/// bytes (`MemAvailable`), above [`WARN_ABOVE`] of it. Names the `smaller` student passes the run allows
/// ([`TrainConfig::smaller_student_passes`](crate::TrainConfig::smaller_student_passes)) and the largest
/// batch estimated within that share. `None` when it fits.
pub fn shortage_warning(
    mem: &StepMemory,
    passes: StudentPasses,
    smaller: &[StudentPasses],
    batch: usize,
    ranks: usize,
    available: u64,
) -> Option<String> {
    let ranks = ranks.max(1) as u64;
    let need = |p: StudentPasses, b: usize| mem.resident_growth(p, b).saturating_mul(ranks);
    if (need(passes, batch) as f64) <= WARN_ABOVE * available as f64 {
        return None;
    }
    let mut options: Vec<String> = smaller
        .iter()
        .map(|&p| format!("--student-passes {p} about {:.1} GiB", gib(need(p, batch))))
        .collect();
    // Within the share that is not warned about.
    let fit = mem.largest_batch(
        passes,
        (WARN_ABOVE * available as f64 / ranks as f64) as u64,
    );
    if fit > 0 && fit < batch {
        options.push(format!(
            "--batch-size-per-gpu {fit} about {:.1} GiB",
            gib(need(passes, fit))
        ));
    }
    Some(format!(
        "warning: a training step will need about {:.1} GiB more memory{} (estimated: {:.1} GiB of the \
         student's activations per process at {batch} images per crop in {}) and this machine \
         has {:.1} GiB available: the kernel may kill the run in its first step{}",
        gib(need(passes, batch)),
        if ranks > 1 {
            format!(" for its {ranks} processes on this machine")
        } else {
            String::new()
        },
        gib(mem.activations(passes, batch)),
        match passes {
            StudentPasses::Resolution => "per-resolution passes",
            StudentPasses::Crop => "per-crop passes",
            StudentPasses::All | StudentPasses::Auto => "one pass",
        },
        gib(available),
        if options.is_empty() {
            String::new()
        } else {
            format!(". Less: {}", options.join(", "))
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    /// 1 GiB held, 100 MiB of parameters; the 2 global crops 100 MiB per image together, 8 local crops
    /// 50 MiB per image together.
    fn mem(ibot: bool) -> StepMemory {
        StepMemory {
            held: GIB,
            params: 100 * MIB,
            groups: vec![
                GroupBytes {
                    crops: 0..2,
                    per_image: 100 * MIB,
                    fixed: 0,
                },
                GroupBytes {
                    crops: 2..10,
                    per_image: 50 * MIB,
                    fixed: 0,
                },
            ],
            ibot,
            crops_per_image: 0,
            batches_held: 3,
        }
    }

    #[test]
    fn passes_take_their_largest_pass_and_the_gradients_they_hold() {
        let m = mem(false);
        assert_eq!(m.activations(StudentPasses::All, 64), 150 * 64 * MIB);
        assert_eq!(m.activations(StudentPasses::Resolution, 64), 100 * 64 * MIB);
        // One global crop (half its group), not one local crop (an eighth of its group).
        assert_eq!(m.activations(StudentPasses::Crop, 64), 50 * 64 * MIB);
        // iBOT keeps the 2 global crops in one pass.
        assert_eq!(
            mem(true).activations(StudentPasses::Crop, 64),
            100 * 64 * MIB
        );
        assert_eq!(m.pass_bytes(StudentPasses::Crop, 64).len(), 10);
        assert_eq!(mem(true).pass_bytes(StudentPasses::Crop, 64).len(), 9);
        // Global and local crops of one size are one group: per crop with iBOT, the first 2 stay together.
        let one_size = StepMemory {
            groups: vec![GroupBytes {
                crops: 0..6,
                per_image: 60 * MIB,
                fixed: 0,
            }],
            ..mem(true)
        };
        assert_eq!(
            one_size.pass_bytes(StudentPasses::Crop, 1),
            [20, 10, 10, 10, 10].map(|b| b * MIB)
        );
        let headroom = |b: u64| (b as f64 * BACKWARD_HEADROOM) as u64;
        // One pass: held + 2 sets of gradients; several: 4.
        assert_eq!(
            m.peak(StudentPasses::All, 64),
            GIB + 200 * MIB + headroom(150 * 64 * MIB)
        );
        assert_eq!(
            m.peak(StudentPasses::Resolution, 64),
            GIB + 400 * MIB + headroom(100 * 64 * MIB)
        );
        // The loader's 2 prefetched batches and the step's, at 1 MiB of crops per image.
        let with_batches = StepMemory {
            crops_per_image: MIB,
            ..mem(false)
        };
        assert_eq!(
            with_batches.peak(StudentPasses::All, 64) - m.peak(StudentPasses::All, 64),
            3 * 64 * MIB
        );
    }

    #[test]
    fn a_step_that_does_not_fit_is_named_with_what_would() {
        let m = mem(false);
        // What each run allows below its passes (`TrainConfig::smaller_student_passes`).
        let cfg = |arch: &str, passes, use_bn_in_head| crate::TrainConfig {
            arch: arch.into(),
            student_passes: passes,
            use_bn_in_head,
            ..crate::TrainConfig::official()
        };
        let vit = cfg("vit_small", StudentPasses::Resolution, false).smaller_student_passes();
        let resnet_res = cfg("resnet18", StudentPasses::Resolution, false).smaller_student_passes();
        let resnet_all = cfg("resnet18", StudentPasses::All, false).smaller_student_passes();
        // With the head's BatchNorm a run has one pass only: no smaller passes are offered.
        let bn = cfg("vit_small", StudentPasses::Auto, true).smaller_student_passes();
        let w = shortage_warning(&m, StudentPasses::All, bn, 64, 1, 8 * GIB).unwrap();
        assert!(!w.contains("--student-passes"), "{w}");
        let growth = |p, b| m.resident_growth(p, b);
        // Per resolution at 64 images: (0.4 GiB + 1.1 x 6.25 GiB) x 1.25, about 9.09 GiB.
        let need = growth(StudentPasses::Resolution, 64);
        assert!((9.0..9.2).contains(&gib(need)), "{}", gib(need));
        let roomy = (need as f64 / WARN_ABOVE) as u64 + 1;
        assert_eq!(
            shortage_warning(&m, StudentPasses::Resolution, vit, 64, 1, roomy),
            None
        );
        // Within the estimate's error of the available memory: warned.
        assert!(shortage_warning(&m, StudentPasses::Resolution, vit, 64, 1, need).is_some());
        let w = shortage_warning(&m, StudentPasses::Resolution, vit, 64, 1, 8 * GIB).unwrap();
        assert!(w.contains("about 9.1 GiB more memory"), "{w}");
        assert!(w.contains("6.2 GiB of the student's activations"), "{w}");
        assert!(w.contains("per-resolution passes"), "{w}");
        assert!(w.contains("8.0 GiB available"), "{w}");
        // Per crop: (0.4 + 1.1 x 3.125) x 1.25 = 4.8 GiB.
        assert!(w.contains("--student-passes crop about 4.8 GiB"), "{w}");
        // The largest batch within 8 GiB: (0.39 + 1.1 x 0.09766 b) x 1.25 <= 8 -> b <= 55.9; the one offered
        // stays within WARN_ABOVE of it: (0.39 + 1.1 x 0.09766 b) x 1.25 <= 6.8 -> b <= 47.0.
        let fit = m.largest_batch(StudentPasses::Resolution, 8 * GIB);
        assert_eq!(fit, 55);
        assert!(growth(StudentPasses::Resolution, fit) <= 8 * GIB);
        assert!(growth(StudentPasses::Resolution, fit + 1) > 8 * GIB);
        let budget = (WARN_ABOVE * (8 * GIB) as f64) as u64;
        let offered = m.largest_batch(StudentPasses::Resolution, budget);
        assert!((46..=47).contains(&offered), "{offered}");
        assert!(growth(StudentPasses::Resolution, offered) <= budget);
        assert!(growth(StudentPasses::Resolution, offered + 1) > budget);
        let offer = format!("--batch-size-per-gpu {offered} about");
        assert!(w.contains(&offer), "{w}");
        // A ResNet has no per-crop passes to offer; one pass offers per resolution.
        let w =
            shortage_warning(&m, StudentPasses::Resolution, resnet_res, 64, 1, 8 * GIB).unwrap();
        assert!(!w.contains("--student-passes"), "{w}");
        let w = shortage_warning(&m, StudentPasses::All, resnet_all, 64, 1, 8 * GIB).unwrap();
        assert!(w.contains("--student-passes resolution"), "{w}");
        assert!(w.contains("in one pass"), "{w}");
        // Two processes on the machine need twice as much; each gets half the memory.
        let w = shortage_warning(&m, StudentPasses::Resolution, vit, 64, 2, 16 * GIB).unwrap();
        assert!(
            w.contains("about 18.2 GiB more memory for its 2 processes"),
            "{w}"
        );
        assert!(w.contains(&offer), "{w}");
        // Nothing fits: no batch is offered.
        let w = shortage_warning(&m, StudentPasses::Crop, &[], 64, 1, 100 * MIB).unwrap();
        assert!(!w.contains("Less:"), "{w}");
    }

    /// Without `TensorAlloc` as the global allocator (this test binary) nothing is counted: no probe.
    #[test]
    fn no_probe_without_the_counting_allocator() {
        let cfg = crate::TrainConfig {
            arch: "vit_custom".into(),
            patch_size: 4,
            img_size: 8,
            vit_embed_dim: 16,
            vit_depth: 1,
            vit_num_heads: 2,
            out_dim: 32,
            head_hidden_dim: 16,
            head_bottleneck_dim: 8,
            batch_size: 2,
            local_crops_number: 1,
            global_crops_size: 8,
            local_crops_size: 4,
            ..crate::TrainConfig::default()
        };
        let t = Trainer::new(&cfg, 1, &candle_core::Device::Cpu).unwrap();
        assert_eq!(StepMemory::probe(&t).unwrap(), None);
    }
}
