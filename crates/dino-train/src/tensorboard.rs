//! TensorBoard scalars: `<output_dir>/tensorboard/events.out.tfevents.<secs>.<host>`, one tag per logged
//! quantity (`<kind>/<field>` for every number of a log record: `step/loss`, `step/lr`, `epoch/knn_top1`,
//! `knn_final/pixels_top1`, ...), the step being the record's global iteration (epoch records: the epoch).
//!
//! The file is the TFRecord framing TensorBoard reads (u64 length, masked CRC-32C of the length, the bytes,
//! masked CRC-32C of the bytes) around `tensorflow.Event` protobufs (`wall_time` = 1, `step` = 2,
//! `file_version` = 3, `summary` = 5; `Summary.value` = 1; `Value.tag` = 1, `Value.simple_value` = 2), the
//! first event carrying `file_version = "brain.Event:2"`. No maintained Rust crate writes it (tensorboard-rs
//! was last released in 2022 and pulls image 0.23 and protobuf 2), and scalars need only these few fields, so
//! they are encoded here; [`read_scalars`] decodes them back, checking both CRCs.
//!
//! The JSON-lines log stays the source of truth: when a run starts or resumes, the event file is rewritten from
//! the log's records before the resume point (the last line per step, as [`crate::log::read_log`] keeps
//! them) and older event files are removed, so a resumed run continues the same curves without duplicated
//! or orphaned steps.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Sub-directory of the output directory holding the event file.
pub const TENSORBOARD_DIR: &str = "tensorboard";
const FILE_PREFIX: &str = "events.out.tfevents.";

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bitwise: the records are small.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The TFRecord mask of a CRC.
fn masked(crc: u32) -> u32 {
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u64, wire: u64) {
    varint(out, (field << 3) | wire);
}

fn bytes_field(out: &mut Vec<u8>, field: u64, b: &[u8]) {
    key(out, field, 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// One `tensorflow.Event`: wall time, step, and either the file version or scalar values.
fn event(
    wall_time: f64,
    step: i64,
    file_version: Option<&str>,
    scalars: &[(String, f32)],
) -> Vec<u8> {
    let mut e = Vec::new();
    key(&mut e, 1, 1);
    e.extend_from_slice(&wall_time.to_le_bytes());
    key(&mut e, 2, 0);
    varint(&mut e, step as u64);
    if let Some(v) = file_version {
        bytes_field(&mut e, 3, v.as_bytes());
    }
    if !scalars.is_empty() {
        let mut summary = Vec::new();
        for (tag, v) in scalars {
            let mut value = Vec::new();
            bytes_field(&mut value, 1, tag.as_bytes());
            key(&mut value, 2, 5);
            value.extend_from_slice(&v.to_le_bytes());
            bytes_field(&mut summary, 1, &value);
        }
        bytes_field(&mut e, 5, &summary);
    }
    e
}

fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut r = Vec::with_capacity(data.len() + 16);
    r.extend_from_slice(&len);
    r.extend_from_slice(&masked(crc32c(&len)).to_le_bytes());
    r.extend_from_slice(data);
    r.extend_from_slice(&masked(crc32c(data)).to_le_bytes());
    r
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The scalars of one log record: `(<kind>/<field>, value)` for each finite number that is not an index, and
/// the step (`global_iteration`, else `epoch`, else 0). Records of other kinds than step / epoch /
/// knn_final give none.
pub fn record_scalars(rec: &serde_json::Value) -> Option<(i64, Vec<(String, f32)>)> {
    let obj = rec.as_object()?;
    let kind = obj.get("kind")?.as_str()?;
    if !matches!(kind, "step" | "epoch" | "knn_final") {
        return None;
    }
    let index = |k: &str| obj.get(k).and_then(|v| v.as_i64());
    let step = index("global_iteration")
        .or_else(|| index("epoch"))
        .unwrap_or(0);
    let scalars = obj
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "kind" | "epoch" | "iteration" | "global_iteration"
            )
        })
        .filter_map(|(k, v)| {
            let x = v.as_f64()?;
            x.is_finite().then(|| (format!("{kind}/{k}"), x as f32))
        })
        .collect();
    Some((step, scalars))
}

