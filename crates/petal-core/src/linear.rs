//! `AdaptableLinear`: a frozen linear with named adapters. Merge, unmerge and safe-merge are
//! written here once, for every method, from its `WeightUpdate`.

use crate::adapter::{AdapterLayer, WeightUpdate};
use crate::{Ctx, Error, Result};
use candle_core::{DType, Tensor};
use petal_ops::quant::QFormat;

#[derive(Debug)]
pub struct AdaptableLinear {
    path: String,
    weight: Tensor, // (out, in), frozen; holds merged updates while any are merged
    bias: Option<Tensor>,
    adapters: Vec<(String, Box<dyn AdapterLayer>)>,
    active: Vec<String>,
    merged: Vec<(String, WeightUpdate)>, // a stack: unmerge pops in reverse
    disabled: bool,
    /// A token embedding: `weight` is (vocab, hidden) and the input is token ids; seen as a
    /// linear from one-hot ids, in = vocab and out = hidden (PEFT's LoRA `Embedding` view).
    embedding: bool,
    /// The frozen weight kept in a block format: `weight` then holds its raw blocks, a `u8`
    /// tensor `(rows, fmt.row_bytes())` (see `petal_ops::quant`); never merged into.
    quant: Option<QFormat>,
}

impl AdaptableLinear {
    pub fn new(path: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Self {
        AdaptableLinear {
            path: path.into(),
            weight,
            bias,
            adapters: Vec::new(),
            active: Vec::new(),
            merged: Vec::new(),
            disabled: false,
            embedding: false,
            quant: None,
        }
    }

    /// Mark the weight given to [`Self::new`] or [`Self::embedding`] as quantized: it is the raw
    /// blocks `(rows, fmt.row_bytes())` of `u8` in `fmt`.
    pub fn quantized(self, fmt: QFormat) -> Self {
        AdaptableLinear {
            quant: Some(fmt),
            ..self
        }
    }

    /// The block format of a quantized base weight (then `weight()` is its raw blocks).
    pub fn quant(&self) -> Option<QFormat> {
        self.quant
    }

    /// The base weight in f32 (or its dtype) as a dense `(out, in)` matrix: the weight itself,
    /// or a dequantized copy of a quantized one (for exports and inspection, not for passes).
    pub fn dense_weight(&self) -> Result<Tensor> {
        match self.quant {
            Some(fmt) => Ok(petal_ops::quant::dequantize(&self.weight, fmt)?),
            None => Ok(self.weight.clone()),
        }
    }

    /// A token embedding `weight (vocab, hidden)` that adapters may target.
    pub fn embedding(path: impl Into<String>, weight: Tensor) -> Self {
        let mut e = Self::new(path, weight, None);
        e.embedding = true;
        e
    }

    pub fn is_embedding(&self) -> bool {
        self.embedding
    }

    pub fn path(&self) -> &str {
        &self.path
    }
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    pub fn in_features(&self) -> usize {
        self.dims()[usize::from(!self.embedding)]
    }
    pub fn out_features(&self) -> usize {
        self.dims()[usize::from(self.embedding)]
    }
    /// The weight's (rows, cols) as values, quantized or not.
    fn dims(&self) -> [usize; 2] {
        let d = self.weight.dims();
        let rows = d.first().copied().unwrap_or(0);
        [
            rows,
            self.quant
                .map_or(d.get(1).copied().unwrap_or(0), |f| f.cols),
        ]
    }

    /// y = x W^T + b, then each active, unmerged adapter in order; in a mixed batch
    /// ([`crate::mixed::rows_ctx`]), each row's own adapter instead.
    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        if let Some(rows) = ctx.rows().filter(|_| !self.disabled && !ctx.is_frozen()) {
            return self.forward_rows(x, rows, ctx);
        }
        let live: Vec<&dyn AdapterLayer> = if self.disabled || ctx.is_frozen() {
            Vec::new()
        } else {
            self.active
                .iter()
                .filter(|n| !self.merged.iter().any(|(m, _)| m == *n))
                .filter_map(|n| self.layer(n))
                .collect()
        };
        self.forward_through(x, &live, ctx)
    }

