//! The adapter config `petal train` builds from its options: each method's fields as PEFT names
//! them, sized for the loaded model.

use crate::train_cmd::TrainOpts;
use anyhow::{bail, Context, Result};
use petal_core::config::Targets;
use petal_core::AdapterConfig;
use petal_models::LlamaConfig;

/// Default `--target-modules` per method (PEFT's defaults for the Llama family).
pub fn default_targets(method: &str) -> &'static str {
    match method {
        "ia3" => "k_proj,v_proj,down_proj",
        "ln_tuning" => "input_layernorm,post_attention_layernorm,norm",
        _ => "all-linear",
    }
}

pub fn targets(s: &str) -> Targets {
    match s.strip_prefix("re:") {
        Some(r) => Targets::Regex(r.to_string()),
        None if s == "all-linear" => Targets::Regex(s.to_string()),
        None => Targets::List(
            s.split(',')
                .map(|x| x.trim().to_string())
                .filter(|x| !x.is_empty())
                .collect(),
        ),
    }
}

/// The adapter config for `method` (lowercase) on a model with config `mc`.
pub fn adapter_config(o: &TrainOpts, method: &str, mc: &LlamaConfig) -> Result<AdapterConfig> {
    let default_r = if method == "vera" { 256 } else { 8 };
    let mut acfg = AdapterConfig::for_method(
        method,
        o.r.unwrap_or(default_r),
        o.alpha.unwrap_or(16.0),
        targets(
            o.target_modules
                .as_deref()
                .unwrap_or(default_targets(method)),
        ),
    );
    acfg.lora_dropout = o.dropout.unwrap_or(0.0);
    acfg.use_rslora = o.rslora.unwrap_or(false);
    acfg.use_dora = o.dora.unwrap_or(false);
    match o.init.as_deref() {
        None | Some("default") => {}
        Some(_) if method != "lora" => bail!("--init is a LoRA option"),
        Some(i) => {
            acfg.init_lora_weights = petal_core::config::InitWeights::Named(i.to_string());
            acfg.validate("--init")?;
        }
    }
    acfg.exclude_modules = o.exclude_modules.as_deref().map(targets);
    acfg.bias = o.bias.clone().unwrap_or_else(|| "none".into());
    if let Some(t) = &o.trainable_tokens {
        let ids = t
            .split(',')
            .map(|s| s.trim().parse::<u32>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .with_context(|| {
                format!("--trainable-tokens {t:?}: expected a comma list of token ids")
            })?;
        acfg.trainable_token_indices = Some(petal_core::config::TokenIndices::List(ids));
    }
    acfg.modules_to_save = o
        .modules_to_save
        .as_deref()
        .map(|s| s.split(',').map(|p| p.trim().to_string()).collect());
    acfg.decompose_factor = o.decompose_factor.unwrap_or(-1);
    acfg.decompose_both = o.decompose_both.unwrap_or(false);
    acfg.rank_dropout = o.rank_dropout.unwrap_or(0.0);
    acfg.module_dropout = o.module_dropout.unwrap_or(0.0);
    if method == "lokr" && acfg.rank_dropout > 0.0 {
        acfg.rank_dropout_scale = Some(true);
    }
    if method == "ia3" {
        acfg.feedforward_modules = Some(targets(
            o.feedforward_modules.as_deref().unwrap_or("down_proj"),
        ));
    }
    match method {
        "oft" => {
            if o.r.is_none() || o.oft_block_size.is_some() {
                acfg.r = 0;
                acfg.oft_block_size = Some(o.oft_block_size.unwrap_or(32));
            }
            acfg.use_cayley_neumann = Some(!o.exact_cayley.unwrap_or(false));
        }
        "boft" => {
            match o.boft_block_num {
                Some(n) => (acfg.boft_block_num, acfg.boft_block_size) = (Some(n), Some(0)),
                None => {
                    acfg.boft_block_num = Some(0);
                    acfg.boft_block_size = Some(o.boft_block_size.unwrap_or(4));
                }
            }
            acfg.boft_n_butterfly_factor = Some(o.boft_butterfly_factor.unwrap_or(1));
        }
        "road" => {
            acfg.variant = Some(o.road_variant.clone().unwrap_or_else(|| "road_1".into()));
            acfg.group_size = Some(o.group_size.unwrap_or(64));
        }
        "vera" => acfg.vera_dropout = Some(o.dropout.unwrap_or(0.0)),
        "adalora" => {
            let steps = o.max_steps.unwrap_or(100);
            let r = acfg.r;
            acfg.init_r = Some(r);
            acfg.target_r = Some(o.target_r.unwrap_or((2 * r / 3).max(1)));
            acfg.tinit = Some(o.tinit.unwrap_or(steps / 10));
            acfg.tfinal = Some(o.tfinal.unwrap_or(steps / 5));
            acfg.delta_t = Some(o.delta_t.unwrap_or(1));
            acfg.orth_reg_weight = Some(o.orth_reg_weight.unwrap_or(0.5));
            acfg.total_step = Some(steps);
            acfg.lora_dropout = o.dropout.unwrap_or(0.0);
        }
        _ => {}
    }
    if method == "p_tuning" {
        acfg.num_virtual_tokens = Some(o.num_virtual_tokens.unwrap_or(20));
        acfg.token_dim = Some(mc.hidden_size);
        acfg.num_layers = Some(mc.num_hidden_layers);
        acfg.num_attention_heads = Some(mc.num_attention_heads);
        acfg.encoder_hidden_size = Some(o.encoder_hidden_size.unwrap_or(mc.hidden_size));
        acfg.target_modules = None;
        if let Some(e) = &o.encoder {
            let e = e.to_ascii_uppercase();
            if e != "MLP" && e != "LSTM" {
                bail!("--encoder {e:?}: P-tuning's encoders are MLP and LSTM");
            }
            acfg.encoder_reparameterization_type = Some(e);
        }
        if let Some(n) = o.encoder_num_layers {
            acfg.encoder_num_layers = Some(n);
        }
    }
    if method == "prefix_tuning" {
        let c = mc;
        acfg.num_virtual_tokens = Some(o.num_virtual_tokens.unwrap_or(20));
        acfg.token_dim = Some(c.num_key_value_heads * c.head_dim);
        acfg.num_layers = Some(c.num_hidden_layers);
        acfg.num_attention_heads = Some(c.num_key_value_heads);
        acfg.prefix_projection = Some(o.prefix_projection.unwrap_or(false));
        acfg.encoder_hidden_size = o.encoder_hidden_size.or(acfg.token_dim);
        acfg.target_modules = None;
        acfg.init_weights = None;
    }
    if method == "prompt_tuning" {
        acfg.num_virtual_tokens = Some(o.num_virtual_tokens.unwrap_or(20));
        acfg.token_dim = Some(mc.hidden_size);
        acfg.num_layers = Some(mc.num_hidden_layers);
        acfg.num_attention_heads = Some(mc.num_attention_heads);
        acfg.target_modules = None;
        if let Some(t) = &o.prompt_init_text {
            acfg.prompt_tuning_init = Some("TEXT".into());
            acfg.prompt_tuning_init_text = Some(t.clone());
        }
    }
    Ok(acfg)
}