/// An open event file, appended one event per record and flushed each time.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl EventWriter {
    /// Start `<output_dir>/tensorboard/events.out.tfevents.<secs>.<host>` with the file-version event and
    /// `history` (log records, oldest first), then remove the directory's older event files.
    pub fn rebuild(output_dir: &Path, history: &[serde_json::Value]) -> Result<Self> {
        let dir = output_dir.join(TENSORBOARD_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let t = now();
        let mut name = format!("{FILE_PREFIX}{}.{}", t as u64, crate::lock::host_name());
        // Two starts within one second: keep the names distinct.
        let mut n = 0;
        while dir.join(&name).exists() {
            n += 1;
            name = format!("{FILE_PREFIX}{}.{}.{n}", t as u64, crate::lock::host_name());
        }
        let path = dir.join(&name);
        let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = Self {
            path,
            file: std::io::BufWriter::new(file),
        };
        w.put(&event(t, 0, Some("brain.Event:2"), &[]))?;
        for r in history {
            if let Some((step, s)) = record_scalars(r) {
                w.put(&event(t, step, None, &s))?;
            }
        }
        w.flush()?;
        for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let p = entry.map_err(|e| Error::io(&dir, e))?.path();
            let is_events = p
                .file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with(FILE_PREFIX));
            if is_events && p != w.path {
                std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
        Ok(w)
    }

    fn put(&mut self, data: &[u8]) -> Result<()> {
        self.file
            .write_all(&record(data))
            .map_err(|e| Error::io(&self.path, e))
    }

    fn flush(&mut self) -> Result<()> {
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }

    /// Append the scalars of one log record (see [`record_scalars`]).
    pub fn write(&mut self, rec: &serde_json::Value) -> Result<()> {
        if let Some((step, s)) = record_scalars(rec) {
            if !s.is_empty() {
                self.put(&event(now(), step, None, &s))?;
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Append an image under `tag` at `step` (TensorBoard's Images tab): a `Summary.Value` whose `image`
    /// (field 4) is a `Summary.Image` of `height` (1), `width` (2), colorspace 3 = RGB (3) and the encoded
    /// bytes (4), here a PNG.
    pub fn write_image(
        &mut self,
        tag: &str,
        step: i64,
        png: &[u8],
        width: u32,
        height: u32,
    ) -> Result<()> {
        let mut image = Vec::new();
        for (field, v) in [(1, u64::from(height)), (2, u64::from(width)), (3, 3)] {
            key(&mut image, field, 0);
            varint(&mut image, v);
        }
        bytes_field(&mut image, 4, png);
        let mut value = Vec::new();
        bytes_field(&mut value, 1, tag.as_bytes());
        bytes_field(&mut value, 4, &image);
        let mut summary = Vec::new();
        bytes_field(&mut summary, 1, &value);
        let mut e = event(now(), step, None, &[]);
        bytes_field(&mut e, 5, &summary);
        self.put(&e)?;
        self.flush()
    }

    /// The event file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// One scalar read back from an event file.
#[derive(Debug, Clone, PartialEq)]
pub struct Scalar {
    /// The tag (`step/loss`, ...).
    pub tag: String,
    /// The step.
    pub step: i64,
    /// The value.
    pub value: f32,
    /// Seconds since the Unix epoch when it was written.
    pub wall_time: f64,
}

fn read_varint(b: &[u8], i: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*i)?;
        *i += 1;
        v |= ((byte & 0x7f) as u64) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// One protobuf field: (field number, wire type, payload bytes, varint value).
type Field<'a> = (u64, u64, &'a [u8], u64);

/// The fields of a protobuf message.
fn fields(b: &[u8]) -> Option<Vec<Field<'_>>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let k = read_varint(b, &mut i)?;
        let (field, wire) = (k >> 3, k & 7);
        match wire {
            0 => {
                let v = read_varint(b, &mut i)?;
                out.push((field, wire, &b[i..i], v));
            }
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                let s = b.get(i..i + n)?;
                i += n;
                out.push((field, wire, s, 0));
            }
            2 => {
                let n = usize::try_from(read_varint(b, &mut i)?).ok()?;
                let s = b.get(i..i.checked_add(n)?)?;
                i += n;
                out.push((field, wire, s, 0));
            }
            _ => return None,
        }
    }
    Some(out)
}

/// The events of an event file, in file order, each as `(offset, its fields)`; errors name the file and the
/// offset of a torn or corrupt record.
fn read_events(
    path: &Path,
    mut each: impl FnMut(usize, Vec<Field<'_>>) -> Result<()>,
) -> Result<()> {
    let b = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad =
        |at: usize, what: &str| Error::Msg(format!("{}: {what} at byte {at}", path.display()));
    let mut i = 0;
    while i < b.len() {
        let head = b
            .get(i..i + 12)
            .ok_or_else(|| bad(i, "torn record header"))?;
        let len_bytes = &head[..8];
        if u32::from_le_bytes(head[8..12].try_into().unwrap_or_default())
            != masked(crc32c(len_bytes))
        {
            return Err(bad(i, "length CRC mismatch"));
        }
        let len = usize::try_from(u64::from_le_bytes(len_bytes.try_into().unwrap_or_default()))
            .map_err(|_| bad(i, "record length overflows"))?;
        let start = i + 12;
        let data = start
            .checked_add(len)
            .and_then(|end| b.get(start..end))
            .ok_or_else(|| bad(i, "torn record"))?;
        let crc = b
            .get(start + len..start + len + 4)
            .ok_or_else(|| bad(i, "torn record CRC"))?;
        if u32::from_le_bytes(crc.try_into().unwrap_or_default()) != masked(crc32c(data)) {
            return Err(bad(i, "data CRC mismatch"));
        }
        each(i, fields(data).ok_or_else(|| bad(i, "malformed Event"))?)?;
        i = start + len + 4;
    }
    Ok(())
}

/// The `Summary.Value`s of an event's fields, each as its own fields, with the event's wall time and step.
fn summary_values<'a>(
    path: &Path,
    at: usize,
    ev: &[Field<'a>],
) -> Result<(f64, i64, Vec<Vec<Field<'a>>>)> {
    let bad = |what: &str| Error::Msg(format!("{}: {what} at byte {at}", path.display()));
    let (mut wall_time, mut step, mut values) = (0.0, 0i64, Vec::new());
    for &(f, w, s, v) in ev {
        match (f, w) {
            (1, 1) => wall_time = f64::from_le_bytes(s.try_into().unwrap_or_default()),
            (2, 0) => step = v as i64,
            (5, 2) => {
                for (vf, vw, vs, _) in fields(s).ok_or_else(|| bad("malformed Summary"))? {
                    if (vf, vw) == (1, 2) {
                        values.push(fields(vs).ok_or_else(|| bad("malformed Value"))?);
                    }
                }
            }
            _ => {}
        }
    }
    Ok((wall_time, step, values))
}

/// The tag of a `Summary.Value` (its fields) and the payload of its field `(field, wire)`, where present.
fn tagged<'a>(value: &[Field<'a>], field: u64, wire: u64) -> (Option<String>, Option<&'a [u8]>) {
    let (mut tag, mut payload) = (None, None);
    for &(f, w, s, _) in value {
        if (f, w) == (1, 2) {
            tag = Some(String::from_utf8_lossy(s).into_owned());
        } else if (f, w) == (field, wire) {
            payload = Some(s);
        }
    }
    (tag, payload)
}

