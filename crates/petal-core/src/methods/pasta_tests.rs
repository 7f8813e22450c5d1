use super::*;

fn table(special: &[u32], occurrence: bool, slots: usize) -> SpecialTokens {
    SpecialTokens {
        table: Var::from_tensor(&Tensor::zeros((1, slots, 2), DType::F32, &Device::Cpu).unwrap())
            .unwrap(),
        special: special.to_vec(),
        occurrence,
    }
}

#[test]
fn token_slots_follow_the_id_and_occurrence_slots_the_count_clipped_to_the_last() {
    let ids = [2u32, 7, 3, 9, 3, 3];
    let by_id = table(&[2, 3], false, 2).row_slots(&ids, 2);
    assert_eq!(by_id, [Some(0), None, Some(1), None, Some(1), Some(1)]);
    let by_count = table(&[2, 3], true, 3).row_slots(&ids, 3);
    assert_eq!(by_count, [Some(0), None, Some(1), None, Some(2), Some(2)]);
}

#[test]
fn a_row_without_special_tokens_gets_no_shift_and_occurrence_slots_refuse_a_cache() {
    let t = table(&[2, 3], false, 2);
    let ids = Tensor::new(&[[5u32, 6, 7]], &Device::Cpu).unwrap();
    assert!(t.token_slots(&ids, 0).unwrap().is_none());
    let e = table(&[2, 3], true, 3)
        .token_slots(&ids, 4)
        .unwrap_err()
        .to_string();
    assert!(e.contains("slots = token"), "{e}");
}

#[test]
fn bad_options_are_refused_naming_the_key() {
    for (key, v, want) in [
        ("special_tokens", serde_json::json!([]), "is empty"),
        ("slots", serde_json::json!("every"), "token or occurrence"),
    ] {
        let mut c = AdapterConfig::new("PASTA").unwrap();
        c.set("special_tokens", [1]).unwrap();
        c.set(key, v).unwrap();
        let e = c.validate("adapter_config.json").unwrap_err().to_string();
        assert!(
            e.contains(&format!("`{key}`")) && e.contains(want),
            "{key}: {e}"
        );
    }
    let mut c = AdapterConfig::new("PASTA").unwrap();
    c.set("slots", "occurrence").unwrap();
    c.set("num_slots", 0).unwrap();
    let e = c.validate("adapter_config.json").unwrap_err().to_string();
    assert!(e.contains("`num_slots`"), "{e}");
}
