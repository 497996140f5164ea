//! The patch masks of iBOT (DINOv2): `dinov2.data.masking.MaskingGenerator`'s random rectangular blocks, and
//! the masks `dinov2.data.collate.collate_data_and_cast` gives a batch of global crops (a fraction of the
//! crops masked, with ratios spread evenly over a range, shuffled), with the masked-token indices and
//! weights the loss needs. The draws follow the official algorithm with this crate's RNG, not Python's
//! `random`, so the masks are not the official ones bit for bit.

use rand::seq::SliceRandom;
use rand::Rng;

use crate::error::{Error, Result};

/// Random rectangular blocks of patches (the official `MaskingGenerator`): each block covers between
/// `min_num_patches` and the patches still wanted, with an aspect ratio log-uniform in
/// `[min_aspect, 1 / min_aspect]`, and adds at least one new patch.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskingGenerator {
    /// Rows of the patch grid.
    pub height: usize,
    /// Columns of the patch grid.
    pub width: usize,
    /// Smallest block area tried (official default 4).
    pub min_num_patches: usize,
    /// Most patches one block may add (dinov2's train.py: half the grid).
    pub max_num_patches: usize,
    /// log of the aspect-ratio range (official: 0.3 .. 1/0.3).
    log_aspect_ratio: (f64, f64),
}

impl MaskingGenerator {
    /// dinov2's generator for a `height x width` grid: blocks of at least 4 patches, at most half the
    /// grid, aspect ratios 0.3 .. 3.33.
    pub fn new(height: usize, width: usize) -> Self {
        let min_aspect: f64 = 0.3;
        Self {
            height,
            width,
            min_num_patches: 4,
            max_num_patches: height * width / 2,
            log_aspect_ratio: (min_aspect.ln(), (1.0 / min_aspect).ln()),
        }
    }

    /// Patches of the grid.
    pub fn num_patches(&self) -> usize {
        self.height * self.width
    }

    /// One block (`_mask`): up to 10 tries; returns how many patches it newly masked.
    fn block(&self, mask: &mut [bool], max_mask_patches: usize, rng: &mut impl Rng) -> usize {
        let mut delta = 0;
        for _ in 0..10 {
            let (lo, hi) = (self.min_num_patches as f64, max_mask_patches as f64);
            let target_area = lo + (hi - lo) * rng.random::<f64>();
            let (a0, a1) = self.log_aspect_ratio;
            let aspect = (a0 + (a1 - a0) * rng.random::<f64>()).exp();
            // Python's round() rounds halves to even.
            let h = (target_area * aspect).sqrt().round_ties_even() as usize;
            let w = (target_area / aspect).sqrt().round_ties_even() as usize;
            if w < self.width && h < self.height {
                let top = rng.random_range(0..=self.height - h);
                let left = rng.random_range(0..=self.width - w);
                let idx = |i: usize, j: usize| i * self.width + j;
                let masked = (top..top + h)
                    .flat_map(|i| (left..left + w).map(move |j| (i, j)))
                    .filter(|&(i, j)| mask[idx(i, j)])
                    .count();
                let new = h * w - masked;
                if new > 0 && new <= max_mask_patches {
                    for i in top..top + h {
                        for j in left..left + w {
                            if !mask[idx(i, j)] {
                                mask[idx(i, j)] = true;
                                delta += 1;
                            }
                        }
                    }
                }
                if delta > 0 {
                    break;
                }
            }
        }
        delta
    }

    /// A mask of about `num_masking_patches` patches (row-major over the grid, `true` = masked): blocks
    /// are added until the count is reached or a block adds nothing.
    pub fn generate(&self, num_masking_patches: usize, rng: &mut impl Rng) -> Vec<bool> {
        let mut mask = vec![false; self.num_patches()];
        let mut count = 0;
        while count < num_masking_patches {
            let max_mask = (num_masking_patches - count).min(self.max_num_patches);
            let delta = self.block(&mut mask, max_mask, rng);
            if delta == 0 {
                break;
            }
            count += delta;
        }
        mask
    }
}

/// The masks of a batch of global crops, `masks[c * n_tokens + i]` for patch `i` of crop `c`.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchMasks {
    /// Crops x tokens, row-major, `true` = masked.
    pub masks: Vec<bool>,
    /// Number of crops.
    pub n_crops: usize,
    /// Patches per crop.
    pub n_tokens: usize,
}

impl PatchMasks {
    /// Wrap given masks (`n_crops * n_tokens` values).
    pub fn new(masks: Vec<bool>, n_crops: usize, n_tokens: usize) -> Result<Self> {
        if masks.len() != n_crops * n_tokens {
            return Err(Error::InvalidArgument(format!(
                "patch masks: {} values for {n_crops} crops of {n_tokens} patches",
                masks.len()
            )));
        }
        Ok(Self {
            masks,
            n_crops,
            n_tokens,
        })
    }

