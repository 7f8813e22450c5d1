//! The memory check's count of an adapter, made from its config before anything is allocated,
//! against the adapter once built: every PEFT-saved golden adapter holds no more trained values
//! than counted, and a plain LoRA exactly as many.

mod common;
use common::{model, root};
use petal_core::memory::{estimate, MemoryLimit};
use petal_core::AdapterConfig;

#[test]
fn every_golden_adapter_holds_no_more_values_than_its_config_counts() {
    let mut dirs: Vec<_> = std::fs::read_dir(root().join("adapters"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    assert!(dirs.len() > 40, "the golden adapters are missing");
    let mut exact = 0;
    for dir in dirs {
        let name = dir.file_name().unwrap().to_str().unwrap().to_string();
        let base = name.split('_').next().unwrap();
        let text = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
        let cfg = AdapterConfig::from_json(&text, &name).unwrap();
        let mut m = model(base);
        let counted = estimate(&m, &cfg).unwrap().values;
        let (_, report) = petal_io::attach_adapter(&mut m, &dir, "default").unwrap();
        let held = report.params() as u64;
        assert!(held <= counted, "{name}: holds {held}, counted {counted}");
        // (MiCA holds a frozen B the report does not count as trained)
        let plain = cfg.peft_type == "LORA"
            && cfg.get("init_lora_weights") != Some(&"mica".into())
            && cfg.get("use_dora") == Some(&false.into())
            && cfg.get("bias") == Some(&"none".into())
            && cfg.modules_to_save.is_none()
            && cfg.trainable_token_indices.is_none();
        if plain {
            assert_eq!(held, counted, "{name}: a plain LoRA is counted exactly");
            exact += 1;
        }
    }
    assert!(exact >= 5, "{exact} plain LoRA adapters checked exactly");
}

#[test]
fn an_adapter_over_the_limit_is_refused_before_it_is_built() {
    let mut m = model("llama");
    let dir = root().join("adapters/llama_lora_qv");
    let text = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    let mut cfg = AdapterConfig::from_json(&text, "cfg").unwrap();
    cfg.set("r", 1_000_000_000u64).unwrap();
    let limit = MemoryLimit::bytes(1 << 30);
    let e = petal_core::inject_adapter_within(&mut m, "big", &cfg, 0, &limit).unwrap_err();
    let e = e.to_string();
    assert!(
        e.contains("adapter `big` (LORA, r = 1000000000) would need") && e.contains("1.0 GB"),
        "{e}"
    );
    assert!(
        petal_core::walk::adapter_names(&m).is_empty(),
        "nothing attached"
    );
}
