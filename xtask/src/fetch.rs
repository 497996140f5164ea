//! `cargo xtask fetch-data`: the official dataset archives, downloaded with resume (HTTP Range), verified against
//! their published checksums, and extracted.
//!
//! The download path is tested against a local HTTP server on 127.0.0.1 (see the tests at the bottom): a full
//! download, a resumed partial download, a server that ignores `Range`, an interrupted transfer, a checksum mismatch
//! and an unreachable host.

use anyhow::{anyhow, bail, Context, Result};
use md5::Md5;
use sha2::{Digest, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A published checksum of a downloaded file (lower-case hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checksum {
    /// SHA-256 of the whole file.
    Sha256(String),
    /// MD5 of the whole file (what the CIFAR and Imagenette authors publish).
    Md5(String),
}

impl Checksum {
    fn kind(&self) -> &'static str {
        match self {
            Checksum::Sha256(_) => "sha256",
            Checksum::Md5(_) => "md5",
        }
    }
    fn expected(&self) -> &str {
        match self {
            Checksum::Sha256(h) | Checksum::Md5(h) => h,
        }
    }
    /// Hashes `path` with this checksum's algorithm and returns the lower-case hex digest.
    pub fn compute(&self, path: &Path) -> Result<String> {
        let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut sha = Sha256::new();
        let mut md5 = Md5::new();
        loop {
            let n = f
                .read(&mut buf)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if n == 0 {
                break;
            }
            match self {
                Checksum::Sha256(_) => sha.update(&buf[..n]),
                Checksum::Md5(_) => md5.update(&buf[..n]),
            }
        }
        Ok(match self {
            Checksum::Sha256(_) => hex(&sha.finalize()),
            Checksum::Md5(_) => hex(&md5.finalize()),
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One file to download.
#[derive(Debug, Clone)]
pub struct Source {
    /// Where the official file lives.
    pub url: String,
    /// The file name it gets in the data directory.
    pub file: String,
    /// Its published checksum.
    pub checksum: Checksum,
    /// Extract it (tar.gz) into the data directory after verification.
    pub extract_tar_gz: bool,
}

/// A dataset: its files and the folder the archive extracts to (if any).
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The name on the command line.
    pub name: &'static str,
    /// The files to download.
    pub sources: Vec<Source>,
    /// What the user then passes to `dino train --data-path` (relative to the data dir).
    pub data_path: &'static str,
    /// The matching `dino train --dataset` kind.
    pub kind: &'static str,
}

fn src(url: &str, checksum: Checksum, extract_tar_gz: bool) -> Source {
    Source {
        url: url.to_string(),
        file: url.rsplit('/').next().unwrap_or(url).to_string(),
        checksum,
        extract_tar_gz,
    }
}

/// The dataset names `fetch-data` accepts.
pub const DATASETS: &[&str] = &["cifar10", "cifar100", "fashion-mnist", "imagenette"];

/// The official URLs and published checksums of each dataset.
pub fn dataset(name: &str) -> Result<Dataset> {
    let md5 = |h: &str| Checksum::Md5(h.to_string());
    let sha = |h: &str| Checksum::Sha256(h.to_string());
    // Fashion-MNIST: the sha256 of the four original files (byte-identical to ../shared/data/fashion-mnist, whose
    // SHA256SUMS they are; the IDX readers of dino-data read the .gz files directly, so they are not unpacked).
    const FM: &str = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com";
    Ok(match name {
        "cifar10" => Dataset {
            name: "cifar10",
            // md5 published on https://www.cs.toronto.edu/~kriz/cifar.html
            sources: vec![src(
                "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                md5("c32a1d4ab5d03f1284b67883e8d87530"),
                true,
            )],
            data_path: "cifar-10-batches-bin",
            kind: "cifar10",
        },
        "cifar100" => Dataset {
            name: "cifar100",
            sources: vec![src(
                "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
                md5("03b5dce01913d631647c71ecec9e9cb8"),
                true,
            )],
            data_path: "cifar-100-binary",
            kind: "cifar100",
        },
        "fashion-mnist" => Dataset {
            name: "fashion-mnist",
            sources: vec![
                src(
                    &format!("{FM}/train-images-idx3-ubyte.gz"),
                    sha("b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"),
                    false,
                ),
                src(
                    &format!("{FM}/train-labels-idx1-ubyte.gz"),
                    sha("0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"),
                    false,
                ),
                src(
                    &format!("{FM}/t10k-images-idx3-ubyte.gz"),
                    sha("cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"),
                    false,
                ),
                src(
                    &format!("{FM}/t10k-labels-idx1-ubyte.gz"),
                    sha("8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"),
                    false,
                ),
            ],
            data_path: ".",
            kind: "fashion-mnist",
        },
        "imagenette" => Dataset {
            name: "imagenette",
            // The 160 px version (the md5 torchvision's Imagenette dataset checks).
            sources: vec![src(
                "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz",
                md5("e793b78cc4c9e9a4ccc0c1155377a412"),
                true,
            )],
            data_path: "imagenette2-160/train",
            kind: "folder",
        },
        other => bail!(
            "unknown dataset `{other}`: expected one of {}",
            DATASETS.join(", ")
        ),
    })
}

/// An HTTP agent for downloads: no status-as-error (we read 206/416 ourselves), connect timeout, the proxy from
/// the environment unless `use_env_proxy` is false (tests talk to 127.0.0.1 directly).
pub fn agent(use_env_proxy: bool) -> ureq::Agent {
    let mut cfg = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(20)))
        .timeout_recv_body(Some(Duration::from_secs(60)));
    if !use_env_proxy {
        cfg = cfg.proxy(None);
    }
    ureq::Agent::new_with_config(cfg.build())
}

fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    rest.split('/').next().unwrap_or(rest)
}

/// What happened to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The verified file was already there.
    AlreadyPresent,
    /// Downloaded from the start.
    Downloaded,
    /// Resumed a partial download from this byte offset.
    Resumed(u64),
}

