//! SiRA (Zhu et al., 2023, arXiv 2311.09179, "SiRA: Sparse Mixture of Low Rank Adaptation"; no
//! official code): E LoRA experts on a linear, each token routed to its top k experts within an
//! expert capacity, dropout on the gates.
//!
//! `y = x W^T + b + (alpha / r) Σ_{e ∈ kept(x)} g_e(x) (x A_e) B_e`, `g = softmax(x W_r)` (no
//! bias, f32). The paper leaves open what petal decides (docs/methods/sira.md): the top-k gates
//! are not renormalised (the official MoLoRA router's `_top_k_mask` path, which SiRA builds on,
//! multiplies the probabilities by the mask); each expert takes at most
//! `ceil(capacity_factor k T / E)` of the T tokens of a training forward, in batch order, the
//! later ones dropped for that expert (in evaluation and serving every token gets its top k,
//! so a token's output never depends on the other rows of its batch); inverted dropout at `gate_dropout` on the kept gates in training; no
//! auxiliary load-balancing loss. Init as MoLoRA (B zero: identity). Not mergeable. The layer
//! is MoLoRA's (`molora::Routing::TopK`).
//!
//! petal's own adapter: `peft_type: "SIRA"`, tensors `<module>.sira_A` (E, in, r),
//! `<module>.sira_B` (E, r, out), `<module>.sira_router` (in, E).

use crate::adapter::{AdapterLayer, AdapterMethod, BaseLinear, ModuleDims};
use crate::config::{finite, probability, spec, AdapterConfig, Spec};
use crate::methods::molora::{build_layer, check_sizes, layer_count, Routing};
use crate::{Error, Result};

pub struct Sira;

crate::method_options! {
    /// SiRA's options.
    pub struct SiraOptions {
        /// Rank of each expert
        pub r: usize = 4,
        /// Scale numerator: each expert's update is (lora_alpha / r) B_e A_e
        pub lora_alpha: f64 = 16.0,
        /// Number of experts E
        pub num_experts: usize = 8,
        /// Experts each token is routed to (1..=num_experts)
        pub top_k: usize = 2,
        /// Each expert takes at most ceil(capacity_factor * top_k * tokens / num_experts) tokens
        pub capacity_factor: f64 = 1.25,
        /// Dropout on the gates in training (expert dropout), in [0, 1)
        pub gate_dropout: f64 = 0.1,
        /// true: B starts at zero (identity); false: random (a testing switch)
        pub init_weights: bool = true,
    }
}

impl AdapterMethod for Sira {
    fn needs_dense_base(&self, _cfg: &AdapterConfig) -> Option<&'static str> {
        None // a term next to the base output
    }

    fn in_peft(&self) -> bool {
        false
    }

    fn bench_settings(&self) -> Option<&'static [(&'static str, &'static str)]> {
        Some(&[])
    }

    fn peft_type(&self) -> &'static str {
        "SIRA"
    }

    fn options(&self) -> Spec {
        spec::<SiraOptions>()
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        let o: SiraOptions = cfg.options()?;
        check_sizes(o.r, o.num_experts, o.lora_alpha)?;
        if !(1..=o.num_experts).contains(&o.top_k) {
            return Err(Error::config(
                "adapter config",
                "top_k",
                format!(
                    "{} is out of range: 1..=num_experts ({})",
                    o.top_k, o.num_experts
                ),
            ));
        }
        finite("capacity_factor", o.capacity_factor, Some(0.0))?;
        if o.capacity_factor == 0.0 {
            return Err(Error::config(
                "adapter config",
                "capacity_factor",
                "0 is out of range: capacity_factor > 0",
            ));
        }
        probability("gate_dropout", o.gate_dropout)
    }

    fn layer_values(&self, cfg: &AdapterConfig, _path: &str, dims: &ModuleDims) -> Result<u64> {
        let o: SiraOptions = cfg.options()?;
        Ok(layer_count(dims.inp, dims.out, o.r, o.num_experts) as u64)
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        _path: &str,
        base: &BaseLinear,
        seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        let o: SiraOptions = cfg.options()?;
        let routing = Routing::TopK {
            k: o.top_k,
            capacity_factor: o.capacity_factor,
            gate_dropout: o.gate_dropout,
        };
        build_layer(
            base,
            o.r,
            o.lora_alpha,
            o.num_experts,
            o.init_weights,
            routing,
            seed,
        )
    }
}