    /// The official collate's masks for `n_crops` crops: `int(n_crops * probability)` of them get a mask,
    /// crop `i` of those `int(N * U(r_i, r_{i+1}))` patches with `r = linspace(min_ratio, max_ratio, m + 1)`,
    /// the others none; the list is then shuffled.
    pub fn draw(
        generator: &MaskingGenerator,
        n_crops: usize,
        (min_ratio, max_ratio): (f64, f64),
        probability: f64,
        rng: &mut impl Rng,
    ) -> Self {
        let n = generator.num_patches();
        let m = (n_crops as f64 * probability) as usize;
        let r = |i: usize| min_ratio + (max_ratio - min_ratio) * i as f64 / m.max(1) as f64;
        let mut list: Vec<Vec<bool>> = (0..n_crops)
            .map(|i| {
                if i < m {
                    let u = r(i) + (r(i + 1) - r(i)) * rng.random::<f64>();
                    generator.generate((n as f64 * u) as usize, rng)
                } else {
                    vec![false; n]
                }
            })
            .collect();
        list.shuffle(rng);
        Self {
            masks: list.concat(),
            n_crops,
            n_tokens: n,
        }
    }

    /// The masks of the crops `rows`, in that order.
    pub fn select(&self, rows: &[usize]) -> Self {
        let n = self.n_tokens;
        Self {
            masks: rows
                .iter()
                .flat_map(|&c| self.masks[c * n..(c + 1) * n].iter().copied())
                .collect(),
            n_crops: rows.len(),
            n_tokens: n,
        }
    }

    /// Number of masked patches.
    pub fn n_masked(&self) -> usize {
        self.masks.iter().filter(|&&m| m).count()
    }

    /// `mask_indices_list`: the flat indices `c * n_tokens + i` of the masked patches, in order.
    pub fn indices(&self) -> Vec<u32> {
        self.masks
            .iter()
            .enumerate()
            .filter(|(_, &m)| m)
            .map(|(i, _)| i as u32)
            .collect()
    }

    /// `masks_weight`: for each masked patch (in [`indices`](Self::indices) order), 1 / the number of masked
    /// patches of its crop.
    pub fn weights(&self) -> Vec<f32> {
        self.masks
            .chunks(self.n_tokens.max(1))
            .flat_map(|crop| {
                let k = crop.iter().filter(|&&m| m).count();
                std::iter::repeat_n(1.0 / k.max(1) as f32, k)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn blocks_are_rectangles_within_the_count() {
        let g = MaskingGenerator::new(8, 8);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for want in [0usize, 4, 10, 20, 32] {
            for _ in 0..50 {
                let m = g.generate(want, &mut rng);
                let k = m.iter().filter(|&&v| v).count();
                // Each block adds at most the patches still wanted (capped at half the grid).
                assert!(k <= want, "{k} > {want}");
                if want == 0 {
                    assert_eq!(k, 0);
                }
            }
        }
        // A single block is a filled rectangle.
        for _ in 0..50 {
            let mut m = vec![false; 64];
            let d = g.block(&mut m, 16, &mut rng);
            let cells: Vec<(usize, usize)> =
                (0..64).filter(|&i| m[i]).map(|i| (i / 8, i % 8)).collect();
            assert_eq!(cells.len(), d);
            if d > 0 {
                let (r0, r1) = (
                    cells.iter().map(|c| c.0).min().unwrap(),
                    cells.iter().map(|c| c.0).max().unwrap(),
                );
                let (c0, c1) = (
                    cells.iter().map(|c| c.1).min().unwrap(),
                    cells.iter().map(|c| c.1).max().unwrap(),
                );
                assert_eq!((r1 - r0 + 1) * (c1 - c0 + 1), d, "{cells:?}");
                assert!((1..=16).contains(&d));
            }
        }
    }

    #[test]
    fn half_the_crops_are_masked_with_spread_ratios() {
        let g = MaskingGenerator::new(8, 8);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut masked_crops = 0;
        let mut total = 0;
        for _ in 0..200 {
            let pm = PatchMasks::draw(&g, 8, (0.1, 0.5), 0.5, &mut rng);
            assert_eq!(pm.masks.len(), 8 * 64);
            let per: Vec<usize> = pm
                .masks
                .chunks(64)
                .map(|c| c.iter().filter(|&&v| v).count())
                .collect();
            // At most int(8 * 0.5) = 4 crops have a mask; each at most int(64 * 0.5) patches.
            assert!(per.iter().filter(|&&k| k > 0).count() <= 4, "{per:?}");
            assert!(per.iter().all(|&k| k <= 32), "{per:?}");
            masked_crops += per.iter().filter(|&&k| k > 0).count();
            total += per.iter().sum::<usize>();
        }
        // Nearly every drawn mask gets patches, about 0.3 * 64 on average over the masked crops.
        assert!(masked_crops >= 780, "{masked_crops}");
        let mean = total as f64 / masked_crops as f64;
        assert!((14.0..=22.0).contains(&mean), "{mean}");
    }

    #[test]
    fn indices_and_weights_follow_the_collate() {
        // 3 crops of 4 patches: 2, 0 and 1 masked.
        let pm = PatchMasks::new(
            vec![
                true, false, true, false, false, false, false, false, false, false, false, true,
            ],
            3,
            4,
        )
        .unwrap();
        assert_eq!(pm.indices(), vec![0, 2, 11]);
        assert_eq!(pm.weights(), vec![0.5, 0.5, 1.0]);
        assert_eq!(pm.n_masked(), 3);
        let s = pm.select(&[2, 0]);
        assert_eq!(s.indices(), vec![3, 4, 6]);
        assert!(PatchMasks::new(vec![true; 5], 2, 3).is_err());
    }
}
