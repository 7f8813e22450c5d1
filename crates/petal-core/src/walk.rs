//! One walk over an adapter's tensors: each with its PEFT key, its variable and where it
//! lives. Parameter counting, the optimizer's list, saving and loading all read this walk.

use crate::inject::Adaptable;
use candle_core::Var;

/// Shared tensors sit at the model level under this prefix (`base_model.vera_A`).
pub const SHARED_PREFIX: &str = "base_model.";

/// Where an adapter tensor lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorKind {
    /// Owned by the adapter's layer on one module (`<module>.lora_A.weight`).
    Module,
    /// Frozen, shared by all layers of the adapter, saved once (`base_model.vera_A`).
    Shared,
    /// An input-side adapter's (`prompt_embeddings`, saved without a module prefix).
    Input,
    /// Trained on a norm: a copy of its weight (LN tuning), a scale and shift (SSF).
    Norm,
    /// Saved with its module's layer, never trained (`AdapterLayer::buffers`).
    Buffer,
    /// Trained, shared by all layers of the adapter, saved once (`base_model.fish_values`).
    SharedTrained,
}

/// One tensor of an adapter.
pub struct AdapterTensor<'a> {
    /// The PEFT key without the `base_model.model.` prefix: `<module>.<name>`, `base_model.<name>`
    /// for shared tensors, `<name>` for input-side ones.
    pub key: String,
    pub var: &'a Var,
    pub kind: TensorKind,
    /// Whether its module uses the adapter now (it is trained and counted as trainable).
    pub active: bool,
}

impl AdapterTensor<'_> {
    /// Trained (every kind but the frozen shared tensors and buffers).
    pub fn trainable(&self) -> bool {
        !matches!(self.kind, TensorKind::Shared | TensorKind::Buffer)
    }
}

/// Every tensor of adapter `name`, in module order: each linear's own tensors (then the shared
/// ones, once, where first met), the input-side adapter's, the norms' copies.
pub fn adapter_tensors<'a>(model: &'a dyn Adaptable, name: &str) -> Vec<AdapterTensor<'a>> {
    let mut out: Vec<AdapterTensor<'a>> = Vec::new();
    for lin in model.linears() {
        let Some(layer) = lin.layer(name) else {
            continue;
        };
        let active = lin.active().iter().any(|a| a == name);
        for t in layer.tensors() {
            let key = format!("{}.{}", lin.path(), t.name);
            out.push(AdapterTensor {
                key,
                var: t.var,
                kind: TensorKind::Module,
                active,
            });
        }
        for t in layer.buffers() {
            out.push(AdapterTensor {
                key: format!("{}.{}", lin.path(), t.name),
                var: t.var,
                kind: TensorKind::Buffer,
                active,
            });
        }
        let shared = layer.shared().into_iter().map(|t| (t, TensorKind::Shared));
        let trained = layer
            .shared_trained()
            .into_iter()
            .map(|t| (t, TensorKind::SharedTrained));
        for (t, kind) in trained.chain(shared) {
            let key = format!("{SHARED_PREFIX}{}", t.name);
            if !out.iter().any(|x| x.key == key) {
                out.push(AdapterTensor {
                    key,
                    var: t.var,
                    kind,
                    active,
                });
            }
        }
    }
    if let Some((n, input)) = model.input_adapter().filter(|(n, _)| *n == name) {
        let _ = n;
        for t in input.tensors() {
            out.push(AdapterTensor {
                key: t.name.to_string(),
                var: t.var,
                kind: TensorKind::Input,
                active: true,
            });
        }
    }
    for n in model.norms() {
        for (key, var) in n.keyed(name) {
            out.push(AdapterTensor {
                key,
                var,
                kind: TensorKind::Norm,
                active: n.is_active(name),
            });
        }
    }
    out
}

/// Every adapter name on `model` (linears, input side, norms), in first-seen order.
pub fn adapter_names(model: &dyn Adaptable) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let mut add = |n: &str| {
        if !names.iter().any(|x| x == n) {
            names.push(n.to_string());
        }
    };
    for l in model.linears() {
        l.adapter_names().into_iter().for_each(&mut add);
    }
    if let Some((n, _)) = model.input_adapter() {
        add(n);
    }
    for n in model.norms() {
        n.names().into_iter().for_each(&mut add);
    }
    names
}