#[cfg(test)]
fn conformance_config() -> AdapterConfig {
    let mut c = AdapterConfig::for_method("sira", 2, 4.0, crate::testing::toy_targets());
    c.set("num_experts", 4).unwrap();
    c.set("top_k", 2).unwrap();
    // gates dropped out would differ between the two sides of the finite differences
    c.set("gate_dropout", 0.0).unwrap();
    c
}

// finite differences on A and B only: a step on the router's kernel can change which experts a
// token is routed to, where the loss jumps (the router's gradient through the kept gates is
// MoLoRA's, checked there)
#[cfg(test)]
crate::conformance!(
    conformance,
    conformance_config,
    |inp, out, _cfg| layer_count(inp, out, 2, 4),
    Some(&["sira_A", "sira_B"]),
    unmergeable
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{adapted, Toy};
    use crate::Adaptable;

    /// tools/golden/moe_oracle.py: SiRA transcribed from the paper in NumPy with petal's
    /// decisions (top-k gates not renormalised, capacity in batch order in training, none in
    /// evaluation); petal's output for the same A, B, router and input, in training with
    /// tokens over capacity (gate dropout off) and in evaluation.
    #[test]
    fn the_output_equals_the_paper_transcribed_with_tokens_over_capacity() {
        let t = crate::testing::golden_fixture("moe");
        let mut c = conformance_config();
        c.set("num_experts", 4).unwrap();
        c.set("top_k", 2).unwrap();
        c.set("capacity_factor", 0.75).unwrap();
        c.set("r", 3).unwrap();
        c.set("lora_alpha", 16.0).unwrap();
        let mut toy = Toy::new();
        crate::inject_adapter(&mut toy, "default", &c, 1).unwrap();
        // fc1 (12, 10) carries the fixture's layer: in 10, out 12
        let lin = &toy.linears()[0];
        let layer = lin.layer("default").unwrap();
        for n in layer.tensors() {
            n.var.set(&t[&format!("sira.{}", &n.name[5..])]).unwrap();
        }
        let ctx = crate::Ctx::train(3);
        let got = layer
            .forward(&t["sira.x"], t["sira.base"].clone(), &ctx)
            .unwrap();
        let e = crate::testing::max_rel(&got, &t["sira.y"]);
        assert!(e < 1e-5, "training: relative error {e:e}");
        let got = layer
            .forward(&t["sira.x"], t["sira.base"].clone(), &crate::Ctx::eval())
            .unwrap();
        let e = crate::testing::max_rel(&got, &t["sira.y_eval"]);
        assert!(e < 1e-5, "evaluation: relative error {e:e}");
        // the fixture's routing drops some choices for capacity, and petal's meter agrees
        let load = layer.router_load().unwrap();
        let want = t["sira.dropped"].to_vec1::<f32>().unwrap()[0] as f64;
        assert!(want > 0.0);
        assert!(
            (load.dropped - want).abs() < 1e-9,
            "{} vs {want}",
            load.dropped
        );
    }

    #[test]
    fn bad_expert_counts_and_capacity_are_refused_naming_the_key() {
        for (k, v) in [
            ("num_experts", serde_json::json!(0)),
            ("top_k", 0.into()),
            ("top_k", 5.into()),
            ("capacity_factor", 0.into()),
            ("gate_dropout", 1.into()),
        ] {
            let mut c = conformance_config();
            c.set(k, v).unwrap();
            let e = c.validate("adapter_config.json").unwrap_err().to_string();
            assert!(e.contains(&format!("`{k}`")), "{k}: {e}");
        }
    }

    /// The router's load written out: softmax(x W_r) per token in f64, each token's k largest
    /// probabilities kept (not renormalised), averaged over the tokens, for k = 1 and 2.
    #[test]
    fn a_token_gets_its_top_k_experts_at_their_router_probabilities() {
        for k in [1usize, 2] {
            let mut c = conformance_config();
            c.set("top_k", k).unwrap();
            c.set("capacity_factor", 100.0).unwrap();
            let t = adapted(&c, true);
            let x = Toy::input();
            t.forward_ctx(&x, &crate::Ctx::train(2));
            let layer = t.linears()[0].layer("default").unwrap();
            let load = layer.router_load().unwrap();
            assert_eq!(load.dropped, 0.0);
            let want = crate::methods::mixture::load_written_out(layer, "sira_router", &x, k);
            assert_eq!(load.load.len(), want.len());
            for (e, (got, want)) in load.load.iter().zip(&want).enumerate() {
                assert!(
                    (got - want).abs() < 1e-6,
                    "k {k}, expert {e}: {got} vs {want}"
                );
            }
        }
    }
}
