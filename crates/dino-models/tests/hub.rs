//! `hf:` references against a local hub cache built in the test (no network here), and the error when the
//! file is absent and the network is unreachable or the offline flag is set. Run both without and with the
//! `hub` feature (`.ci/run` does): the cache-only resolver and hf-hub's must agree.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use dino_models::error::Error;
use dino_models::hub::{resolve, resolve_weights_arg, HubOptions, HubRef};
use dino_models::weights::save_tensors_atomic;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Lay out `<cache>/models--owner--name/{refs/main, blobs/<etag>, snapshots/<commit>/<file> -> blob}` as
/// hf-hub and huggingface_hub do.
fn cache_file(cache: &Path, owner: &str, name: &str, file: &str, bytes: &[u8]) -> PathBuf {
    let repo = cache.join(format!("models--{owner}--{name}"));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    let blob = repo.join("blobs").join(format!("etag{}", bytes.len()));
    std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
    std::fs::write(&blob, bytes).unwrap();
    let snap = repo.join("snapshots").join(COMMIT).join(file);
    std::fs::create_dir_all(snap.parent().unwrap()).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(&blob, &snap).unwrap();
    #[cfg(not(unix))]
    std::fs::copy(&blob, &snap).unwrap();
    snap
}

/// A closed local port: connections are refused at once, standing in for an unreachable network.
const UNREACHABLE: &str = "http://127.0.0.1:9";

fn opts(cache: &Path, offline: bool) -> HubOptions {
    HubOptions {
        cache_dir: Some(cache.to_path_buf()),
        offline,
        revision: None,
        endpoint: Some(UNREACHABLE.to_string()),
    }
}

#[test]
fn parse_references() {
    assert_eq!(HubRef::parse("weights/dino.pth").unwrap(), None);
    let r = HubRef::parse("hf:facebook/dino-vits16").unwrap().unwrap();
    assert_eq!(
        (r.owner.as_str(), r.name.as_str(), r.file.as_deref()),
        ("facebook", "dino-vits16", None)
    );
    let r = HubRef::parse("hf:facebook/dino-vitb8/sub/model.safetensors")
        .unwrap()
        .unwrap();
    assert_eq!(r.file.as_deref(), Some("sub/model.safetensors"));
    assert_eq!(
        r.to_string(),
        "hf:facebook/dino-vitb8/sub/model.safetensors"
    );
    assert_eq!(r.repo_id(), "facebook/dino-vitb8");
    for bad in [
        "hf:",
        "hf:facebook",
        "hf:facebook/",
        "hf:/x",
        "hf:a/b/",
        "hf:a/b/../c",
    ] {
        let err = HubRef::parse(bad).unwrap_err();
        assert!(matches!(err, Error::HubReference { .. }), "{bad}: {err}");
        assert!(err.to_string().contains(bad), "{err}");
    }
}

#[test]
fn resolves_from_a_local_cache_offline_and_when_the_network_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path();
    // A real safetensors file, so the resolved path is loadable.
    let t: BTreeMap<String, Tensor> = [(
        "cls_token".to_string(),
        Tensor::ones((1, 1, 4), DType::F32, &Device::Cpu).unwrap(),
    )]
    .into();
    let src = dir.path().join("src.safetensors");
    save_tensors_atomic(&src, &t).unwrap();
    let bytes = std::fs::read(&src).unwrap();
    let snap = cache_file(
        cache,
        "facebook",
        "dino-vits16",
        "model.safetensors",
        &bytes,
    );

    for offline in [true, false] {
        let p = resolve_weights_arg("hf:facebook/dino-vits16", &opts(cache, offline)).unwrap();
        assert_eq!(p, snap, "offline={offline}");
        let p = resolve_weights_arg(
            "hf:facebook/dino-vits16/model.safetensors",
            &opts(cache, offline),
        )
        .unwrap();
        assert_eq!(p, snap);
    }
    let loaded = candle_core::safetensors::load(&snap, &Device::Cpu).unwrap();
    assert_eq!(loaded["cls_token"].dims(), &[1, 1, 4]);

    // Without a file part, pytorch_model.bin is the fallback when model.safetensors is not there.
    let bin = cache_file(
        cache,
        "facebook",
        "dino-vitb16",
        "pytorch_model.bin",
        b"PK\x03\x04",
    );
    let r = HubRef::parse("hf:facebook/dino-vitb16").unwrap().unwrap();
    assert_eq!(resolve(&r, &opts(cache, true)).unwrap(), bin);

    // A local path is passed through.
    assert_eq!(
        resolve_weights_arg(src.to_str().unwrap(), &opts(cache, true)).unwrap(),
        src
    );
    let err = resolve_weights_arg("/no/such/weights.pth", &opts(cache, true)).unwrap_err();
    assert!(err.to_string().contains("/no/such/weights.pth"), "{err}");
}

#[test]
fn absent_file_error_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub-cache");
    std::fs::create_dir_all(&cache).unwrap();
    for offline in [true, false] {
        let err =
            resolve_weights_arg("hf:facebook/dino-vits8", &opts(&cache, offline)).unwrap_err();
        assert!(
            matches!(err, Error::HubUnavailable { .. }),
            "offline={offline}: {err}"
        );
        let msg = err.to_string();
        for needle in [
            "facebook/dino-vits8",
            "model.safetensors",
            "local weights file path",
            "cargo xtask fetch-weights",
            "HF_HUB_CACHE",
            cache.to_str().unwrap(),
        ] {
            assert!(
                msg.contains(needle),
                "offline={offline}: `{needle}` not in: {msg}"
            );
        }
        if offline {
            assert!(msg.contains("offline"), "{msg}");
        } else if cfg!(feature = "hub") {
            assert!(msg.contains("network unavailable"), "{msg}");
        } else {
            assert!(msg.contains("--features hub"), "{msg}");
        }
    }
    // A file that is cached for another repo does not leak across repos.
    cache_file(&cache, "facebook", "dino-vits16", "model.safetensors", b"x");
    let err = resolve_weights_arg(
        "hf:facebook/dino-vits8/model.safetensors",
        &opts(&cache, true),
    )
    .unwrap_err();
    assert!(matches!(err, Error::HubUnavailable { .. }), "{err}");
}
