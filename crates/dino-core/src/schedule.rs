//! Schedules indexed by global iteration or epoch, bit-compatible with the official numpy code:
//! `utils.cosine_scheduler` (lr, weight decay, teacher momentum) and the DINOLoss teacher-temperature
//! schedule. Everything is computed in float64 with numpy's `linspace`/`cos` evaluation order.

use crate::{Error, Result};

/// `numpy.linspace(start, stop, num)` (endpoint included), evaluated as numpy does:
/// `i * ((stop - start) / (num - 1)) + start`, with the last element set to `stop` exactly.
pub fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    if num == 1 {
        return vec![start];
    }
    let div = (num - 1) as f64;
    let delta = stop - start;
    let step = delta / div;
    let mut y: Vec<f64> = if step == 0.0 {
        // numpy: y /= div; y = y * delta
        (0..num).map(|i| (i as f64 / div) * delta + start).collect()
    } else {
        (0..num).map(|i| i as f64 * step + start).collect()
    };
    y[num - 1] = stop;
    y
}

/// `utils.cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs,
/// start_warmup_value)`: a linear warm-up (`linspace(start_warmup_value, base_value,
/// warmup_epochs * niter_per_ep)`) followed by `final + 0.5 (base - final)(1 + cos(pi i / M))` over the
/// remaining `M` iterations. Length `epochs * niter_per_ep`, indexed by `epoch * niter_per_ep + it`.
///
/// Official uses: lr (`base = lr * batch / 256`, final `min_lr`, warm-up 10 epochs from 0), weight decay
/// (0.04 -> 0.4, no warm-up) and teacher momentum (`momentum_teacher` -> 1, no warm-up).
/// If `warmup_epochs > epochs` the official code fails its length assertion; here the warm-up is cut to
/// the schedule length instead.
pub fn cosine_scheduler(
    base_value: f64,
    final_value: f64,
    epochs: usize,
    niter_per_ep: usize,
    warmup_epochs: usize,
    start_warmup_value: f64,
) -> Vec<f64> {
    let total = epochs * niter_per_ep;
    let warmup_iters = (warmup_epochs * niter_per_ep).min(total);
    let mut schedule = if warmup_epochs > 0 {
        linspace(start_warmup_value, base_value, warmup_iters)
    } else {
        Vec::new()
    };
    let m = total - warmup_iters;
    let amp = 0.5 * (base_value - final_value);
    schedule.extend((0..m).map(|i| {
        // numpy: np.pi * iters / len(iters), then cos, then final + amp * (1 + cos)
        let x = std::f64::consts::PI * i as f64 / m as f64;
        final_value + amp * (1.0 + x.cos())
    }));
    schedule
}

/// The DINOLoss teacher-temperature schedule, one value per epoch:
/// `concat(linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
/// ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp)`.
///
/// Errors if `warmup_teacher_temp_epochs > nepochs` (numpy would fail on a negative length).
pub fn teacher_temp_schedule(
    warmup_teacher_temp: f64,
    teacher_temp: f64,
    warmup_teacher_temp_epochs: usize,
    nepochs: usize,
) -> Result<Vec<f64>> {
    if warmup_teacher_temp_epochs > nepochs {
        return Err(Error::arg(
            "warmup_teacher_temp_epochs",
            format!("{warmup_teacher_temp_epochs} is larger than nepochs = {nepochs}"),
        ));
    }
    let mut s = linspace(
        warmup_teacher_temp,
        teacher_temp,
        warmup_teacher_temp_epochs,
    );
    // np.ones(n) * teacher_temp == teacher_temp exactly
    s.extend(std::iter::repeat_n(
        teacher_temp,
        nepochs - warmup_teacher_temp_epochs,
    ));
    Ok(s)
}

/// Looks up `schedule[index]` with a clear error past the end.
pub fn at(schedule: &[f64], index: usize, name: &str) -> Result<f64> {
    schedule
        .get(index)
        .copied()
        .ok_or_else(|| Error::PastSchedule {
            name: name.to_string(),
            index,
            len: schedule.len(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_endpoints() {
        assert_eq!(linspace(0.0, 1.0, 5), vec![0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(linspace(2.0, 3.0, 1), vec![2.0]);
        assert!(linspace(2.0, 3.0, 0).is_empty());
        assert_eq!(linspace(0.5, 0.5, 3), vec![0.5, 0.5, 0.5]);
    }

    #[test]
    fn cosine_without_warmup_starts_at_base_and_never_reaches_final() {
        let s = cosine_scheduler(0.996, 1.0, 100, 10, 0, 0.0);
        assert_eq!(s.len(), 1000);
        assert_eq!(s[0], 0.996);
        assert!((s[500] - 0.998).abs() < 1e-15);
        assert!(s[999] < 1.0);
    }

    #[test]
    fn teacher_temp_warmup_past_nepochs_is_an_error() {
        assert!(teacher_temp_schedule(0.04, 0.07, 30, 10).is_err());
        let s = teacher_temp_schedule(0.04, 0.07, 0, 3).unwrap();
        assert_eq!(s, vec![0.07; 3]);
    }
}