    /// The frozen weight when no adapter acts on this module in a pass with `ctx` (so a fused
    /// kernel, such as the output head + loss, may use it directly): raw blocks when [`Self::quant`]).
    pub fn plain_weight(&self, ctx: &Ctx) -> Option<&Tensor> {
        let busy = !self.disabled
            && self
                .active
                .iter()
                .any(|a| !self.merged.iter().any(|(m, _)| m == a));
        ((!busy || ctx.is_frozen()) && ctx.rows().is_none()).then_some(&self.weight)
    }

    /// x W^T + b, then each of `live` in order (one alone: its fused op where it has one).
    fn forward_through(&self, x: &Tensor, live: &[&dyn AdapterLayer], ctx: &Ctx) -> Result<Tensor> {
        if let ([only], Some(fmt), false) = (live, self.quant, self.embedding) {
            let b = self.bias.as_ref();
            if let Some(y) = only.fused_forward_quant(x, &self.weight, fmt, b, ctx) {
                return y;
            }
        }
        if let [only] = live {
            if !self.embedding && self.quant.is_none() {
                if let Some(y) = only.fused_forward(x, &self.weight, self.bias.as_ref(), ctx) {
                    return y;
                }
            }
        }
        let mut y = self.base_forward(x, ctx)?;
        for layer in live {
            y = layer.forward(x, y, ctx)?;
        }
        Ok(y)
    }

