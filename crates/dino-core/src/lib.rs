//! dino-core: the DINO self-distillation objective for any candle model (Caron et al. 2021, the
//! official facebookresearch/dino code): the loss with centring and sharpening, the EMA teacher,
//! the schedules, the optimiser pieces of the official loop, weighted k-NN evaluation and collapse
//! monitors. It depends on candle only: no images, files or CLI.
//!
//! | module | official counterpart |
//! |---|---|
//! | [`loss`] | `main_dino.DINOLoss` |
//! | [`schedule`] | `utils.cosine_scheduler`, the teacher-temperature schedule |
//! | [`ema`] | the teacher EMA in `train_one_epoch` |
//! | [`optim`] | `utils.get_params_groups` ([`params`]), `torch.optim.AdamW`/`SGD`, `utils.LARS`, `utils.clip_gradients`, `utils.cancel_gradients_last_layer` |
//! | [`knn`] | `eval_knn.knn_classifier` |
//! | [`collective`] | `torch.distributed` (all-reduce, broadcast) behind one trait; `Local` for one process |
//! | [`monitor`] | (new) entropy / KL / std collapse indicators |
//!
//! # Adding DINO to your own candle model
//!
//! The student and the teacher are two instances of your model on two `VarMap`s (separate storage),
//! the teacher starting as a copy of the student. Each iteration, exactly as `train_one_epoch`:
//! schedules -> teacher forward on the 2 global crops -> student forward on all crops -> loss (the
//! centre is updated inside) -> backward -> per-parameter clipping -> last-layer freeze -> AdamW ->
//! EMA teacher update.
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{linear, Linear, VarBuilder, VarMap};
//! use dino_core::{
//!     cancel_gradients_last_layer, clip_gradients, cosine_scheduler, get_params_groups, sorted_vars,
//!     AdamW, DinoLoss, DinoLossConfig, EmaTeacher, ParamGroup,
//! };
//!
//! # fn main() -> dino_core::Result<()> {
//! let dev = Device::Cpu;
//! const DIM: usize = 8;
//! const OUT_DIM: usize = 32;
//! let (batch, ncrops, epochs, niter) = (4, 4, 2, 3);
//!
//! // Your model: a tiny "backbone" and a head whose last layer is frozen in epoch 0.
//! struct Net(Linear, Linear);
//! impl Net {
//!     fn new(vm: &VarMap, dev: &Device) -> candle_core::Result<Self> {
//!         let vb = VarBuilder::from_varmap(vm, DType::F32, dev);
//!         Ok(Net(linear(DIM, 16, vb.pp("backbone"))?, linear(16, OUT_DIM, vb.pp("head.last_layer"))?))
//!     }
//!     fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
//!         self.1.forward(&self.0.forward(x)?.gelu_erf()?)
//!     }
//! }
//! let (student_vm, teacher_vm) = (VarMap::new(), VarMap::new());
//! let student = Net::new(&student_vm, &dev)?;
//! let teacher = Net::new(&teacher_vm, &dev)?;
//! let student_params = sorted_vars(&student_vm);
//! let teacher_params = sorted_vars(&teacher_vm);
//! for ((_, t), (_, s)) in teacher_params.iter().zip(&student_params) {
//!     t.set(s.as_tensor())?; // the teacher starts as a copy of the student
//! }
//!
//! let mut dino_loss = DinoLoss::new(DinoLossConfig::new(OUT_DIM, ncrops, 0.04, 0.04, 0, epochs), &dev)?;
//! let (regularized, not_regularized) = get_params_groups(&student_params);
//! let mut optimizer = AdamW::new(vec![ParamGroup::new(regularized), ParamGroup::new(not_regularized)])?;
//! let ema = EmaTeacher::new(&student_params, &teacher_params)?;
//! let lr_schedule = cosine_scheduler(5e-4 * batch as f64 / 256.0, 1e-6, epochs, niter, 1, 0.0);
//! let wd_schedule = cosine_scheduler(0.04, 0.4, epochs, niter, 0, 0.0);
//! let momentum_schedule = cosine_scheduler(0.996, 1.0, epochs, niter, 0, 0.0);
//!
//! for epoch in 0..epochs {
//!     for it in 0..niter {
//!         let i = epoch * niter + it; // global iteration
//!         optimizer.set_lr(0, lr_schedule[i])?;
//!         optimizer.set_lr(1, lr_schedule[i])?;
//!         optimizer.set_weight_decay(0, wd_schedule[i])?;
//!         // n crops of the same batch (your augmentations), 2 global crops first, crop-major.
//!         let crops = (0..ncrops)
//!             .map(|_| Tensor::randn(0f32, 1.0, (batch, DIM), &dev))
//!             .collect::<candle_core::Result<Vec<_>>>()?;
//!         let teacher_output = teacher.forward(&Tensor::cat(&crops[..2], 0)?)?.detach();
//!         let student_output = student.forward(&Tensor::cat(&crops, 0)?)?;
//!         let loss = dino_loss.forward(&student_output, &teacher_output, epoch)?;
//!         let mut grads = loss.backward()?;
//!         clip_gradients(&mut grads, &student_params, 3.0)?;
//!         cancel_gradients_last_layer(epoch, &mut grads, &student_params, 1);
//!         optimizer.step(&grads)?;
//!         ema.update(momentum_schedule[i])?;
//!     }
//!     let metrics = dino_loss.last_metrics()?.expect("a step ran");
//!     assert!(metrics.teacher_entropy <= metrics.max_entropy + 1e-6);
//! }
//! // The last layer was frozen in epoch 0, so it took fewer AdamW steps than the backbone.
//! assert_eq!(optimizer.step_count("backbone.weight"), 6);
//! assert_eq!(optimizer.step_count("head.last_layer.weight"), 3);
//! # Ok(())
//! # }
//! ```

pub mod collective;
pub mod ema;
pub mod error;
pub mod ibot;
mod kernels;
pub mod knn;
pub mod koleo;
pub mod loss;
pub mod monitor;
pub mod optim;
pub mod params;
pub mod schedule;

pub use collective::{Collective, Local};
pub use ema::EmaTeacher;
pub use error::{Error, Result};
pub use ibot::{ibot_loss_dense, IbotPatchLoss, IbotPatchLossConfig};
pub use knn::{knn_classifier, l2_normalize, KnnResult};
pub use koleo::{koleo_loss, koleo_per_crop, koleo_per_crop_over_ranks};
pub use loss::{
    sinkhorn_knopp_teacher, DinoLoss, DinoLossConfig, TeacherCentering, TeacherTargets,
};
pub use monitor::CollapseMetrics;
pub use optim::{
    cancel_gradients_last_layer, clip_gradients, AdamW, Lars, Optimizer, ParamGroup, Sgd,
};
pub use params::{get_params_groups, sorted_vars, NamedVar};
pub use schedule::{cosine_scheduler, teacher_temp_schedule};
