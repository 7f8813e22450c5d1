use super::*;
use crate::adapter::TrainingHook;
use candle_core::DType;
use std::collections::HashMap;

fn prompts() -> KvPrompts {
    let dev = Device::Cpu;
    let p = Tensor::arange(0f32, 24.0, &dev)
        .unwrap()
        .reshape((4, 6))
        .unwrap();
    let s = Tensor::ones((2, 1, 3, 4), DType::F32, &dev).unwrap();
    KvPrompts::new(&p, &s, 3).unwrap()
}

fn hook(k: &KvPrompts, o: KvPromptOptions) -> Pruning {
    let n = k.prompts.as_tensor().dim(0).unwrap();
    Pruning {
        state: k.state.clone(),
        prompts: k.prompts.clone(),
        slots: k.slots.clone(),
        initial: (k.initial.0.clone(), k.initial.1.clone()),
        step: 2,
        o,
        token_score: vec![0.0; n],
        segment_score: vec![vec![0.0; k.segments]; n],
        seen: 0,
        report: None,
    }
}

/// Scores from gradients: token i's is |Σ e g| over the token, a piece's over the piece
/// (feature d in piece d mod 3); after `prune_step` steps the most important half of the tokens
/// stays, each loses its least important piece, and the prompts and slots go back to their
/// initial values.
#[test]
fn pruning_keeps_the_most_important_tokens_zeroes_the_weakest_pieces_and_rewinds() {
    let k = prompts();
    let o = KvPromptOptions {
        token_prune: 0.5,
        segments: 3,
        segment_prune: 0.2,
        ..Default::default()
    };
    let mut h = hook(&k, o);
    // gradients: token 0 none, token 1 small, tokens 2 and 3 large; piece 1 of token 3
    // (features 1 and 4) none
    let g: Vec<f32> = (0..24)
        .map(|i| match (i / 6, (i % 6) % 3) {
            (0, _) => 0.0,
            (1, _) => 0.01,
            (3, 1) => 0.0,
            _ => 1.0,
        })
        .collect();
    let g = Tensor::from_vec(g, (4, 6), &Device::Cpu).unwrap();
    let grad_of = |_: &Var| Some(g.clone());
    let toy = crate::testing::adapted(
        &AdapterConfig::lora(2, 4.0, crate::testing::toy_targets()),
        false,
    );
    h.after_step(&toy, 0, &grad_of).unwrap();
    // moved away from the initial values, as training would
    k.prompts
        .set(&(k.prompts.as_tensor() * 2.0).unwrap())
        .unwrap();
    h.after_step(&toy, 1, &grad_of).unwrap();
    assert!(h.reset_optimizer_after(1) && !h.reset_optimizer_after(0));
    let kept = k.kept().unwrap();
    assert_eq!(kept.tokens, [2, 3]);
    assert_eq!(k.num_virtual_tokens(), 2);
    // round(0.2 * 3) = 1 piece per kept token: token 2's smallest sum of e (piece 0: 12 + 15),
    // token 3's piece without gradient (piece 1)
    let mask: Vec<Vec<f32>> = kept.mask.unwrap().to_vec2().unwrap();
    assert_eq!(mask[2], [0.0, 1.0, 1.0, 0.0, 1.0, 1.0]);
    assert_eq!(mask[3], [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]);
    let emb: Vec<Vec<f32>> = k.embeddings().unwrap().unwrap().to_vec2().unwrap();
    assert_eq!(
        emb[0],
        [0.0, 13.0, 14.0, 0.0, 16.0, 17.0],
        "rewound token 2, a piece zeroed"
    );
    assert_eq!(
        emb[1],
        [18.0, 0.0, 20.0, 21.0, 0.0, 23.0],
        "token 3, a piece zeroed"
    );
    // the saved form: the kept tokens alone, nothing left to prune
    let mut cfg = AdapterConfig::new("KV_PROMPT").unwrap();
    let mut t = HashMap::from([
        (PROMPT.to_string(), k.prompts.as_tensor().clone()),
        (KV.to_string(), k.slots.as_tensor().clone()),
    ]);
    h.export(&mut cfg, &mut t).unwrap();
    assert_eq!(t[PROMPT].to_vec2::<f32>().unwrap(), emb);
    let o: KvPromptOptions = cfg.options().unwrap();
    assert_eq!((o.num_virtual_tokens, o.prune_step), (2, Some(0)));
}

#[test]
fn shared_slots_serve_as_keys_and_values_in_the_prefix_layout() {
    let k = prompts();
    let kv = k.key_values().unwrap().unwrap(); // (n_kv, 2 L kv)
    assert_eq!(kv.dims(), [3, 2 * 2 * 4]);
    assert_eq!(k.prefix_len(), 3);
    assert_eq!(k.num_virtual_tokens(), 4);
    // prefix tuning's row layout (layer 0 key, layer 0 value, layer 1 key, …), written out by
    // index: slot t of layer l side s holds the values 100 l + 10 s + t + f / 10
    let dev = Device::Cpu;
    for sides in [1, 2] {
        let vals: Vec<f32> = (0..2 * sides * 3 * 4)
            .map(|i| {
                let (l, s, t, f) = (i / (sides * 12), i / 12 % sides, i / 4 % 3, i % 4);
                (100 * l + 10 * s + t) as f32 + f as f32 / 10.0
            })
            .collect();
        let slots = Tensor::from_vec(vals, (2, sides, 3, 4), &dev).unwrap();
        let p = Tensor::zeros((4, 6), DType::F32, &dev).unwrap();
        let rows: Vec<Vec<f32>> = KvPrompts::new(&p, &slots, 3)
            .unwrap()
            .key_values()
            .unwrap()
            .unwrap()
            .to_vec2()
            .unwrap();
        for (t, row) in rows.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                let (l, kind, f) = (j / 8, j / 4 % 2, j % 4);
                let s = if sides == 1 { 0 } else { kind };
                let want = (100 * l + 10 * s + t) as f32 + f as f32 / 10.0;
                assert_eq!(v, want, "{sides} sides: row {t}, column {j}");
            }
        }
    }
}

#[test]
fn bad_options_are_refused_naming_the_key() {
    for (key, v, want) in [
        ("num_virtual_tokens", serde_json::json!(0), ">= 1"),
        ("num_kv_tokens", serde_json::json!(0), ">= 1"),
        ("token_prune", serde_json::json!(1.0), "[0, 1)"),
        ("segments", serde_json::json!(0), "segments >= 1"),
    ] {
        let mut c = AdapterConfig::new("KV_PROMPT").unwrap();
        c.set("token_dim", 32).unwrap();
        c.set(key, v).unwrap();
        let e = c.validate("adapter_config.json").unwrap_err().to_string();
        assert!(
            e.contains(&format!("`{key}`")) && e.contains(want),
            "{key}: {e}"
        );
    }
}
