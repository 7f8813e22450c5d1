//! petal's logits against golden logits made by the real transformers 5.24 + PEFT 0.21.2
//! (tools/golden/make_fixtures.py): base models and PEFT-saved LoRA adapters.

mod common;
use candle_core::{DType, Device, Tensor};
use common::{model, root};
use petal_core::inject::set_active;
use petal_core::{Adaptable, ParamCount};
use petal_models::Llama;
use petal_ops::testing::max_rel;
use std::collections::HashMap;

fn golden() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(root().join("logits.safetensors"), &Device::Cpu).unwrap()
}

fn logits(m: &Llama) -> Tensor {
    let ids = golden()["input_ids"].to_dtype(DType::U32).unwrap();
    m.forward(&ids, None, &petal_core::Ctx::eval()).unwrap()
}

fn assert_close(m: &Llama, key: &str) {
    let want = &golden()[key];
    let got = logits(m);
    assert_eq!(got.dims(), want.dims());
    let e = max_rel(&got, want);
    assert!(e < 1e-4, "{key}: relative error {e:e}");
}

fn with_adapter(base: &str, adapter: &str) -> Llama {
    let mut m = model(base);
    petal_io::attach_adapter(&mut m, &root().join("adapters").join(adapter), "default").unwrap();
    m
}

#[test]
fn llama_base_logits_match_transformers_with_gqa_untied_head_and_llama3_rope() {
    assert_close(&model("llama"), "llama.base");
}

#[test]
fn qwen2_base_logits_match_transformers_with_qkv_bias_and_tied_head() {
    assert_close(&model("qwen2"), "qwen2.base");
}

#[test]
fn peft_lora_on_q_and_v_with_alpha_twice_r_matches_peft() {
    assert_close(&with_adapter("llama", "llama_lora_qv"), "llama_lora_qv");
}

#[test]
fn peft_rslora_on_all_linear_matches_peft() {
    assert_close(
        &with_adapter("llama", "llama_rslora_all_linear"),
        "llama_rslora_all_linear",
    );
}

#[test]
fn peft_lora_with_a_regex_target_matches_peft() {
    assert_close(
        &with_adapter("llama", "llama_lora_regex"),
        "llama_lora_regex",
    );
}

#[test]
fn peft_lora_with_exclude_modules_rank_and_alpha_patterns_matches_peft() {
    assert_close(
        &with_adapter("llama", "llama_lora_exclude_patterns"),
        "llama_lora_exclude_patterns",
    );
}

#[test]
fn peft_lora_restricted_by_layers_to_transform_matches_peft() {
    assert_close(
        &with_adapter("llama", "llama_lora_layers"),
        "llama_lora_layers",
    );
}

#[test]
fn peft_lora_on_qwen2_with_bias_and_tied_head_matches_peft() {
    assert_close(
        &with_adapter("qwen2", "qwen2_lora_all_linear"),
        "qwen2_lora_all_linear",
    );
}

#[test]
fn two_adapters_match_peft_with_one_active_and_with_both_active() {
    let mut m = model("qwen2");
    let a = root().join("adapters");
    petal_io::attach_adapter(&mut m, &a.join("qwen2_lora_all_linear"), "a").unwrap();
    petal_io::attach_adapter(&mut m, &a.join("qwen2_lora_second"), "b").unwrap();
    set_active(&mut m, &["b"]);
    assert_close(&m, "qwen2_two_adapters.b");
    set_active(&mut m, &["a", "b"]);
    assert_close(&m, "qwen2_two_adapters.ab");
}

