//! `hf:owner/name[/file]` weight references, resolved to a local file in the Hugging Face cache layout
//! (`models--owner--name/{refs,snapshots,blobs}`), honouring a cache directory and an offline flag. With the
//! `hub` feature, hf-hub 1.0 downloads what the cache lacks; without it (the default build, which then
//! compiles no HTTP/TLS stack) only the cache is read, and a missing file says how to get it.
//!
//! Without a file part the first of [`DEFAULT_FILES`] that exists is used (`model.safetensors`, then
//! `pytorch_model.bin`). Offline, only the cache is consulted; online, a download is attempted and, when the
//! network is unreachable, hf-hub falls back to the cache. If the file is in neither, the error says what to
//! do: pass a local path, run `cargo xtask fetch-weights`, or set the cache directory.

use std::path::{Path, PathBuf};

#[cfg(feature = "hub")]
use hf_hub::{HFClient, HFClientSync, HFError};

use crate::error::{Error, Result};

/// Files tried, in order, when a reference names no file.
pub const DEFAULT_FILES: [&str; 2] = ["model.safetensors", "pytorch_model.bin"];

/// The prefix that marks a hub reference.
pub const HUB_PREFIX: &str = "hf:";

/// A parsed `hf:owner/name[/file]` reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRef {
    /// Repository owner (`facebook`).
    pub owner: String,
    /// Repository name (`dino-vits16`).
    pub name: String,
    /// File inside the repository (may contain `/`); `None` means [`DEFAULT_FILES`].
    pub file: Option<String>,
}

impl HubRef {
    /// Parse `hf:owner/name` or `hf:owner/name/path/to/file`. Returns `Ok(None)` when `s` does not start with
    /// `hf:` (it is then a local path).
    pub fn parse(s: &str) -> Result<Option<Self>> {
        let Some(rest) = s.strip_prefix(HUB_PREFIX) else {
            return Ok(None);
        };
        let bad = |reason: &str| Error::HubReference {
            // Control characters (a newline pasted with the reference) are shown escaped.
            reference: s.escape_debug().to_string(),
            reason: reason.to_string(),
        };
        let mut parts = rest.splitn(3, '/');
        let owner = parts.next().unwrap_or_default();
        let name = parts.next().unwrap_or_default();
        let file = parts.next();
        if owner.is_empty() {
            return Err(bad("the owner is empty"));
        }
        if name.is_empty() {
            return Err(bad("the repository name is empty"));
        }
        let file = match file {
            None => None,
            Some("") => return Err(bad("the file name is empty")),
            Some(f) if f.split('/').any(|c| c.is_empty() || c == "..") => {
                return Err(bad("the file path has an empty or `..` component"))
            }
            Some(f) => Some(f.to_string()),
        };
        Ok(Some(Self {
            owner: owner.to_string(),
            name: name.to_string(),
            file,
        }))
    }

    /// The files to look for: the named one, else [`DEFAULT_FILES`] in order.
    pub fn candidates(&self) -> Vec<&str> {
        match &self.file {
            Some(f) => vec![f.as_str()],
            None => DEFAULT_FILES.to_vec(),
        }
    }

    /// `owner/name`.
    pub fn repo_id(&self) -> String {
        format!("{}/{}", self.owner, self.name)
    }
}

impl std::fmt::Display for HubRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{HUB_PREFIX}{}/{}", self.owner, self.name)?;
        if let Some(file) = &self.file {
            write!(f, "/{file}")?;
        }
        Ok(())
    }
}

/// How to resolve hub references.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubOptions {
    /// Hub cache directory. Default (`None`): hf-hub's default, `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
    /// `~/.cache/huggingface/hub`.
    pub cache_dir: Option<PathBuf>,
    /// Never use the network; resolve from the cache only. Default: false. (hf-hub 1.0 reads no
    /// `HF_HUB_OFFLINE` variable; [`HubOptions::offline_from_env`] does.)
    pub offline: bool,
    /// Revision (branch, tag or commit). Default (`None`): `main`.
    pub revision: Option<String>,
    /// Hub endpoint. Default (`None`): hf-hub's default (`HF_ENDPOINT`, else `https://huggingface.co`).
    pub endpoint: Option<String>,
}

impl HubOptions {
    /// True if the `HF_HUB_OFFLINE` environment variable is set to `1`, `true` or `yes` (case-insensitive).
    pub fn offline_from_env() -> bool {
        std::env::var("HF_HUB_OFFLINE")
            .map(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                )
            })
            .unwrap_or(false)
    }
}

