//! Training logs: a JSON-lines file (`log.jsonl`, one line per logging step and one per epoch), and the
//! console progress display (an indicatif bar with loss, rates and ETA on a terminal; plain lines otherwise).

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// File name of the JSON-lines log in the output directory.
pub const LOG_FILE: &str = "log.jsonl";

/// One logging step (`"kind": "step"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Always `"step"`.
    pub kind: String,
    /// Epoch index (0-based).
    pub epoch: usize,
    /// Iteration within the epoch.
    pub iteration: usize,
    /// Global iteration.
    pub global_iteration: usize,
    /// The loss of this iteration (DINO, plus KoLeo and iBOT when enabled).
    pub loss: f64,
    /// The iBOT masked-patch loss (unweighted), when enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ibot_loss: Option<f64>,
    /// Learning rate (both groups).
    pub lr: f64,
    /// Weight decay of group 0.
    pub wd: f64,
    /// Teacher EMA momentum used after this step.
    pub momentum: f64,
    /// Teacher temperature of this epoch.
    pub teacher_temp: f64,
    /// Entropy of the teacher distribution (nats): near ln K means uniform collapse, near 0 one-hot collapse.
    pub teacher_entropy: f64,
    /// KL(teacher || student) averaged over pairs (nats).
    pub kl_teacher_student: f64,
    /// Mean per-dimension std of the l2-normalised teacher outputs (near 0 means collapse).
    pub teacher_std: f64,
    /// Training throughput, images per second (over the last logging window).
    pub images_per_s: f64,
    /// Seconds since the start of this process.
    pub elapsed_s: f64,
    /// Seconds this step spent averaging gradients over the ranks, without the wait for the slowest rank
    /// (0 on one rank).
    #[serde(default)]
    pub all_reduce_s: f64,
    /// Seconds this step waited after backward for the slowest rank (0 on one rank).
    #[serde(default)]
    pub rank_wait_s: f64,
    /// Gradient bytes all-reduced in this step (0 on one rank).
    #[serde(default)]
    pub all_reduce_bytes: usize,
}

/// One epoch summary (`"kind": "epoch"`), the official `log.txt` keys plus ours.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// Always `"epoch"`.
    pub kind: String,
    /// Epoch index (0-based).
    pub epoch: usize,
    /// Mean loss over the epoch's iterations (those run by this process if resumed mid-epoch).
    pub train_loss: f64,
    /// Learning rate at the epoch's last iteration.
    pub train_lr: f64,
    /// Weight decay at the epoch's last iteration.
    pub train_wd: f64,
    /// Mean teacher entropy over the epoch.
    pub teacher_entropy: f64,
    /// k-NN top-1 accuracy (%) of the teacher backbone, when evaluated this epoch.
    pub knn_top1: Option<f64>,
    /// k-NN top-5 accuracy (%), when evaluated.
    pub knn_top5: Option<f64>,
    /// Images skipped as unreadable during the epoch.
    pub skipped_images: usize,
    /// Seconds the epoch took.
    pub epoch_s: f64,
}

/// The final k-NN of a run beside its two baselines (one `"knn_final"` line at the end of a labelled run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KnnFinalRecord {
    /// Always `"knn_final"`.
    pub kind: String,
    /// The last epoch (0-based).
    pub epoch: usize,
    /// Top-1 / top-5 (%) of the trained teacher backbone.
    pub trained_top1: f64,
    /// See `trained_top1`.
    pub trained_top5: f64,
    /// Top-1 / top-5 (%) of the same network at random initialisation.
    pub init_top1: f64,
    /// See `init_top1`.
    pub init_top5: f64,
    /// Top-1 / top-5 (%) of the raw pixels, when computed.
    pub pixels_top1: Option<f64>,
    /// See `pixels_top1`.
    pub pixels_top5: Option<f64>,
}

/// A run lengthened by `--extend` (one `"extend"` line where the longer schedules take over).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExtendRecord {
    /// Always `"extend"`.
    pub kind: String,
    /// Where and how the run was lengthened.
    #[serde(flatten)]
    pub extension: crate::checkpoint::Extension,
}

/// A JSON-lines log read back by [`read_log`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogRecords {
    /// Step records in global-iteration order.
    pub steps: Vec<StepRecord>,
    /// Epoch records in epoch order.
    pub epochs: Vec<EpochRecord>,
    /// The last `knn_final` record, if any.
    pub knn_final: Option<KnnFinalRecord>,
}

/// Appends JSON lines to `<output_dir>/log.jsonl`, flushing each line.
#[derive(Debug)]
pub struct JsonLog {
    path: PathBuf,
    file: std::fs::File,
    tensorboard: Option<crate::tensorboard::EventWriter>,
}