#[test]
fn trainable_and_total_parameters_equal_peft_counts() {
    let text = std::fs::read_to_string(root().join("param_counts.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut m = model("llama");
    let cfg = petal_core::AdapterConfig::lora(
        8,
        16.0,
        petal_core::config::Targets::Regex("all-linear".into()),
    );
    petal_core::inject_adapter(&mut m, "default", &cfg, 0).unwrap();
    let c = ParamCount::of(&m);
    let want = &v["llama_r8_all_linear"];
    assert_eq!(c.trainable as u64, want["trainable"].as_u64().unwrap());
    assert_eq!(c.total as u64, want["total"].as_u64().unwrap());
    // and by formula: r * (in + out) summed over the 14 targeted linears
    let by_formula: usize = m
        .linears()
        .iter()
        .filter(|l| l.path() != "lm_head" && !l.is_embedding())
        .map(|l| 8 * (l.in_features() + l.out_features()))
        .sum();
    assert_eq!(c.trainable, by_formula);
}

#[test]
fn peft_loha_on_all_linear_with_a_rank_pattern_matches_peft() {
    assert_close(
        &with_adapter("llama", "llama_loha_all_linear"),
        "llama_loha_all_linear",
    );
}

#[test]
fn peft_loha_on_qwen2_q_and_v_matches_peft() {
    assert_close(&with_adapter("qwen2", "qwen2_loha_qv"), "qwen2_loha_qv");
}

#[test]
fn mistral_base_logits_match_transformers_with_a_single_kv_head() {
    assert_close(&model("mistral"), "mistral.base");
}

#[test]
fn peft_lokr_with_a_low_rank_right_factor_matches_peft() {
    assert_close(
        &with_adapter("llama", "llama_lokr_all_linear"),
        "llama_lokr_all_linear",
    );
}

#[test]
fn peft_lokr_with_a_full_right_factor_matches_peft() {
    assert_close(
        &with_adapter("llama", "llama_lokr_full_w2"),
        "llama_lokr_full_w2",
    );
}

#[test]
fn peft_lokr_with_decompose_both_and_a_decompose_factor_matches_peft() {
    assert_close(
        &with_adapter("qwen2", "qwen2_lokr_decompose_both"),
        "qwen2_lokr_decompose_both",
    );
}

#[test]
fn peft_ia3_scaling_outputs_and_feedforward_inputs_matches_peft() {
    assert_close(&with_adapter("llama", "llama_ia3"), "llama_ia3");
}

#[test]
fn peft_ia3_on_qwen2_scaling_biased_outputs_matches_peft() {
    assert_close(&with_adapter("qwen2", "qwen2_ia3"), "qwen2_ia3");
}

#[test]
fn peft_dora_with_perturbed_magnitudes_matches_peft() {
    assert_close(&with_adapter("llama", "llama_dora"), "llama_dora");
}

#[test]
fn peft_dora_on_a_biased_projection_matches_peft() {
    assert_close(&with_adapter("qwen2", "qwen2_dora"), "qwen2_dora");
}

#[test]
fn peft_prompt_tuning_prepends_virtual_tokens_exactly_as_peft_does() {
    assert_close(
        &with_adapter("llama", "llama_prompt_tuning"),
        "llama_prompt_tuning",
    );
}

#[test]
fn peft_prompt_tuning_on_qwen2_matches_peft() {
    assert_close(
        &with_adapter("qwen2", "qwen2_prompt_tuning"),
        "qwen2_prompt_tuning",
    );
}

#[test]
fn peft_ln_tuning_with_trained_norm_copies_matches_peft() {
    assert_close(&with_adapter("llama", "llama_ln_tuning"), "llama_ln_tuning");
}

#[test]
fn peft_oft_with_cayley_neumann_blocks_on_all_linear_matches_peft() {
    assert_close(
        &with_adapter("llama", "llama_oft_neumann"),
        "llama_oft_neumann",
    );
}

#[test]
fn peft_oft_with_the_exact_cayley_transform_matches_peft() {
    assert_close(&with_adapter("qwen2", "qwen2_oft_exact"), "qwen2_oft_exact");
}

#[test]
fn peft_oft_with_one_shared_block_and_seven_series_terms_matches_peft() {
    assert_close(
        &with_adapter("llama", "llama_oft_block_share"),
        "llama_oft_block_share",
    );
}

#[test]
fn peft_boft_with_one_butterfly_factor_and_output_scales_matches_peft() {
    assert_close(&with_adapter("llama", "llama_boft"), "llama_boft");
}

#[test]
fn peft_boft_with_two_butterfly_factors_on_biased_projections_matches_peft() {
    assert_close(
        &with_adapter("qwen2", "qwen2_boft_butterfly"),
        "qwen2_boft_butterfly",
    );
}

#[test]
fn peft_road_variant_1_on_all_linear_matches_peft() {
    assert_close(&with_adapter("llama", "llama_road_1"), "llama_road_1");
}

#[test]
fn peft_road_variant_2_on_biased_projections_matches_peft() {
    assert_close(&with_adapter("qwen2", "qwen2_road_2"), "qwen2_road_2");
}

#[test]
fn peft_road_variant_4_matches_peft() {
    assert_close(&with_adapter("llama", "llama_road_4"), "llama_road_4");
}

#[test]
fn peft_vera_with_shared_projections_matches_peft() {
    assert_close(&with_adapter("llama", "llama_vera"), "llama_vera");
}

#[test]
fn peft_vera_on_all_linear_with_a_prng_key_matches_peft() {
    assert_close(
        &with_adapter("qwen2", "qwen2_vera_all_linear"),
        "qwen2_vera_all_linear",
    );
}

#[test]
fn peft_pissa_adapter_rebuilds_the_svd_residual_of_the_base_and_matches_peft() {
    assert_close(&with_adapter("llama", "llama_pissa"), "llama_pissa");
}

#[test]
fn peft_olora_adapter_rebuilds_the_qr_residual_of_the_base_and_matches_peft() {
    assert_close(&with_adapter("qwen2", "qwen2_olora"), "qwen2_olora");
}

#[test]
fn peft_pissa_with_dora_takes_the_magnitude_over_the_residual_base_and_matches_peft() {
    assert_close(
        &with_adapter("llama", "llama_pissa_dora"),
        "llama_pissa_dora",
    );
}

#[test]
fn peft_olora_with_dora_matches_peft() {
    assert_close(
        &with_adapter("qwen2", "qwen2_olora_dora"),
        "qwen2_olora_dora",
    );
}

#[test]
fn peft_dora_with_trained_biases_adds_them_outside_the_magnitude_and_matches_peft() {
    assert_close(&with_adapter("qwen2", "qwen2_dora_bias"), "qwen2_dora_bias");
}

#[test]
fn peft_prefix_tuning_with_grouped_query_key_value_prefixes_matches_peft() {
    assert_close(
        &with_adapter("llama", "llama_prefix_tuning"),
        "llama_prefix_tuning",
    );
}

#[test]
fn peft_prefix_tuning_on_a_single_kv_head_model_matches_peft() {
    assert_close(
        &with_adapter("mistral", "mistral_prefix_tuning"),
        "mistral_prefix_tuning",
    );
}

#[test]
fn peft_prefix_tuning_trained_through_a_projection_loads_from_its_saved_output() {
    assert_close(
        &with_adapter("qwen2", "qwen2_prefix_projection"),
        "qwen2_prefix_projection",
    );
}

#[test]
fn prefix_tuning_with_a_kv_cache_decodes_exactly_like_the_full_forward() {
    let m = with_adapter("llama", "llama_prefix_tuning");
    let ids = golden()["input_ids"].to_dtype(DType::U32).unwrap();
    let full = m.forward(&ids, None, &petal_core::Ctx::eval()).unwrap();
    let mut cache = m.new_cache();
    let head = m
        .forward(
            &ids.narrow(1, 0, 5).unwrap(),
            Some(&mut cache),
            &petal_core::Ctx::eval(),
        )
        .unwrap();
    let tail = m
        .forward(
            &ids.narrow(1, 5, 3).unwrap(),
            Some(&mut cache),
            &petal_core::Ctx::eval(),
        )
        .unwrap();
    let stepwise = Tensor::cat(&[head, tail], 1).unwrap();
    assert!(max_rel(&stepwise, &full) < 1e-5);
}

#[test]
fn peft_p_tuning_adapter_loads_as_its_encoder_output_and_matches_peft() {
    assert_close(&with_adapter("llama", "llama_p_tuning"), "llama_p_tuning");
}

#[test]
fn peft_p_tuning_lstm_adapter_loads_as_its_encoder_output_and_matches_peft() {
    assert_close(
        &with_adapter("llama", "llama_p_tuning_lstm"),
        "llama_p_tuning_lstm",
    );
}

#[test]
fn p_tuning_lstm_encoder_with_torchs_tensors_gives_torchs_output() {
    let want = candle_core::safetensors::load(
        root().join("p_tuning_lstm_encoder.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut m = model("llama");
    let mut cfg = petal_core::AdapterConfig::for_method(
        "p_tuning",
        1,
        1.0,
        petal_core::config::Targets::List(vec![]),
    );
    cfg.set("num_virtual_tokens", Some(5)).unwrap();
    cfg.set("encoder_hidden_size", Some(8)).unwrap();
    cfg.set("encoder_reparameterization_type", "LSTM").unwrap();
    cfg.set("encoder_num_layers", Some(2)).unwrap();
    cfg.target_modules = None;
    petal_core::inject_adapter(&mut m, "default", &cfg, 0).unwrap();
    let (_, enc) = m.input_adapter().unwrap();
    let tensors = enc.tensors();
    assert_eq!(tensors.len(), want.len() - 1, "torch's tensor set");
    for t in tensors {
        t.var.set(&want[t.name]).unwrap();
    }
    let got = enc.embeddings().unwrap().unwrap();
    let e = max_rel(&got, &want["output"]);
    assert!(e < 1e-5, "relative error {e:e}");
}

#[test]
fn peft_lora_with_the_head_in_modules_to_save_matches_peft() {
    assert_close(
        &with_adapter("llama", "llama_lora_head_to_save"),
        "llama_lora_head_to_save",
    );
}

#[test]
fn peft_ia3_with_a_tied_head_in_modules_to_save_matches_peft() {
    assert_close(
        &with_adapter("qwen2", "qwen2_ia3_tied_head_to_save"),
        "qwen2_ia3_tied_head_to_save",
    );
}

#[test]
fn peft_lora_with_the_token_embedding_in_modules_to_save_matches_peft() {
    assert_close(
        &with_adapter("llama", "llama_lora_embed_to_save"),
        "llama_lora_embed_to_save",
    );
}

#[test]
fn peft_modules_to_save_on_a_tied_embedding_leaves_the_head_on_the_original_table_as_peft() {
    assert_close(
        &with_adapter("qwen2", "qwen2_lora_tied_embed_to_save"),
        "qwen2_lora_tied_embed_to_save",
    );
}

#[test]
fn parameter_counts_with_a_head_in_modules_to_save_equal_peft_counts() {
    let text = std::fs::read_to_string(root().join("param_counts.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut m = model("llama");
    let mut cfg = petal_core::AdapterConfig::lora(
        8,
        16.0,
        petal_core::config::Targets::Regex("all-linear".into()),
    );
    cfg.modules_to_save = Some(vec!["lm_head".into()]);
    petal_core::inject_adapter(&mut m, "default", &cfg, 0).unwrap();
    let c = ParamCount::of(&m);
    let want = &v["llama_r8_all_linear_head_to_save"];
    assert_eq!(c.trainable as u64, want["trainable"].as_u64().unwrap());
    assert_eq!(c.total as u64, want["total"].as_u64().unwrap());
}

#[test]
fn peft_lora_with_all_biases_trained_matches_peft() {
    assert_close(
        &with_adapter("qwen2", "qwen2_lora_bias_all"),
        "qwen2_lora_bias_all",
    );
}

#[test]
fn peft_lora_with_the_adapted_modules_biases_trained_matches_peft() {
    assert_close(
        &with_adapter("qwen2", "qwen2_lora_bias_lora_only"),
        "qwen2_lora_bias_lora_only",
    );
}

#[test]
fn peft_adalora_svd_triplets_match_peft() {
    assert_close(&with_adapter("qwen2", "qwen2_adalora"), "qwen2_adalora");
}

#[test]
fn peft_adalora_trained_with_rank_masks_loads_cut_to_the_kept_ranks_and_matches_peft() {
    assert_close(
        &with_adapter("llama", "llama_adalora_trained"),
        "llama_adalora_trained",
    );
}

#[test]
fn peft_lora_on_the_token_embedding_matches_peft() {
    assert_close(
        &with_adapter("llama", "llama_lora_embedding"),
        "llama_lora_embedding",
    );
}

#[test]
fn peft_lora_on_a_tied_token_embedding_adapts_the_input_side_only_as_peft_does() {
    assert_close(
        &with_adapter("qwen2", "qwen2_lora_embedding_tied"),
        "qwen2_lora_embedding_tied",
    );
}

#[test]
fn peft_trainable_token_rows_next_to_lora_match_peft() {
    assert_close(
        &with_adapter("llama", "llama_lora_trainable_tokens"),
        "llama_lora_trainable_tokens",
    );
}

#[test]
fn peft_trainable_token_rows_also_change_a_tied_head_as_in_peft() {
    assert_close(
        &with_adapter("qwen2", "qwen2_lora_trainable_tokens_tied"),
        "qwen2_lora_trainable_tokens_tied",
    );
}

/// Every PEFT-saved golden adapter (54 folders, of every PEFT method petal implements), loaded
/// and saved again by petal, is PEFT's file: the same keys, bitwise the same tensors, the same
/// config values (a field petal leaves out held PEFT's default in PEFT's file).
#[test]
fn every_golden_adapter_saved_again_is_the_file_peft_saved() {
    let dir = root().join("adapters");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(names.len(), 54);
    let peft_defaults: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("peft_defaults.json")).unwrap())
            .unwrap();
    let mut bad = Vec::new();
    for name in &names {
        let base = ["llama", "qwen2", "mistral"]
            .into_iter()
            .find(|b| name.starts_with(&format!("{b}_")))
            .unwrap();
        let mut m = model(base);
        let folder = dir.join(name);
        let (cfg, _) = petal_io::attach_adapter(&mut m, &folder, "default").unwrap();
        let out = tempfile::tempdir().unwrap();
        petal_io::save_model_adapter(&m, "default", &cfg, out.path()).unwrap();
        let load = |d: &std::path::Path| {
            candle_core::safetensors::load(d.join("adapter_model.safetensors"), &Device::Cpu)
                .unwrap()
        };
        let (mut want, got) = (load(&folder), load(out.path()));
        // PEFT also saves a copy of the frozen embedding a LoRA targets (its
        // save_embedding_layers="auto", for resized vocabularies); petal leaves the base out,
        // and PEFT loads such a file onto the model's own (tools/golden/check_petal_adapters.py)
        want.retain(|k, _| !k.ends_with("embed_tokens.base_layer.weight"));
        let mut wk: Vec<&String> = want.keys().collect();
        let mut gk: Vec<&String> = got.keys().collect();
        wk.sort();
        gk.sort();
        if wk != gk {
            bad.push(format!("{name}: keys {wk:?} vs petal's {gk:?}"));
            continue;
        }
        for (k, w) in &want {
            let g = &got[k];
            let flat = |t: &Tensor| -> Vec<u32> {
                let v: Vec<f32> = t
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                v.iter().map(|x| x.to_bits()).collect()
            };
            let same = g.dims() == w.dims() && g.dtype() == w.dtype() && flat(g) == flat(w);
            if !same {
                bad.push(format!("{name}: tensor {k} differs"));
            }
        }
        let json = |d: &std::path::Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(d.join("adapter_config.json")).unwrap())
                .unwrap()
        };
        let (wc, gc) = (json(&folder), json(out.path()));
        // a field petal leaves out takes PEFT's default when PEFT loads the file: PEFT's file
        // must hold that default there (tools/golden/make_peft_defaults.py)
        let peft_type = wc["peft_type"].as_str().unwrap();
        let defaults = &peft_defaults[peft_type];
        for (k, v) in wc.as_object().unwrap() {
            match gc.get(k) {
                // an AdaLoRA never allocated: PEFT resizes by nothing for null and {} alike
                Some(g) if k == "rank_pattern" && v.is_null() && g == &serde_json::json!({}) => {}
                Some(g) if g != v => bad.push(format!("{name}: config {k}: PEFT {v} vs petal {g}")),
                Some(_) => {}
                // written by PEFT's save, not a setting
                None if k == "auto_mapping" => {}
                None => match defaults.get(k) {
                    Some(d) if d == v => {}
                    d => bad.push(format!(
                        "{name}: config {k}: PEFT {v}, petal leaves it out (default {d:?})"
                    )),
                },
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} differences:\n{}",
        bad.len(),
        bad.join("\n")
    );
}
