//! The iBOT masks' derived quantities against the official collate (`shared/golden-dinov2/ibot_loss`): from the
//! 8 official masks of 8x8 patches, the masked-token indices (`mask_indices_list`), their weights
//! (`masks_weight`) and the count; and the official mask-count rules on the same layout.

use candle_core::{DType, Device};
use dino_data::masking::{MaskingGenerator, PatchMasks};
use rand::SeedableRng;

const GOLDEN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/golden-dinov2/ibot_loss.safetensors"
);

#[test]
fn indices_and_weights_match_the_official_collate() {
    let g = candle_core::safetensors::load(GOLDEN, &Device::Cpu).unwrap();
    let masks = g["masks_u8"].to_dtype(DType::U32).unwrap();
    let (c, n) = masks.dims2().unwrap();
    let flat: Vec<bool> = masks
        .flatten_all()
        .unwrap()
        .to_vec1::<u32>()
        .unwrap()
        .iter()
        .map(|&v| v != 0)
        .collect();
    let pm = PatchMasks::new(flat, c, n).unwrap();
    let idx: Vec<i64> = g["mask_indices_list"].to_vec1().unwrap();
    assert_eq!(
        pm.indices().iter().map(|&i| i as i64).collect::<Vec<_>>(),
        idx
    );
    let w: Vec<f32> = g["masks_weight"].to_vec1().unwrap();
    assert_eq!(pm.weights(), w);
    let count: Vec<i64> = g["n_masked_patches"].to_vec1().unwrap();
    assert_eq!(pm.n_masked() as i64, count[0]);
    // The official draw masked 4 of the 8 crops (10, 20, 30, 14 patches): within our draw's rules too
    // (at most int(8 * 0.5) crops, at most half of the 64 patches each).
    let per: Vec<usize> = pm
        .masks
        .chunks(n)
        .map(|m| m.iter().filter(|&&v| v).count())
        .collect();
    assert_eq!(per, vec![10, 20, 0, 30, 0, 0, 0, 14]);
    let gen = MaskingGenerator::new(8, 8);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3000);
    let ours = PatchMasks::draw(&gen, 8, (0.1, 0.5), 0.5, &mut rng);
    let ours_per: Vec<usize> = ours
        .masks
        .chunks(n)
        .map(|m| m.iter().filter(|&&v| v).count())
        .collect();
    assert_eq!(
        ours_per.iter().filter(|&&k| k == 0).count(),
        4,
        "{ours_per:?}"
    );
    assert!(ours_per.iter().all(|&k| k <= 32), "{ours_per:?}");
}
