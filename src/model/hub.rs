//! Hugging Face Hub ids (`owner/name` or `owner/name@revision`) to a local snapshot folder.
//!
//! In: a Hub id. Out: the snapshot folder holding `config.json`, `tokenizer.json` and the
//! safetensors weights (pickled `.bin` weights are never fetched). Honours `HF_HOME` (cache
//! location), `HF_ENDPOINT`, `HF_TOKEN` (or the cached token file) and `HF_HUB_OFFLINE=1`
//! (cache only: a missing file is an immediate error, never a network wait). The token is
//! passed to hf-hub and never logged or written anywhere by mlbench.

use std::path::PathBuf;

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// `owner/name` or `owner/name@revision`, with Hub-legal characters.
pub fn is_hub_id(s: &str) -> bool {
    let id = s.split('@').next().unwrap_or(s);
    let mut parts = id.split('/');
    let (Some(a), Some(b), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    ok(a) && ok(b)
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"))
}

/// Fetches (or finds in the cache) the files of a model and returns its snapshot folder.
pub fn fetch(source: &str) -> Result<PathBuf> {
    let (id, revision) = match source.split_once('@') {
        Some((i, r)) => (i.to_string(), r.to_string()),
        None => (source.to_string(), "main".to_string()),
    };
    let repo = Repo::with_revision(id.clone(), RepoType::Model, revision.clone());
    let cache = Cache::from_env();
    let mut got: Vec<PathBuf> = Vec::new();
    if offline() {
        let c = cache.repo(repo);
        let need = |f: &str| {
            c.get(f).ok_or_else(|| Error::MissingFile {
                what: "Hub file in the local cache (HF_HUB_OFFLINE is set)",
                path: cache
                    .path()
                    .join(format!("models--{}", id.replace('/', "--")))
                    .join(f),
            })
        };
        got.push(need("config.json")?);
        got.push(need("tokenizer.json")?);
        match c.get("model.safetensors.index.json") {
            Some(index) => {
                for shard in shards(&index)? {
                    got.push(need(&shard)?);
                }
            }
            None => got.push(need("model.safetensors")?),
        }
    } else {
        let token = std::env::var("HF_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty())
            .or_else(|| cache.token());
        let api = ApiBuilder::from_env()
            .with_token(token)
            .with_progress(false)
            .build()
            .map_err(|e| Error::Invalid(format!("Hugging Face Hub client: {e}")))?;
        let r = api.repo(repo);
        let get = |f: &str| {
            r.get(f).map_err(|e| {
                Error::Invalid(format!("fetching {f} of {id}@{revision} from the Hub: {e}"))
            })
        };
        got.push(get("config.json")?);
        got.push(get("tokenizer.json")?);
        match r.get("model.safetensors.index.json") {
            Ok(index) => {
                for shard in shards(&index)? {
                    got.push(get(&shard)?);
                }
            }
            Err(_) => got.push(get("model.safetensors")?),
        }
    }
    let dir = got[0]
        .parent()
        .map(PathBuf::from)
        .ok_or_else(|| Error::Invalid("Hub cache path has no parent".into()))?;
    tracing::info!(model = %id, revision = %revision, dir = %dir.display(), "model resolved from the Hub cache");
    Ok(dir)
}

fn shards(index: &std::path::Path) -> Result<Vec<String>> {
    Ok(super::load::weight_files(index.parent().unwrap_or(index))?
        .into_iter()
        .filter_map(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_recognised() {
        assert!(is_hub_id("google/gemma-3-270m"));
        assert!(is_hub_id("HuggingFaceTB/SmolLM2-135M@main"));
        assert!(!is_hub_id("models/gemma/extra"));
        assert!(!is_hub_id("./x/y") && !is_hub_id("/abs/path") && !is_hub_id("../a/b"));
        assert!(!is_hub_id("plain"));
    }
}
