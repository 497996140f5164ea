//! Train from a preset and/or a TOML file of `TrainConfig` keys (the file's keys override the preset's).
//!
//! `cargo run --release -p dino-train --example train -- [--preset NAME] [CONFIG.toml] [--output-dir DIR]`
//! Presets: official, default, fmnist-small, cifar.

use dino_train::{train, TrainConfig, TrainOptions};

/// Large tensor buffers cache-line aligned, on huge pages (see `TensorAlloc`).
#[global_allocator]
static GLOBAL: dino_train::runtime::TensorAlloc = dino_train::runtime::TensorAlloc;

fn run() -> dino_train::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut preset = "default".to_string();
    let mut file = None;
    let mut out = None;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--preset" => {
                preset = args.get(i + 1).cloned().unwrap_or_default();
                i += 1;
            }
            "--output-dir" => {
                out = args.get(i + 1).cloned();
                i += 1;
            }
            f => file = Some(std::path::PathBuf::from(f)),
        }
        i += 1;
    }
    let mut cfg = TrainConfig::preset(&preset)?;
    if let Some(f) = file {
        // Keys of the file override the preset: merge the two TOML tables.
        let text = std::fs::read_to_string(&f).map_err(|e| dino_train::Error::io(&f, e))?;
        let mut base: toml::Table = toml::from_str(&cfg.to_toml_string())
            .map_err(|e| dino_train::Error::Msg(e.to_string()))?;
        let over: toml::Table =
            toml::from_str(&text).map_err(|e| dino_train::Error::ConfigParse {
                path: f.clone(),
                message: e.to_string(),
            })?;
        base.extend(over);
        cfg = TrainConfig::from_toml_str(&toml::to_string(&base).unwrap_or_default()).map_err(
            |message| dino_train::Error::ConfigParse {
                path: f.clone(),
                message,
            },
        )?;
    }
    if let Some(o) = out {
        cfg.output_dir = o.into();
    }
    let s = train(&cfg, &TrainOptions::default())?;
    println!(
        "{} iterations in {:.0} s; epoch loss {:.4} -> {:.4}",
        s.global_iteration, s.seconds, s.first_epoch_loss, s.last_epoch_loss
    );
    if let Some(a) = s.knn_final {
        println!(
            "k-NN top-1 {:.2}% top-5 {:.2}% (trained teacher)",
            a.top1, a.top5
        );
    }
    if let Some(b) = s.knn_init {
        println!(
            "k-NN top-1 {:.2}% top-5 {:.2}% (random initialisation)",
            b.top1, b.top5
        );
    }
    Ok(())
}

fn main() {
    dino_train::runtime::tune_allocator();
    dino_train::runtime::main_thread_in_pool();
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
