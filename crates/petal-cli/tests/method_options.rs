//! Method options from the command line: the same option by kept flag, `--set` and a TOML
//! table; refusals with the nearest key; `petal methods`.

mod common;

use common::{golden, petal, stderr, train, words};

#[test]
fn a_method_option_reaches_the_method_the_same_way_by_flag_by_set_and_by_its_toml_table() {
    let d = tempfile::tempdir().unwrap();
    let data = words(d.path());
    let model = golden().join("llama");
    let toml = d.path().join("run.toml");
    std::fs::write(&toml, "[road]\nvariant = \"road_2\"\ngroup_size = 16\n").unwrap();
    let ways: [&[&str]; 3] = [
        &["--road-variant", "road_2", "--group-size", "16"],
        &["--set", "variant=road_2", "--set", "group_size=16"],
        &["--config", toml.to_str().unwrap()],
    ];
    let mut configs = Vec::new();
    for (i, way) in ways.iter().enumerate() {
        let out = d.path().join(format!("run{i}"));
        let mut args = train(
            model.to_str().unwrap(),
            data.to_str().unwrap(),
            out.to_str().unwrap(),
        );
        args.extend(["--method", "road", "--max-steps", "1"]);
        args.extend(way.iter());
        let o = petal(&args);
        assert!(o.status.success(), "{way:?}: {}", stderr(&o));
        let text = std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["variant"], "road_2", "{way:?}: {text}");
        assert_eq!(v["group_size"], 16, "{way:?}: {text}");
        configs.push(v);
    }
    assert!(configs.windows(2).all(|w| w[0] == w[1]), "{configs:?}");
}

#[test]
fn options_of_another_method_and_misspelt_option_keys_are_refused_with_the_nearest_key() {
    let d = tempfile::tempdir().unwrap();
    let data = words(d.path());
    let model = golden().join("llama");
    let out = d.path().join("run");
    let toml = d.path().join("run.toml");
    std::fs::write(&toml, "[road]\nvarient = \"road_2\"\n").unwrap();
    let cases: [(&[&str], &str); 5] = [
        (
            &["--road-variant", "road_2"],
            "--road-variant is an option of --method road, not of --method lora",
        ),
        (
            &["--method", "road", "--set", "varient=road_2"],
            "did you mean `variant`?",
        ),
        (
            &["--method", "road", "--config", toml.to_str().unwrap()],
            "did you mean `variant`?",
        ),
        (
            &["--config", toml.to_str().unwrap()],
            "has a [road] table but --method is lora",
        ),
        (&["--method", "road", "--set", "variant=road_3"], "road_3"),
    ];
    for (extra, want) in cases {
        let mut args = train(
            model.to_str().unwrap(),
            data.to_str().unwrap(),
            out.to_str().unwrap(),
        );
        args.extend(extra.iter());
        let o = petal(&args);
        assert!(!o.status.success(), "{extra:?} must fail");
        let e = stderr(&o);
        assert!(e.contains(want) && e.lines().count() == 1, "{extra:?}: {e}");
        assert!(!out.join("adapter").exists(), "{extra:?}: nothing written");
    }
}

#[test]
fn petal_methods_lists_every_method_with_its_options_and_peft_defaults() {
    let o = petal(&["methods", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), petal_core::registry::METHODS.len());
    let lora = list.iter().find(|m| m["method"] == "lora").unwrap();
    let alpha = lora["options"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["key"] == "lora_alpha")
        .unwrap();
    assert_eq!(alpha["default"], 8.0, "PEFT's default");
    assert_eq!(lora["shared"]["--alpha"], "lora_alpha");
    assert_eq!(lora["variants"][0], "dora");
    let road = petal(&["methods", "road"]);
    let text = String::from_utf8_lossy(&road.stdout);
    assert!(
        text.contains("--set variant=\"road_1\" (--road-variant)"),
        "{text}"
    );
}