/// Resolve a weights argument: a local path is returned unchanged (it must exist), an `hf:` reference is
/// resolved with [`resolve`].
pub fn resolve_weights_arg(arg: &str, opts: &HubOptions) -> Result<PathBuf> {
    match HubRef::parse(arg)? {
        Some(r) => resolve(&r, opts),
        None => {
            let p = PathBuf::from(arg);
            if p.is_file() {
                Ok(p)
            } else {
                Err(Error::Unreadable {
                    path: p,
                    reason: "no such file (weights are a local path or an `hf:owner/name[/file]` reference)"
                        .into(),
                })
            }
        }
    }
}

/// Resolve `r` to a local file (downloading it into the cache unless offline).
#[cfg(feature = "hub")]
pub fn resolve(r: &HubRef, opts: &HubOptions) -> Result<PathBuf> {
    let mut builder = HFClient::builder().retry_max_attempts(1);
    if let Some(dir) = &opts.cache_dir {
        builder = builder.cache_dir(dir.clone());
    }
    if let Some(ep) = &opts.endpoint {
        builder = builder.endpoint(ep.clone());
    }
    let repo_id = r.repo_id();
    let hub_err = |file: &str, reason: String| Error::Hub {
        repo: repo_id.clone(),
        file: file.to_string(),
        reason,
    };
    let first = r.file.as_deref().unwrap_or(DEFAULT_FILES[0]);
    let client = builder.build().map_err(|e| hub_err(first, e.to_string()))?;
    let cache_dir = client.cache_dir().to_path_buf();
    let client = HFClientSync::from_inner(client).map_err(|e| hub_err(first, e.to_string()))?;
    let repo = client.model(r.owner.clone(), r.name.clone());
    let candidates = r.candidates();
    let mut unavailable: Option<String> = None;
    let mut last_err: Option<Error> = None;
    for file in &candidates {
        let res = repo
            .download_file()
            .filename(file.to_string())
            .maybe_revision(opts.revision.clone())
            .local_files_only(opts.offline)
            .send();
        match res {
            Ok(p) => return Ok(p),
            // Not in the cache and no network (or offline): another candidate may still be cached.
            Err(e @ (HFError::LocalEntryNotFound { .. } | HFError::Request { .. })) => {
                if unavailable.is_none() {
                    unavailable = Some(if opts.offline {
                        "offline mode: only the local cache was searched".to_string()
                    } else {
                        format!("network unavailable: {e}")
                    });
                }
            }
            // The repository has no such file: try the next candidate.
            Err(e @ HFError::EntryNotFound { .. }) => last_err = Some(hub_err(file, e.to_string())),
            Err(e) => return Err(hub_err(file, e.to_string())),
        }
    }
    if let Some(reason) = unavailable {
        return Err(Error::HubUnavailable {
            repo: repo_id,
            file: candidates.join("` or `"),
            cache_dir,
            reason,
        });
    }
    Err(last_err.unwrap_or_else(|| hub_err(candidates[0], "no candidate file".into())))
}

/// The hub cache directory hf-hub and huggingface_hub use by default: `HF_HUB_CACHE`, else `$HF_HOME/hub`,
/// else `~/.cache/huggingface/hub`.
pub fn default_cache_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("HF_HUB_CACHE")
        .or_else(|| env("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| env("HOME").map(|h| h.join(".cache/huggingface/hub")))
        .unwrap_or_else(|| PathBuf::from(".cache/huggingface/hub"))
}

/// Resolve `r` from the local cache only (this build has no downloader: the `hub` feature is off). The
/// revision (default `main`) is looked up in `refs/`, or used as the snapshot name when it is a commit.
#[cfg(not(feature = "hub"))]
pub fn resolve(r: &HubRef, opts: &HubOptions) -> Result<PathBuf> {
    let cache_dir = opts.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let folder = repo_cache_folder(&cache_dir, r);
    let revision = opts.revision.as_deref().unwrap_or("main");
    let commit = std::fs::read_to_string(folder.join("refs").join(revision))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| revision.to_string());
    let candidates = r.candidates();
    if !commit.contains('/') && !commit.contains("..") {
        for file in &candidates {
            let p = folder.join("snapshots").join(&commit).join(file);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(Error::HubUnavailable {
        repo: r.repo_id(),
        file: candidates.join("` or `"),
        cache_dir,
        reason: if opts.offline {
            "offline mode: only the local cache was searched".to_string()
        } else {
            "this dino was built without downloads (rebuild with `--features hub` to fetch from the hub), so \
             only the local cache was searched"
                .to_string()
        },
    })
}

/// The path hf-hub uses for the cache folder of a model repository: `<cache>/models--owner--name`.
pub fn repo_cache_folder(cache_dir: &Path, r: &HubRef) -> PathBuf {
    cache_dir.join(format!("models--{}--{}", r.owner, r.name))
}
