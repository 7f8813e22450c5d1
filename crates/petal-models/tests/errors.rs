//! Bad input gets a one-line cause naming the file, field or tensor: no panic.

use candle_core::{DType, Device};
use petal_io::load_model;
use petal_models::Llama;
use std::path::{Path, PathBuf};

fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn load_err(p: &Path) -> String {
    match load_model(p.to_str().unwrap(), DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", p.display()),
        Err(e) => e.to_string(),
    }
}

fn model() -> Llama {
    load_model(
        golden().join("llama").to_str().unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
    .model
}

#[test]
fn a_missing_path_and_a_corrupt_weights_file_are_named() {
    let d = tempfile::tempdir().unwrap();
    assert!(load_err(&d.path().join("nope")).contains("no such file or folder"));
    let m = d.path().join("m");
    copy_dir(&golden().join("llama"), &m);
    std::fs::write(m.join("model.safetensors"), b"garbage").unwrap();
    let e = load_err(&m);
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );
    let g = d.path().join("x.gguf");
    std::fs::write(&g, b"GGUFnotreally").unwrap();
    let e = load_err(&g);
    assert!(
        e.contains("x.gguf") && e.contains("not a valid GGUF"),
        "{e}"
    );
}

#[test]
fn an_unsupported_architecture_names_config_json_and_the_field() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m");
    copy_dir(&golden().join("llama"), &m);
    let cfg = std::fs::read_to_string(m.join("config.json"))
        .unwrap()
        .replace("\"llama\"", "\"gpt_neox\"");
    std::fs::write(m.join("config.json"), cfg).unwrap();
    let e = load_err(&m);
    assert!(
        e.contains("config.json") && e.contains("model_type") && e.contains("gpt_neox"),
        "{e}"
    );
}

#[test]
fn an_absurd_context_is_refused_naming_the_field_before_anything_is_allocated() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m");
    copy_dir(&golden().join("llama"), &m);
    let text = std::fs::read_to_string(m.join("config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    cfg["max_position_embeddings"] = 1_000_000_000_000_000u64.into();
    std::fs::write(m.join("config.json"), cfg.to_string()).unwrap();
    let e = load_err(&m);
    // past the bound of any real model, or (within it) RoPE tables past half the machine
    assert!(
        e.contains("max_position_embeddings")
            && (e.contains("out of range") || e.contains("RoPE tables")),
        "{e}"
    );
}

fn adapter_copy(d: &Path) -> PathBuf {
    let a = d.join("a");
    copy_dir(&golden().join("adapters/llama_lora_qv"), &a);
    a
}

fn edit_config(a: &Path, from: &str, to: &str) {
    let p = a.join("adapter_config.json");
    let text = std::fs::read_to_string(&p).unwrap();
    assert!(text.contains(from), "fixture lacks {from}");
    std::fs::write(&p, text.replace(from, to)).unwrap();
}

#[test]
fn an_adapter_that_does_not_fit_names_the_tensor_and_both_shapes() {
    let d = tempfile::tempdir().unwrap();
    let a = adapter_copy(d.path());
    edit_config(&a, "\"r\": 4", "\"r\": 6");
    let e = petal_io::attach_adapter(&mut model(), &a, "x")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lora_A.weight") && e.contains("[4, 32]") && e.contains("[6, 32]"),
        "{e}"
    );
}

#[test]
fn an_unknown_peft_type_and_a_switched_on_unsupported_feature_are_refused_by_name() {
    let d = tempfile::tempdir().unwrap();
    let a = adapter_copy(d.path());
    edit_config(&a, "\"LORA\"", "\"FOURIERFT\"");
    let e = petal_io::attach_adapter(&mut model(), &a, "x")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("adapter_config.json") && e.contains("peft_type") && e.contains("FOURIERFT"),
        "{e}"
    );
    let a = d.path().join("b");
    copy_dir(&golden().join("adapters/llama_lora_qv"), &a);
    edit_config(&a, "\"fan_in_fan_out\": false", "\"fan_in_fan_out\": true");
    let e = petal_io::attach_adapter(&mut model(), &a, "x")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("fan_in_fan_out") && e.contains("not supported"),
        "{e}"
    );
    let a = d.path().join("c");
    copy_dir(&golden().join("adapters/llama_lora_qv"), &a);
    edit_config(&a, "\"use_qalora\": false", "\"use_qalora\": true");
    let e = petal_io::attach_adapter(&mut model(), &a, "x")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("use_qalora") && e.contains("not supported"),
        "{e}"
    );
}

#[test]
fn an_adapter_with_tensors_for_modules_it_does_not_target_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let a = adapter_copy(d.path());
    edit_config(&a, "\"v_proj\"", "\"k_proj\"");
    let e = petal_io::attach_adapter(&mut model(), &a, "x")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("k_proj.lora_A.weight") && e.contains("missing"),
        "{e}"
    );
}
