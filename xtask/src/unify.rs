//! `cargo xtask unify-check`: do the workspace's builds share their compiled dependencies? Cargo compiles a
//! dependency again when its features, or those of anything below it, differ between two builds; that is what
//! crates/dino-workspace-hack prevents. This compares cargo's unit graph (nightly: `--unit-graph`) of
//! `cargo test --workspace` with the other builds of .ci/run and names every dependency they would compile
//! differently. Packages only those builds use (mpi and its build-time bindgen) are not differences.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::process::Command;

/// The reference build (what `.ci/run` compiles first) and the builds that must reuse its dependencies.
const BASE: &[&str] = &["test", "--workspace", "--no-run"];
const OTHERS: &[&[&str]] = &[
    // The README's first command and crates/dino-cli/tests/mpi.rs's two builds.
    &["build", "-p", "dino-cli", "--bin", "dino"],
    &[
        "build",
        "-p",
        "dino-cli",
        "--bin",
        "dino",
        "--features",
        "mpi",
    ],
    // .ci/run's build without the `hub` feature.
    &["test", "-p", "dino-models", "--test", "hub", "--no-run"],
];

/// One build's units: each unit's identity (a hash over what cargo puts in its artifact's name), package id,
/// dependencies, and the build's roots.
struct Graph {
    ids: Vec<u64>,
    pkgs: Vec<String>,
    deps: Vec<Vec<usize>>,
    roots: Vec<usize>,
}

fn unit_graph(root: &Path, args: &[&str]) -> Result<Graph> {
    let out = Command::new("cargo")
        .arg("+nightly")
        .args(args)
        .args(["--unit-graph", "-Z", "unstable-options"])
        .current_dir(root)
        .output()
        .context("cannot run `cargo +nightly` (rustup toolchain install nightly)")?;
    if !out.status.success() {
        bail!(
            "`cargo +nightly {} --unit-graph` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("cargo's unit graph is not JSON")?;
    let units = v["units"]
        .as_array()
        .context("no `units` in the unit graph")?;
    let deps: Vec<Vec<usize>> = units
        .iter()
        .map(|u| {
            u["dependencies"]
                .as_array()
                .map(|d| {
                    d.iter()
                        .filter_map(|d| d["index"].as_u64())
                        .map(|i| i as usize)
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect();
    // Identity: package, target, mode, features, the profile's settings (its name is not part of an artifact's
    // hash: `cargo build` and `cargo test` share dependencies), and the identities of the dependencies.
    fn ident(
        i: usize,
        units: &[Value],
        deps: &[Vec<usize>],
        memo: &mut HashMap<usize, u64>,
    ) -> u64 {
        if let Some(&h) = memo.get(&i) {
            return h;
        }
        let u = &units[i];
        let mut profile = u["profile"].clone();
        if let Some(p) = profile.as_object_mut() {
            p.remove("name");
        }
        let mut sub: Vec<u64> = deps[i]
            .iter()
            .map(|&d| ident(d, units, deps, memo))
            .collect();
        sub.sort_unstable();
        let mut h = DefaultHasher::new();
        (
            u["pkg_id"].to_string(),
            u["target"]["name"].to_string(),
            u["target"]["kind"].to_string(),
            u["mode"].to_string(),
            u["features"].to_string(),
            profile.to_string(),
            sub,
        )
            .hash(&mut h);
        let h = h.finish();
        memo.insert(i, h);
        h
    }
    let mut memo = HashMap::new();
    let ids = (0..units.len())
        .map(|i| ident(i, units, &deps, &mut memo))
        .collect();
    let pkgs = units
        .iter()
        .map(|u| u["pkg_id"].as_str().unwrap_or("").to_string())
        .collect();
    let roots = v["roots"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|i| i.as_u64())
                .map(|i| i as usize)
                .collect()
        })
        .unwrap_or_default();
    Ok(Graph {
        ids,
        pkgs,
        deps,
        roots,
    })
}

/// The dependencies (registry, git, vendored) of `other` that it would compile differently from `base`, reached from its roots
/// without passing through a package `base` does not have.
fn differences(base: &Graph, other: &Graph) -> BTreeSet<String> {
    let base_ids: HashSet<u64> = base.ids.iter().copied().collect();
    let base_pkgs: HashSet<&str> = base.pkgs.iter().map(String::as_str).collect();
    let mut seen = vec![false; other.ids.len()];
    let mut stack = other.roots.clone();
    let mut out = BTreeSet::new();
    while let Some(i) = stack.pop() {
        if std::mem::replace(&mut seen[i], true) || !base_pkgs.contains(other.pkgs[i].as_str()) {
            continue;
        }
        // A workspace member compiles again when its own features differ; a vendored crate (candle-core) must not.
        let member = other.pkgs[i].starts_with("path+") && !other.pkgs[i].contains("/vendor/");
        if !member && !base_ids.contains(&other.ids[i]) {
            out.insert(package_name(&other.pkgs[i]));
        }
        stack.extend(other.deps[i].iter().copied());
    }
    out
}

/// `name@version` of a package id (`registry+...#name@1.0`, or `path+file:///.../name#1.0` for a path crate).
fn package_name(pkg_id: &str) -> String {
    let (source, frag) = pkg_id.rsplit_once('#').unwrap_or(("", pkg_id));
    if frag.contains('@') {
        frag.to_string()
    } else {
        format!("{}@{frag}", source.rsplit('/').next().unwrap_or(source))
    }
}

/// Compares every build of [`OTHERS`] with [`BASE`]; an error names the dependencies that differ.
pub fn run(root: &Path) -> Result<()> {
    let base = unit_graph(root, BASE)?;
    let mut bad = Vec::new();
    for args in OTHERS {
        let diff = differences(&base, &unit_graph(root, args)?);
        let line = format!("cargo {}", args.join(" "));
        if diff.is_empty() {
            eprintln!(
                "unify-check: `{line}` reuses every dependency of `cargo {}`",
                BASE.join(" ")
            );
        } else {
            let names: Vec<String> = diff.into_iter().collect();
            eprintln!("unify-check: `{line}` compiles again: {}", names.join(" "));
            bad.push(line);
        }
    }
    if !bad.is_empty() {
        bail!(
            "{} build(s) compile dependencies again; give crates/dino-workspace-hack those features",
            bad.len()
        );
    }
    Ok(())
}