/// Every scalar of an event file, in file order; errors name the file and the offset of a torn or corrupt
/// record.
pub fn read_scalars(path: &Path) -> Result<Vec<Scalar>> {
    let mut out = Vec::new();
    read_events(path, |at, ev| {
        let (wall_time, step, values) = summary_values(path, at, &ev)?;
        for value in values {
            if let (Some(tag), Some(x)) = tagged(&value, 2, 5) {
                out.push(Scalar {
                    tag,
                    step,
                    value: f32::from_le_bytes(x.try_into().unwrap_or_default()),
                    wall_time,
                });
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// One image read back from an event file.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    /// The tag (`attention/last_block`).
    pub tag: String,
    /// The step.
    pub step: i64,
    /// Width and height in pixels, as recorded.
    pub width: u32,
    /// Height in pixels, as recorded.
    pub height: u32,
    /// The encoded image (PNG).
    pub encoded: Vec<u8>,
}

/// Every image of an event file, in file order (see [`EventWriter::write_image`]).
pub fn read_images(path: &Path) -> Result<Vec<Image>> {
    let mut out = Vec::new();
    read_events(path, |at, ev| {
        let (_, step, values) = summary_values(path, at, &ev)?;
        for value in values {
            let (Some(tag), Some(image)) = tagged(&value, 4, 2) else {
                continue;
            };
            let mut im = Image {
                tag,
                step,
                width: 0,
                height: 0,
                encoded: Vec::new(),
            };
            let bad = || Error::Msg(format!("{}: malformed Image at byte {at}", path.display()));
            for (f, w, s, v) in fields(image).ok_or_else(bad)? {
                match (f, w) {
                    (1, 0) => im.height = v as u32,
                    (2, 0) => im.width = v as u32,
                    (4, 2) => im.encoded = s.to_vec(),
                    _ => {}
                }
            }
            out.push(im);
        }
        Ok(())
    })?;
    Ok(out)
}

/// The event files in `<output_dir>/tensorboard`, sorted by name.
pub fn event_files(output_dir: &Path) -> Vec<PathBuf> {
    let dir = output_dir.join(TENSORBOARD_DIR);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with(FILE_PREFIX))
        })
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_answers() {
        // RFC 3720 B.4 test vectors.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
    }

    #[test]
    fn events_round_trip_and_corruption_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let history = vec![
            serde_json::json!({"kind": "step", "epoch": 0, "iteration": 0, "global_iteration": 0, "loss": 2.5, "lr": 1e-4}),
            serde_json::json!({"kind": "epoch", "epoch": 0, "train_loss": 2.25, "knn_top1": null}),
        ];
        let mut w = EventWriter::rebuild(dir.path(), &history).unwrap();
        w.write(&serde_json::json!({"kind": "step", "global_iteration": 300, "loss": f64::NAN, "lr": 0.5}))
            .unwrap();
        w.write(&serde_json::json!({"kind": "extend", "at_global_iteration": 3}))
            .unwrap();
        // An image among the scalars: read back by read_images, skipped by read_scalars.
        let png = b"\x89PNG\r\n\x1a\n not really, but bytes kept as they are".to_vec();
        w.write_image("attention/last_block", 301, &png, 982, 710)
            .unwrap();
        let p = w.path().to_path_buf();
        drop(w);
        let images = read_images(&p).unwrap();
        assert_eq!(
            images,
            vec![Image {
                tag: "attention/last_block".into(),
                step: 301,
                width: 982,
                height: 710,
                encoded: png,
            }]
        );
        let s = read_scalars(&p).unwrap();
        let got: Vec<(&str, i64, f32)> = s
            .iter()
            .map(|x| (x.tag.as_str(), x.step, x.value))
            .collect();
        assert_eq!(
            got,
            vec![
                ("step/loss", 0, 2.5),
                ("step/lr", 0, 1e-4),
                ("epoch/train_loss", 0, 2.25),
                ("step/lr", 300, 0.5)
            ]
        );
        // A second start replaces the file.
        let w2 = EventWriter::rebuild(dir.path(), &history[..1]).unwrap();
        assert_eq!(event_files(dir.path()), vec![w2.path().to_path_buf()]);
        let mut b = std::fs::read(w2.path()).unwrap();
        let n = b.len();
        b[n - 6] ^= 1;
        std::fs::write(w2.path(), &b).unwrap();
        let e = read_scalars(w2.path()).unwrap_err().to_string();
        assert!(e.contains("CRC mismatch"), "{e}");
    }
}