/// Downloads `src` into `dir` (resuming `<file>.part` if present), verifies its checksum and renames it into place.
/// Returns the final path and what was done. On a checksum mismatch the partial file is deleted and an error names
/// the file and both digests; on an interrupted transfer the partial file is kept so the next call resumes.
pub fn download(
    agent: &ureq::Agent,
    src: &Source,
    dir: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<(PathBuf, Outcome)> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dest = dir.join(&src.file);
    if dest.is_file() {
        let got = src.checksum.compute(&dest)?;
        if got == src.checksum.expected() {
            return Ok((dest, Outcome::AlreadyPresent));
        }
        log(&format!(
            "{} exists but its {} is {got}, not {}: downloading it again",
            dest.display(),
            src.checksum.kind(),
            src.checksum.expected()
        ));
        fs::remove_file(&dest).with_context(|| format!("cannot remove {}", dest.display()))?;
    }
    let part = dir.join(format!("{}.part", src.file));
    let have = fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    let mut req = agent.get(&src.url);
    if have > 0 {
        req = req.header("Range", format!("bytes={have}-"));
    }
    let resp = req.call().map_err(|e| offline_error(&src.url, e))?;
    let status = resp.status().as_u16();
    let (mut file, start, outcome) = match status {
        206 => {
            let range = resp
                .headers()
                .get("content-range")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let start = parse_content_range_start(range).ok_or_else(|| {
                anyhow!(
                    "{}: 206 response with a bad Content-Range `{range}`",
                    src.url
                )
            })?;
            if start != have {
                bail!(
                    "{}: asked to resume at byte {have}, the server sent bytes from {start}",
                    src.url
                );
            }
            let f = OpenOptions::new()
                .append(true)
                .open(&part)
                .with_context(|| format!("cannot open {}", part.display()))?;
            log(&format!("resuming {} at byte {have}", src.file));
            (f, have, Outcome::Resumed(have))
        }
        200 => {
            if have > 0 {
                log(&format!(
                    "the server ignored the range request for {}: downloading it from the start",
                    src.file
                ));
            }
            let f =
                File::create(&part).with_context(|| format!("cannot create {}", part.display()))?;
            (f, 0, Outcome::Downloaded)
        }
        416 if have > 0 => {
            // The partial file already holds every byte: verify it below.
            let f = OpenOptions::new()
                .append(true)
                .open(&part)
                .with_context(|| format!("cannot open {}", part.display()))?;
            (f, have, Outcome::Resumed(have))
        }
        s => bail!("{}: the server answered HTTP {s}", src.url),
    };
    let total = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|n| n + start);
    if status != 416 {
        let mut body = resp.into_body().into_reader();
        let mut buf = vec![0u8; 1 << 16];
        let mut done = start;
        let mut next_report = start + (16 << 20);
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    file.flush().ok();
                    bail!(
                        "download of {} interrupted after {done} bytes ({e}); run the command again to resume \
                         from {}",
                        src.url,
                        part.display()
                    );
                }
            };
            file.write_all(&buf[..n])
                .with_context(|| format!("cannot write {}", part.display()))?;
            done += n as u64;
            if done >= next_report {
                next_report += 16 << 20;
                match total {
                    Some(t) => log(&format!("{}: {} / {} MiB", src.file, done >> 20, t >> 20)),
                    None => log(&format!("{}: {} MiB", src.file, done >> 20)),
                }
            }
        }
        file.sync_all()
            .with_context(|| format!("cannot write {}", part.display()))?;
        if let Some(t) = total {
            if done != t {
                bail!(
                    "download of {} stopped at {done} of {t} bytes; run the command again to resume from {}",
                    src.url,
                    part.display()
                );
            }
        }
    }
    drop(file);
    let got = src.checksum.compute(&part)?;
    if got != src.checksum.expected() {
        fs::remove_file(&part).ok();
        bail!(
            "checksum mismatch for {} from {}: expected {} {}, got {got} (the bad download was deleted; run again \
             to download it afresh)",
            src.file,
            src.url,
            src.checksum.kind(),
            src.checksum.expected()
        );
    }
    fs::rename(&part, &dest)
        .with_context(|| format!("cannot rename {} to {}", part.display(), dest.display()))?;
    Ok((dest, outcome))
}

