//! The no-argument run: a small ViT trained with DINO on the embedded Fashion-MNIST subset (5,000 train /
//! 1,000 test images), sized for 2 CPU cores; prints the k-NN accuracy of the trained teacher next to that
//! of the same network at random initialisation.
//!
//! `cargo run --release -p dino-train --example default [-- OUTPUT_DIR]` (default output: `dino-output`).

/// Large tensor buffers cache-line aligned, on huge pages (see `TensorAlloc`).
#[global_allocator]
static GLOBAL: dino_train::runtime::TensorAlloc = dino_train::runtime::TensorAlloc;

fn main() {
    dino_train::runtime::tune_allocator();
    dino_train::runtime::main_thread_in_pool();
    let out = std::env::args().nth(1).map(std::path::PathBuf::from);
    match dino_train::train_default(out) {
        Ok(s) => {
            println!(
                "trained {} iterations in {:.0} s; loss {:.4} (first epoch) -> {:.4} (last epoch)",
                s.global_iteration, s.seconds, s.first_epoch_loss, s.last_epoch_loss
            );
            if let (Some(a), Some(b)) = (s.knn_final, s.knn_init) {
                println!(
                    "k-NN top-1: trained teacher {:.2}%, random initialisation {:.2}% (top-5 {:.2}% vs {:.2}%)",
                    a.top1, b.top1, a.top5, b.top5
                );
            }
            println!("output: {}", s.output_dir.display());
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