    /// The frozen module alone: x W^T + b, or rows of the embedding table for token ids.
    fn base_forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        if let Some(fmt) = self.quant {
            return Ok(if self.embedding {
                petal_ops::quant::lookup(&self.weight, fmt, x)?
            } else {
                petal_ops::quant::quant_linear(
                    ctx.kernels(),
                    x,
                    &self.weight,
                    fmt,
                    self.bias.as_ref(),
                )?
            });
        }
        Ok(if self.embedding {
            // x holds token ids (any shape): rows of the table
            let mut dims = x.dims().to_vec();
            dims.push(self.weight.dim(1)?);
            self.weight
                .index_select(&x.flatten_all()?, 0)?
                .reshape(dims)?
        } else {
            petal_ops::frozen_linear(ctx.kernels(), x, &self.weight, self.bias.as_ref())?
        })
    }

    /// Rows `ids` of a frozen embedding table (no adapter), dequantized where it is quantized.
    pub fn base_rows(&self, ids: &Tensor) -> Result<Tensor> {
        if !self.embedding {
            return Err(Error::msg(format!("{}: not a token embedding", self.path)));
        }
        self.base_forward(ids, &Ctx::eval())
    }

    /// A mixed-adapter batch (see `mixed.rs`): the base output for every row, then each
    /// adapter on its rows (x[rows] -> its forward over y[rows]), put back in row order by one
    /// gather over [y; out_1; out_2; ...].
    fn forward_rows(&self, x: &Tensor, rows: &[String], ctx: &Ctx) -> Result<Tensor> {
        let n = x.dim(0)?;
        if ctx.is_train() {
            return Err(Error::msg(
                "mixed adapter batch: inference only (a training forward was asked for)",
            ));
        }
        if rows.len() != n {
            return Err(Error::msg(format!(
                "{}: mixed adapter batch of {} adapter names for a batch of {n} rows",
                self.path,
                rows.len()
            )));
        }
        let groups = crate::mixed::groups(rows, |name| self.layer(name).is_some());
        if let [(name, idx)] = groups.as_slice() {
            if idx.len() == n {
                // every row through one adapter (a single request): as if it alone were active
                let layer = self.layer(name).into_iter().collect::<Vec<_>>();
                return self.forward_through(x, &layer, ctx);
            }
        }
        let y = self.base_forward(x, ctx)?;
        if groups.is_empty() {
            return Ok(y);
        }
        let x = &x.contiguous()?; // rows are gathered from it
        let dev = x.device();
        let mut pieces = vec![y.clone()];
        let mut source: Vec<u32> = (0..n as u32).collect(); // row i of the result: row source[i] of the pieces
        let mut at = n as u32;
        for (name, idx) in groups {
            let layer = self
                .layer(name)
                .ok_or_else(|| Error::msg(format!("{}: adapter `{name}` vanished", self.path)))?;
            let sel = Tensor::new(idx.as_slice(), dev)?;
            let out = layer.forward(&x.index_select(&sel, 0)?, y.index_select(&sel, 0)?, ctx)?;
            for (k, &i) in idx.iter().enumerate() {
                source[i as usize] = at + k as u32;
            }
            at += idx.len() as u32;
            pieces.push(out.to_dtype(y.dtype())?);
        }
        let source = Tensor::new(source.as_slice(), dev)?;
        Ok(Tensor::cat(&pieces, 0)?.index_select(&source, 0)?)
    }

    /// `W = W - offset` (PiSSA/OLoRA move the adapter's initial part out of the base).
    pub fn subtract_from_base(&mut self, offset: &Tensor) -> Result<()> {
        self.refuse_quantized("rewrite its base weight")?;
        if !self.merged.is_empty() {
            return Err(Error::msg(format!(
                "{}: unmerge adapters before attaching one that rewrites the base weight",
                self.path
            )));
        }
        self.weight = apply(&self.weight, &WeightUpdate::Add(offset.neg()?))?;
        Ok(())
    }

    fn refuse_quantized(&self, what: &str) -> Result<()> {
        match self.quant {
            Some(f) => Err(Error::Unsupported(format!(
                "{}: cannot {what}: the base weight is quantized ({}); load the model with \
                 --dtype f32 or bf16 to change its weights",
                self.path,
                f.name()
            ))),
            None => Ok(()),
        }
    }

    pub fn add_adapter(&mut self, name: &str, layer: Box<dyn AdapterLayer>) -> Result<()> {
        if self.layer(name).is_some() {
            return Err(Error::msg(format!(
                "{}: adapter `{name}` already exists",
                self.path
            )));
        }
        self.adapters.push((name.to_string(), layer));
        Ok(())
    }

    pub fn layer(&self, name: &str) -> Option<&dyn AdapterLayer> {
        self.adapters
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, l)| l.as_ref())
    }

    /// Whether an active adapter here reads each row's query from the frozen model
    /// ([`crate::Ctx::query`]), which the model then computes first.
    pub fn wants_query(&self) -> bool {
        !self.disabled
            && self
                .active
                .iter()
                .any(|n| self.layer(n).is_some_and(|l| l.wants_query()))
    }

    pub fn adapter_names(&self) -> Vec<&str> {
        self.adapters.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Make exactly these adapters active (those this module lacks are skipped).
    pub fn set_active(&mut self, names: &[&str]) {
        self.active = names
            .iter()
            .filter(|n| self.layer(n).is_some())
            .map(|n| n.to_string())
            .collect();
    }

    pub fn active(&self) -> &[String] {
        &self.active
    }

    /// Disable (or re-enable) all adapters; disabling unmerges first so W is the base again.
    pub fn set_disabled(&mut self, disabled: bool) -> Result<()> {
        if disabled {
            while !self.merged.is_empty() {
                self.unmerge()?;
            }
        }
        self.disabled = disabled;
        Ok(())
    }

    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        if self.merged.iter().any(|(m, _)| m == name) {
            return Err(Error::msg(format!(
                "{}: unmerge adapter `{name}` before deleting it",
                self.path
            )));
        }
        self.adapters.retain(|(n, _)| n != name);
        self.active.retain(|n| n != name);
        Ok(())
    }

    pub fn merged_names(&self) -> Vec<&str> {
        self.merged.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Give a plain linear a zero bias where it has none (for export formats whose biases
    /// come in blocks). Refused while adapters are attached.
    pub fn add_zero_bias(&mut self) -> Result<()> {
        self.refuse_quantized("add a bias block")?;
        if !self.adapters.is_empty() {
            return Err(Error::msg(format!(
                "{}: cannot add a bias under attached adapters",
                self.path
            )));
        }
        if self.bias.is_none() {
            let out = self.weight.dim(0)?;
            self.bias = Some(Tensor::zeros(
                out,
                self.weight.dtype(),
                self.weight.device(),
            )?);
        }
        Ok(())
    }

    /// Make `x W^T + b` read `x + shift` at no cost: `b += W shift` (a linear without a bias
    /// gets one). Refused while adapters are attached (merge them first).
    pub fn add_input_shift(&mut self, shift: &Tensor) -> Result<()> {
        self.refuse_quantized("rewrite its base weight")?;
        if !self.adapters.is_empty() {
            return Err(Error::msg(format!(
                "{}: cannot fold a shift into the bias under attached adapters",
                self.path
            )));
        }
        let w = self.weight.to_dtype(candle_core::DType::F32)?;
        let db = w.matmul(&shift.to_dtype(candle_core::DType::F32)?.reshape(((), 1))?)?;
        let db = db.flatten_all()?;
        let b = match &self.bias {
            Some(b) => (b.to_dtype(candle_core::DType::F32)? + db)?,
            None => db,
        };
        self.bias = Some(b.to_dtype(self.weight.dtype())?.detach());
        Ok(())
    }

    /// Fold adapter `name` into W. With `safe`, refuse (and keep W) if the result is not finite.
    /// Merging an already merged adapter is a no-op (returns false).
    pub fn merge(&mut self, name: &str, safe: bool) -> Result<bool> {
        self.refuse_quantized("rewrite its base weight")?;
        if self.merged.iter().any(|(m, _)| m == name) {
            return Ok(false);
        }
        let layer = self
            .layer(name)
            .ok_or_else(|| Error::msg(format!("{}: no adapter `{name}`", self.path)))?;
        let upd = layer.weight_update()?;
        let w = apply(&self.weight, &upd)?;
        // a trained bias on a linear without one (BitFit) gives it a bias; unmerge leaves zeros
        let base_b = match (&self.bias, &upd) {
            (None, WeightUpdate::AddBias { db, .. }) => {
                Some(db.zeros_like()?.to_dtype(self.weight.dtype())?)
            }
            (None, WeightUpdate::Affine { shift, .. }) => {
                Some(shift.zeros_like()?.to_dtype(self.weight.dtype())?)
            }
            (b, _) => b.clone(),
        };
        let b = base_b
            .as_ref()
            .map(|b| scale_bias(b, &upd, false))
            .transpose()?;
        if safe && (!is_finite(&w)? || b.as_ref().map(is_finite).transpose()? == Some(false)) {
            return Err(Error::msg(format!(
                "{}: merging adapter `{name}` gives non-finite weights; nothing was changed",
                self.path
            )));
        }
        // a merged weight is frozen: it keeps no tie to the adapter's variables (a later backward
        // pass, training another adapter over it, must not reach them)
        self.weight = w.detach();
        self.bias = b.map(|b| b.detach());
        self.merged.push((name.to_string(), upd));
        Ok(true)
    }

    /// Undo the most recent merge (exactly inverting its update).
    pub fn unmerge(&mut self) -> Result<Option<String>> {
        let Some((name, upd)) = self.merged.pop() else {
            return Ok(None);
        };
        self.weight = invert(&self.weight, &upd)?.detach();
        self.bias = self
            .bias
            .as_ref()
            .map(|b| scale_bias(b, &upd, true).map(|b| b.detach()))
            .transpose()?;
        Ok(Some(name))
    }

    /// Merge permanently and drop all adapters: the module becomes a plain linear again.
    pub fn merge_and_unload(&mut self, names: &[&str]) -> Result<()> {
        for n in names {
            if self.layer(n).is_some() {
                self.merge(n, true)?;
            }
        }
        self.merged.clear();
        self.adapters.clear();
        self.active.clear();
        Ok(())
    }
}

/// `x W^T` (no bias) for a frozen `w` a layer keeps (IA3's and MoV's input scaling): dense, or
/// raw blocks in `quant`.
pub fn frozen_xwt(ctx: &Ctx, x: &Tensor, w: &Tensor, quant: Option<QFormat>) -> Result<Tensor> {
    Ok(match quant {
        Some(fmt) => petal_ops::quant::quant_linear(ctx.kernels(), x, w, fmt, None)?,
        None => petal_ops::frozen_linear(ctx.kernels(), x, w, None)?,
    })
}

/// A per-output scaling `l (out, 1)` scales the bias too (the adapter scales the whole output),
/// an output transform M maps it to `M b`; every other update leaves it. `inverse` undoes.
fn scale_bias(b: &Tensor, upd: &WeightUpdate, inverse: bool) -> Result<Tensor> {
    match upd {
        WeightUpdate::Scale(l) if l.dims().get(1) == Some(&1) && l.dim(0)? == b.dim(0)? => {
            let l = l.flatten_all()?.to_dtype(b.dtype())?;
            Ok(if inverse { b.div(&l)? } else { b.mul(&l)? })
        }
        WeightUpdate::AddBias { db, .. } => {
            let db = db.to_dtype(b.dtype())?;
            Ok(if inverse { (b - db)? } else { (b + db)? })
        }
        WeightUpdate::Affine { scale, shift } => {
            let (bf, s, t) = (
                b.to_dtype(DType::F32)?,
                scale.flatten_all()?,
                shift.flatten_all()?,
            );
            let s = s.to_dtype(DType::F32)?;
            let t = t.to_dtype(DType::F32)?;
            let out = if inverse {
                ((bf - t)? / s)?
            } else {
                ((bf * s)? + t)?
            };
            Ok(out.to_dtype(b.dtype())?)
        }
        WeightUpdate::Replace { b: nb, old_b, .. } => {
            let t = if inverse { old_b } else { nb };
            Ok(t.as_ref().unwrap_or(b).to_dtype(b.dtype())?)
        }
        WeightUpdate::Transform { m, m_inv } => {
            let m = if inverse { m_inv } else { m };
            let bf = b.to_dtype(DType::F32)?.unsqueeze(1)?;
            Ok(m.to_dtype(DType::F32)?
                .matmul(&bf)?
                .squeeze(1)?
                .to_dtype(b.dtype())?)
        }
        _ => Ok(b.clone()),
    }
}

fn is_finite(t: &Tensor) -> Result<bool> {
    let s = t.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    Ok(s.is_finite())
}

/// W' from W and an update, computed in f32 and returned in W's dtype.
pub fn apply(w: &Tensor, upd: &WeightUpdate) -> Result<Tensor> {
    let dt = w.dtype();
    let wf = w.to_dtype(DType::F32)?;
    let out = match upd {
        WeightUpdate::Add(d) => (wf + d.to_dtype(DType::F32)?)?,
        // W' = (R W^T)^T ⊙ s = W R^T ⊙ s
        WeightUpdate::Rotate { r, s, .. } => {
            let w = wf.matmul(&r.to_dtype(DType::F32)?.t()?)?;
            match s {
                Some(s) => w.broadcast_mul(&s.to_dtype(DType::F32)?)?,
                None => w,
            }
        }
        WeightUpdate::Transform { m, .. } => m.to_dtype(DType::F32)?.matmul(&wf)?,
        WeightUpdate::Scale(l) => wf.broadcast_mul(&l.to_dtype(DType::F32)?)?,
        WeightUpdate::Affine { scale, .. } => {
            wf.broadcast_mul(&scale.to_dtype(DType::F32)?.reshape(((), 1))?)?
        }
        WeightUpdate::Replace { w, .. } => w.to_dtype(DType::F32)?,
        WeightUpdate::AddBias { dw: Some(d), .. } => (wf + d.to_dtype(DType::F32)?)?,
        WeightUpdate::AddBias { dw: None, .. } => wf,
    };
    Ok(out.to_dtype(dt)?)
}

/// The exact inverse of `apply`: W = W' - dW; W = (W' / s) R^-T; W = M^-1 W'; W = W' / l.
pub fn invert(w: &Tensor, upd: &WeightUpdate) -> Result<Tensor> {
    let dt = w.dtype();
    let wf = w.to_dtype(DType::F32)?;
    let out = match upd {
        WeightUpdate::Add(d) => (wf - d.to_dtype(DType::F32)?)?,
        WeightUpdate::Rotate { r_inv, s, .. } => {
            let w = match s {
                Some(s) => wf.broadcast_div(&s.to_dtype(DType::F32)?)?,
                None => wf,
            };
            w.matmul(&r_inv.to_dtype(DType::F32)?.t()?)?
        }
        WeightUpdate::Transform { m_inv, .. } => m_inv.to_dtype(DType::F32)?.matmul(&wf)?,
        WeightUpdate::Scale(l) => wf.broadcast_div(&l.to_dtype(DType::F32)?)?,
        WeightUpdate::Affine { scale, .. } => {
            wf.broadcast_div(&scale.to_dtype(DType::F32)?.reshape(((), 1))?)?
        }
        WeightUpdate::Replace { old_w, .. } => old_w.to_dtype(DType::F32)?,
        WeightUpdate::AddBias { dw: Some(d), .. } => (wf - d.to_dtype(DType::F32)?)?,
        WeightUpdate::AddBias { dw: None, .. } => wf,
    };
    Ok(out.to_dtype(dt)?)
}