fn parse_content_range_start(v: &str) -> Option<u64> {
    // "bytes 100-199/200"
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    rest.split('-').next()?.trim().parse().ok()
}

fn offline_error(url: &str, e: ureq::Error) -> anyhow::Error {
    let host = host_of(url);
    match e {
        ureq::Error::HostNotFound => anyhow!(
            "cannot resolve {host} (are you offline?): download {url} by hand into the data directory and run \
             the command again to verify and extract it"
        ),
        ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::Timeout(_) => anyhow!(
            "cannot reach {host} ({e}; are you offline?): download {url} by hand into the data directory and run \
             the command again to verify and extract it"
        ),
        e => anyhow!("download of {url} failed: {e}"),
    }
}

/// Extracts a .tar.gz archive into `dir` (entries with `..` or absolute paths are refused by `tar`), then writes a
/// marker so a second run does not extract again.
pub fn extract_tar_gz(archive: &Path, dir: &Path) -> Result<bool> {
    let name = archive
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("archive");
    let marker = dir.join(format!(".{name}.extracted"));
    if marker.is_file() {
        return Ok(false);
    }
    let f = File::open(archive).with_context(|| format!("cannot open {}", archive.display()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(io::BufReader::new(f)));
    tar.unpack(dir).with_context(|| {
        format!(
            "cannot extract {} into {}",
            archive.display(),
            dir.display()
        )
    })?;
    fs::write(&marker, b"").with_context(|| format!("cannot write {}", marker.display()))?;
    Ok(true)
}

/// Fetches every file of `ds` into `dir`, verifies and extracts; prints what it does.
pub fn fetch_dataset(agent: &ureq::Agent, ds: &Dataset, dir: &Path) -> Result<()> {
    let mut log = |s: &str| eprintln!("fetch-data: {s}");
    for s in &ds.sources {
        let (path, outcome) = download(agent, s, dir, &mut log)?;
        match outcome {
            Outcome::AlreadyPresent => {
                log(&format!("{} already present and verified", path.display()))
            }
            Outcome::Downloaded => log(&format!("downloaded and verified {}", path.display())),
            Outcome::Resumed(at) => log(&format!(
                "resumed at byte {at}, verified {}",
                path.display()
            )),
        }
        if s.extract_tar_gz && extract_tar_gz(&path, dir)? {
            log(&format!(
                "extracted {} into {}",
                path.display(),
                dir.display()
            ));
        }
    }
    let data_path = dir.join(ds.data_path);
    println!(
        "{} is ready: dino train --dataset {} --data-path {}",
        ds.name,
        ds.kind,
        data_path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::net::{TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};
    use std::thread;
    use std::time::Instant;

    /// How the test server behaves on its next request.
    #[derive(Clone, Copy)]
    enum Mode {
        /// Honour `Range` (206) or send everything (200).
        Normal,
        /// Ignore `Range` and always send 200 with the whole body.
        IgnoreRange,
        /// Announce the full length but close the connection after this many body bytes.
        CutAfter(usize),
    }

    /// The `Range` header of each request the test server saw.
    type Seen = Arc<Mutex<Vec<Option<String>>>>;

    /// A tiny HTTP/1.1 server on 127.0.0.1 serving `body` at every path, one mode per accepted connection. It
    /// stops by itself after the listed connections or after 10 s, whichever comes first. Returns the base URL, the
    /// `Range` header of each request seen, and the thread handle.
    fn serve(body: Vec<u8>, modes: Vec<Mode>) -> (String, Seen, thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let h = thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut modes = modes.into_iter();
            while Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let Some(mode) = modes.next() else { return };
                        let range = handle(stream, &body, mode);
                        seen2.lock().unwrap().push(range);
                        if modes.len() == 0 {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => return,
                }
            }
        });
        (format!("http://{addr}"), seen, h)
    }

    fn handle(mut stream: TcpStream, body: &[u8], mode: Mode) -> Option<String> {
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut range = None;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("range") {
                    range = Some(v.trim().to_string());
                }
            }
        }
        let start = match (mode, &range) {
            (Mode::IgnoreRange, _) | (_, None) => None,
            (_, Some(r)) => r
                .strip_prefix("bytes=")
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|s| s.parse::<usize>().ok()),
        };
        let head = match start {
            Some(s) if s >= body.len() => {
                format!(
                    "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{}\r\nContent-Length: 0\r\n\
                     Connection: close\r\n\r\n",
                    body.len()
                )
            }
            Some(s) => format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {s}-{}/{}\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n",
                body.len() - 1,
                body.len(),
                body.len() - s
            ),
            None => format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            ),
        };
        let payload = match start {
            Some(s) if s >= body.len() => &body[..0],
            Some(s) => &body[s..],
            None => body,
        };
        stream.write_all(head.as_bytes()).ok();
        match mode {
            Mode::CutAfter(n) => {
                stream.write_all(&payload[..n.min(payload.len())]).ok();
            }
            _ => {
                stream.write_all(payload).ok();
            }
        }
        stream.flush().ok();
        range
    }

    /// A small real tar.gz: two files in a folder.
    fn archive() -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        let files: [(&str, Vec<u8>); 2] = [
            ("tiny/readme.txt", b"hello from the archive\n".to_vec()),
            (
                "tiny/data.bin",
                (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect(),
            ),
        ];
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, name, &data[..]).unwrap();
        }
        let raw = tar.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&raw).unwrap();
        gz.finish().unwrap()
    }

    fn sha256_hex(b: &[u8]) -> String {
        hex(&Sha256::digest(b))
    }

    fn source(base: &str, body: &[u8]) -> Source {
        Source {
            url: format!("{base}/tiny.tar.gz"),
            file: "tiny.tar.gz".into(),
            checksum: Checksum::Sha256(sha256_hex(body)),
            extract_tar_gz: true,
        }
    }

    #[test]
    fn full_download_verifies_and_extracts() {
        let body = archive();
        let (base, seen, h) = serve(body.clone(), vec![Mode::Normal]);
        let dir = tempfile::tempdir().unwrap();
        let src = source(&base, &body);
        let (path, outcome) = download(&agent(false), &src, dir.path(), &mut |_| {}).unwrap();
        h.join().unwrap();
        assert_eq!(outcome, Outcome::Downloaded);
        assert_eq!(fs::read(&path).unwrap(), body);
        assert!(!dir.path().join("tiny.tar.gz.part").exists());
        assert_eq!(seen.lock().unwrap().as_slice(), &[None]);
        assert!(extract_tar_gz(&path, dir.path()).unwrap());
        assert_eq!(
            fs::read_to_string(dir.path().join("tiny/readme.txt")).unwrap(),
            "hello from the archive\n"
        );
        let data = fs::read(dir.path().join("tiny/data.bin")).unwrap();
        assert_eq!(data.len(), 50_000);
        assert_eq!(data[1000], (1000u32 * 7 % 251) as u8);
        // A second extraction is skipped (marker), a second download finds the verified file.
        assert!(!extract_tar_gz(&path, dir.path()).unwrap());
        let (_, again) = download(&agent(false), &src, dir.path(), &mut |_| {}).unwrap();
        assert_eq!(again, Outcome::AlreadyPresent);
    }

    #[test]
    fn partial_download_resumes_with_range() {
        let body = archive();
        let half = body.len() / 2;
        let (base, seen, h) = serve(body.clone(), vec![Mode::Normal]);
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("tiny.tar.gz.part"), &body[..half]).unwrap();
        let src = source(&base, &body);
        let (path, outcome) = download(&agent(false), &src, dir.path(), &mut |_| {}).unwrap();
        h.join().unwrap();
        assert_eq!(outcome, Outcome::Resumed(half as u64));
        assert_eq!(
            seen.lock().unwrap()[0].as_deref(),
            Some(format!("bytes={half}-").as_str())
        );
        assert_eq!(fs::read(path).unwrap(), body);
    }

    #[test]
    fn interrupted_transfer_keeps_the_part_and_the_next_run_resumes() {
        let body = archive();
        let cut = body.len() / 3;
        let (base, seen, h) = serve(body.clone(), vec![Mode::CutAfter(cut), Mode::Normal]);
        let dir = tempfile::tempdir().unwrap();
        let src = source(&base, &body);
        let err = download(&agent(false), &src, dir.path(), &mut |_| {}).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("run the command again to resume"), "{msg}");
        let part = dir.path().join("tiny.tar.gz.part");
        assert_eq!(fs::read(&part).unwrap(), &body[..cut]);
        let (path, outcome) = download(&agent(false), &src, dir.path(), &mut |_| {}).unwrap();
        h.join().unwrap();
        assert_eq!(outcome, Outcome::Resumed(cut as u64));
        assert_eq!(
            seen.lock().unwrap()[1].as_deref(),
            Some(format!("bytes={cut}-").as_str())
        );
        assert_eq!(fs::read(path).unwrap(), body);
        assert!(!part.exists());
    }

    #[test]
    fn server_ignoring_range_restarts_from_zero() {
        let body = archive();
        let (base, _seen, h) = serve(body.clone(), vec![Mode::IgnoreRange]);
        let dir = tempfile::tempdir().unwrap();
        // A part that is NOT a prefix of the body: appending to it would corrupt the file.
        fs::write(dir.path().join("tiny.tar.gz.part"), vec![0xAB; 100]).unwrap();
        let src = source(&base, &body);
        let (path, outcome) = download(&agent(false), &src, dir.path(), &mut |_| {}).unwrap();
        h.join().unwrap();
        assert_eq!(outcome, Outcome::Downloaded);
        assert_eq!(fs::read(path).unwrap(), body);
    }

    #[test]
    fn complete_part_answered_416_is_verified() {
        let body = archive();
        let (base, _seen, h) = serve(body.clone(), vec![Mode::Normal]);
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("tiny.tar.gz.part"), &body).unwrap();
        let src = source(&base, &body);
        let (path, outcome) = download(&agent(false), &src, dir.path(), &mut |_| {}).unwrap();
        h.join().unwrap();
        assert_eq!(outcome, Outcome::Resumed(body.len() as u64));
        assert_eq!(fs::read(path).unwrap(), body);
    }

    #[test]
    fn checksum_mismatch_is_an_error_naming_the_file_and_deletes_the_download() {
        let body = archive();
        let (base, _seen, h) = serve(body.clone(), vec![Mode::Normal]);
        let dir = tempfile::tempdir().unwrap();
        let mut src = source(&base, &body);
        src.checksum = Checksum::Md5("0123456789abcdef0123456789abcdef".into());
        let err = download(&agent(false), &src, dir.path(), &mut |_| {}).unwrap_err();
        h.join().unwrap();
        let msg = format!("{err:#}");
        assert!(msg.contains("checksum mismatch for tiny.tar.gz"), "{msg}");
        assert!(
            msg.contains("expected md5 0123456789abcdef0123456789abcdef"),
            "{msg}"
        );
        let real_md5 = hex(&Md5::digest(&body));
        assert!(msg.contains(&real_md5), "{msg}");
        assert!(!dir.path().join("tiny.tar.gz.part").exists());
        assert!(!dir.path().join("tiny.tar.gz").exists());
    }

    #[test]
    fn unreachable_host_says_offline() {
        // Bind then drop a listener: nothing listens on that port any more.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let src = Source {
            url: format!("http://127.0.0.1:{port}/x.tar.gz"),
            file: "x.tar.gz".into(),
            checksum: Checksum::Sha256("00".into()),
            extract_tar_gz: false,
        };
        let err = download(&agent(false), &src, dir.path(), &mut |_| {}).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("cannot reach 127.0.0.1"), "{msg}");
        assert!(msg.contains("offline"), "{msg}");
    }

    #[test]
    fn http_error_status_is_reported() {
        // A server that answers 404.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let h = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                line.clear();
            }
            s.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .ok();
        });
        let dir = tempfile::tempdir().unwrap();
        let src = Source {
            url: format!("http://{addr}/missing.tar.gz"),
            file: "missing.tar.gz".into(),
            checksum: Checksum::Sha256("00".into()),
            extract_tar_gz: false,
        };
        let err = download(&agent(false), &src, dir.path(), &mut |_| {}).unwrap_err();
        h.join().unwrap();
        assert!(format!("{err:#}").contains("HTTP 404"), "{err:#}");
    }

    #[test]
    fn dataset_table_is_complete_and_unknown_names_are_refused() {
        for name in DATASETS {
            let ds = dataset(name).unwrap();
            assert!(!ds.sources.is_empty());
            for s in &ds.sources {
                assert!(s.url.starts_with("http"));
                let len = match &s.checksum {
                    Checksum::Sha256(h) => {
                        assert_eq!(h.len(), 64);
                        h
                    }
                    Checksum::Md5(h) => {
                        assert_eq!(h.len(), 32);
                        h
                    }
                };
                assert!(len
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
            }
        }
        let err = dataset("mnist").unwrap_err().to_string();
        assert!(
            err.contains("unknown dataset `mnist`") && err.contains("cifar10"),
            "{err}"
        );
    }

    #[test]
    fn fashion_mnist_checksums_match_the_shared_copy() {
        // ../shared/data/fashion-mnist holds the byte-identical original files: our table must verify them.
        let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/fashion-mnist");
        let ds = dataset("fashion-mnist").unwrap();
        for s in &ds.sources {
            let p = shared.join(&s.file);
            assert_eq!(
                s.checksum.compute(&p).unwrap(),
                s.checksum.expected(),
                "{}",
                p.display()
            );
        }
    }
}
