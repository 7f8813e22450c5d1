//! Mixed-adapter batches: row i of a batch goes through adapter `rows[i]` (or through the base
//! model alone, [`BASE`]), all rows in one forward pass. This is PEFT's `adapter_names`
//! argument (`model(input_ids, adapter_names=["a", "__base__", "b"])`, LoRA's
//! `_mixed_batch_forward` in `peft/tuners/lora/layer.py`), the building block of serving many
//! adapters at once.
//!
//! The rows travel in the forward pass's [`Ctx`], which models hand down without looking at
//! it. Each [`crate::AdaptableLinear`] computes the base output for the whole batch
//! once, then each adapter's output on its own rows only (the rows gathered, the adapter's
//! `forward` run on them, the results put back in place). Every linear-layer method is
//! row-independent, so this holds for all of them (PEFT allows LoRA without DoRA); methods that
//! act outside the linears (prompt learning, LN tuning) cannot mix and are refused.

use crate::inject::Adaptable;
use crate::{Ctx, Error, Result};

/// The row name that means "no adapter" (PEFT's placeholder).
pub const BASE: &str = "__base__";

/// The row name that means "the model as it is": every active adapter, input-side and norm
/// ones included, as in a plain forward. A batch's rows are all `ACTIVE` or none of them.
pub const ACTIVE: &str = "__active__";

/// The context of a forward pass with row i of the batch going through adapter `rows[i]`
/// ([`BASE`]: none), whatever adapters are active. Checked first: every name is an adapter of
/// `model` on its linear layers, no adapter is merged, and no prompt-learning or LN-tuning
/// adapter is in use (they act on every row). Inference only.
pub fn rows_ctx(model: &dyn Adaptable, rows: &[&str]) -> Result<Ctx> {
    check(model, rows)?;
    Ok(Ctx::with_rows(rows))
}

/// The context of a forward pass over rows named as for [`rows_ctx`], or all [`ACTIVE`]: then
/// the plain evaluation context (every row through the model as it is).
pub fn batch_ctx(model: &dyn Adaptable, rows: &[&str]) -> Result<Ctx> {
    match rows.iter().filter(|r| **r == ACTIVE).count() {
        0 => rows_ctx(model, rows),
        n if n == rows.len() => Ok(Ctx::eval()),
        _ => Err(Error::msg(format!(
            "mixed adapter batch: `{ACTIVE}` (the model as it is) cannot share a batch with \
             rows naming adapters"
        ))),
    }
}

/// The adapter of `model` that acts on every row of a batch, so that rows cannot choose
/// adapters: an input-side one (prompt learning, PASTA) or an active norm adapter (LN tuning,
/// SSF with `norms`). None where every adapter is on linear layers.
pub fn every_row(model: &dyn Adaptable) -> Option<String> {
    if let Some((n, _)) = model.input_adapter() {
        return Some(n.to_string());
    }
    model.norms().iter().find_map(|norm| {
        let names = norm.names();
        names
            .into_iter()
            .find(|n| norm.is_active(n))
            .map(str::to_string)
    })
}

/// The adapters on `model`'s linear layers (the names rows may take besides [`BASE`]), sorted.
pub fn adapter_names(model: &dyn Adaptable) -> Vec<String> {
    let mut v: Vec<String> = model
        .linears()
        .iter()
        .flat_map(|l| l.adapter_names())
        .map(str::to_string)
        .collect();
    v.sort();
    v.dedup();
    v
}

fn check(model: &dyn Adaptable, rows: &[&str]) -> Result<()> {
    if rows.is_empty() {
        return Err(Error::msg("mixed adapter batch: no adapter names given"));
    }
    let linears = model.linears();
    let known = adapter_names(model);
    let input = model.input_adapter().map(|(n, _)| n);
    if let Some(n) = input {
        return Err(Error::Unsupported(format!(
            "mixed adapter batch: adapter `{n}` is input-side (prompt learning or PASTA, applied \
             to every row); detach it to mix adapters on linear layers"
        )));
    }
    for norm in model.norms() {
        if let Some(n) = norm.names().into_iter().find(|n| norm.is_active(n)) {
            return Err(Error::Unsupported(format!(
                "mixed adapter batch: adapter `{n}` adapts the norm {} (LN tuning, or SSF with \
                 `norms`), which acts on every row; deactivate it to mix adapters on linear layers",
                norm.path()
            )));
        }
    }
    if let Some(l) = linears.iter().find(|l| !l.merged_names().is_empty()) {
        return Err(Error::msg(format!(
            "mixed adapter batch: adapter `{}` is merged into {}; unmerge it first",
            l.merged_names()[0],
            l.path()
        )));
    }
    for name in rows.iter().filter(|n| **n != BASE) {
        if !known.iter().any(|k| k == name) {
            let on_norms = model.norms().iter().any(|n| n.has(name));
            return Err(Error::msg(if on_norms {
                format!("mixed adapter batch: adapter `{name}` tunes norms (LN tuning), which cannot mix rows")
            } else {
                format!(
                    "mixed adapter batch: no adapter `{name}` (the model has: {}; `{BASE}` for \
                     the base model)",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                )
            }));
        }
    }
    Ok(())
}

/// Rows grouped by adapter, in order of first appearance: (adapter, its row indices). Rows of
/// [`BASE`] and of adapters `has` rejects (a module the adapter does not target) stay out.
pub(crate) fn groups(rows: &[String], has: impl Fn(&str) -> bool) -> Vec<(&str, Vec<u32>)> {
    let mut out: Vec<(&str, Vec<u32>)> = Vec::new();
    for (i, name) in rows.iter().enumerate() {
        if name == BASE || !has(name) {
            continue;
        }
        match out.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => v.push(i as u32),
            None => out.push((name, vec![i as u32])),
        }
    }
    out
}