impl JsonLog {
    /// Open (append) the log in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(LOG_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(Self {
            path,
            file,
            tensorboard: None,
        })
    }

    /// Also write every record's numbers as TensorBoard scalars (see [`crate::tensorboard`]).
    pub fn attach_tensorboard(&mut self, w: crate::tensorboard::EventWriter) {
        self.tensorboard = Some(w);
    }

    /// Append one record as a line.
    pub fn write<T: Serialize>(&mut self, record: &T) -> Result<()> {
        let value = serde_json::to_value(record).map_err(|source| Error::Json {
            path: self.path.clone(),
            source,
        })?;
        let mut line = value.to_string();
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| Error::io(&self.path, e))?;
        self.file.flush().map_err(|e| Error::io(&self.path, e))?;
        if let Some(tb) = self.tensorboard.as_mut() {
            tb.write(&value)?;
        }
        Ok(())
    }

    /// The TensorBoard event file this log also writes, if any.
    pub fn tensorboard(&mut self) -> Option<&mut crate::tensorboard::EventWriter> {
        self.tensorboard.as_mut()
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Read a JSON-lines log back: step, epoch and final k-NN records, keeping for each global iteration (and
/// each epoch) the LAST line written, so lines repeated by a resumed run replace those of the interrupted one.
pub fn read_log(path: &Path) -> Result<LogRecords> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut steps = std::collections::BTreeMap::new();
    let mut epochs = std::collections::BTreeMap::new();
    let mut knn_final = None;
    for line in std::io::BufReader::new(f).lines() {
        let line = line.map_err(|e| Error::io(path, e))?;
        // A line torn by a crash is skipped.
        if let Ok(s) = serde_json::from_str::<StepRecord>(&line) {
            if s.kind == "step" {
                steps.insert(s.global_iteration, s);
                continue;
            }
        }
        if let Ok(e) = serde_json::from_str::<EpochRecord>(&line) {
            if e.kind == "epoch" {
                epochs.insert(e.epoch, e);
                continue;
            }
        }
        if let Ok(k) = serde_json::from_str::<KnnFinalRecord>(&line) {
            if k.kind == "knn_final" {
                knn_final = Some(k);
            }
        }
    }
    Ok(LogRecords {
        steps: steps.into_values().collect(),
        epochs: epochs.into_values().collect(),
        knn_final,
    })
}

/// Console progress: an indicatif bar on a terminal, plain `eprintln!` lines otherwise (or nothing).
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
    total: usize,
    start: Instant,
    start_iter: usize,
}

impl Progress {
    /// A display for `total` global iterations, starting at `start_iter`. `enabled = false` prints nothing.
    pub fn new(total: usize, start_iter: usize, enabled: bool) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = (enabled && terminal).then(|| {
            let b = indicatif::ProgressBar::new(total as u64);
            let style = indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} it ({per_sec}, ETA {eta}) {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            b.set_style(style);
            b.set_position(start_iter as u64);
            b.reset_eta();
            b
        });
        Self {
            bar,
            plain: enabled && !terminal,
            total,
            start: Instant::now(),
            start_iter,
        }
    }

    /// Report that `global_iteration` iterations are complete, with a status message.
    pub fn update(&mut self, global_iteration: usize, msg: &str) {
        if let Some(b) = &self.bar {
            b.set_position(global_iteration as u64);
            b.set_message(msg.to_string());
        } else if self.plain {
            let done = global_iteration.saturating_sub(self.start_iter);
            let el = self.start.elapsed().as_secs_f64();
            let rate = if el > 0.0 { done as f64 / el } else { 0.0 };
            let eta = if rate > 0.0 {
                (self.total.saturating_sub(global_iteration)) as f64 / rate
            } else {
                0.0
            };
            eprintln!(
                "[{global_iteration}/{}] {msg} | {rate:.2} it/s, ETA {eta:.0} s",
                self.total
            );
        }
    }

    /// Print a warning on stderr (above the bar when one is shown), even when progress is not shown.
    pub fn warn(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// Print a line above the bar (or plainly), when progress is shown.
    pub fn println(&self, line: &str) {
        if let Some(b) = &self.bar {
            b.println(line);
        } else if self.plain {
            eprintln!("{line}");
        }
    }

    /// Finish and clear the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(g: usize, loss: f64) -> StepRecord {
        StepRecord {
            kind: "step".into(),
            epoch: 0,
            iteration: g,
            global_iteration: g,
            loss,
            ibot_loss: None,
            lr: 0.1,
            wd: 0.04,
            momentum: 0.996,
            teacher_temp: 0.04,
            teacher_entropy: 1.0,
            kl_teacher_student: 0.5,
            teacher_std: 0.1,
            images_per_s: 10.0,
            elapsed_s: 1.0,
            all_reduce_s: 0.0,
            rank_wait_s: 0.0,
            all_reduce_bytes: 0,
        }
    }

    #[test]
    fn log_round_trip_keeps_last_line_per_iteration_and_skips_torn_lines() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = JsonLog::open(dir.path()).unwrap();
        log.write(&step(0, 5.0)).unwrap();
        log.write(&step(1, 4.0)).unwrap();
        log.write(&step(1, 3.0)).unwrap(); // a resumed run rewrote iteration 1
        let ep = EpochRecord {
            kind: "epoch".into(),
            epoch: 0,
            train_loss: 4.0,
            train_lr: 0.1,
            train_wd: 0.04,
            teacher_entropy: 1.0,
            knn_top1: Some(50.0),
            knn_top5: None,
            skipped_images: 0,
            epoch_s: 2.0,
        };
        log.write(&ep).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(log.path())
            .unwrap()
            .write_all(b"{\"kind\":\"st")
            .unwrap();
        let r = read_log(log.path()).unwrap();
        assert_eq!(
            r.steps.iter().map(|s| s.loss).collect::<Vec<_>>(),
            vec![5.0, 3.0]
        );
        assert_eq!(r.epochs, vec![ep]);
        assert_eq!(r.knn_final, None);
    }
}
