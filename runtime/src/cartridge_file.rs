//! `.cart` files in and out of the runtime: a verified, model-checked file becomes a [`PrefixKv`]
//! (KV cartridge) or a soft prompt tensor; trained tensors become a file.
//!
//! Loading always verifies every checksum and the model fingerprint before the data is used
//! (issue #2: "checked ... always before training or serving trusts the data").

use std::path::Path;

use candle_core::{Device, Tensor};
use cartridge_formats::cart::{
    self, CartContents, CartError, CartFile, Compression, DType as CartDType, Dims, Kind, KvDims,
    Provenance, SoftPromptDims,
};
use cartridge_formats::ModelFingerprint;

use crate::error::{Error, Result};
use crate::prefix::PrefixKv;

/// A soft prompt read from a `.cart`.
#[derive(Debug, Clone)]
pub struct SoftPrompt {
    /// Embeddings `[n, hidden]`, f32.
    pub embeddings: Tensor,
    /// The natural-language summary stored with it, if any.
    pub summary: Option<String>,
}

/// Open, verify and model-check a `.cart`, requiring `kind`.
fn open_checked(path: &Path, model: &ModelFingerprint, kind: Kind) -> Result<CartFile> {
    let file = CartFile::open(path)?;
    file.verify()?;
    file.check_model(model)?;
    let found = file.header().kind();
    if found != kind {
        return Err(Error::Cart(CartError::InFile {
            path: path.to_path_buf(),
            source: Box::new(CartError::InvalidInput(format!(
                "is a {} file, expected a {}",
                found.name(),
                kind.name()
            ))),
        }));
    }
    Ok(file)
}

fn to_tensor(view: cart::TensorView<'_>, device: &Device) -> Result<Tensor> {
    let shape: Vec<usize> = view.shape().iter().map(|&d| d as usize).collect();
    // f32 files: one copy straight from the map; f16/bf16: widened to f32 (CPU compute is f32).
    let t = match view.as_f32() {
        Ok(values) => Tensor::from_slice(values, shape.as_slice(), device)?,
        Err(_) => Tensor::from_vec(view.to_f32_vec(), shape.as_slice(), device)?,
    };
    Ok(t)
}

/// Load a KV cartridge for `model` onto `device`.
pub fn load_cartridge(path: &Path, model: &ModelFingerprint, device: &Device) -> Result<PrefixKv> {
    let file = open_checked(path, model, Kind::Kv)?;
    let Dims::Kv(dims) = file.header().dims else {
        return Err(Error::Msg(format!(
            "{}: not a KV cartridge",
            path.display()
        )));
    };
    // Per layer, in file order: keys, values and, in a biased file, the bias (SPEC.md §2.1).
    let per_layer = 2 + dims.biased as usize;
    let mut layers = Vec::with_capacity(dims.layers as usize);
    let mut bias = Vec::new();
    for l in 0..dims.layers as usize {
        let k = to_tensor(file.tensor(per_layer * l)?, device)?;
        let v = to_tensor(file.tensor(per_layer * l + 1)?, device)?;
        layers.push((k, v));
        if dims.biased {
            bias.push(to_tensor(file.tensor(per_layer * l + 2)?, device)?);
        }
    }
    let kv = PrefixKv::new(layers)?;
    if dims.biased {
        kv.with_bias(bias)
    } else {
        Ok(kv)
    }
}

/// Load a soft prompt for `model` onto `device`.
pub fn load_soft_prompt(
    path: &Path,
    model: &ModelFingerprint,
    device: &Device,
) -> Result<SoftPrompt> {
    let file = open_checked(path, model, Kind::SoftPrompt)?;
    Ok(SoftPrompt {
        embeddings: to_tensor(file.tensor(0)?, device)?,
        summary: file.header().summary.clone(),
    })
}

fn f32_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let values = t
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// Write a KV cartridge (f32) atomically, with its logit bias if it has one. `frozen_tokens` is
/// recorded for training and inspection.
pub fn save_cartridge(
    path: &Path,
    kv: &PrefixKv,
    frozen_tokens: usize,
    model: &ModelFingerprint,
    provenance: Provenance,
    compression: Compression,
) -> Result<()> {
    let (h, p, d) = kv
        .layer(0)
        .ok_or_else(|| Error::Msg("empty cartridge".into()))?
        .0
        .dims3()?;
    let dims = Dims::Kv(KvDims {
        layers: kv.num_layers() as u32,
        kv_heads: h as u32,
        head_dim: d as u32,
        tokens: p as u32,
        frozen_tokens: frozen_tokens as u32,
        biased: kv.bias().is_some(),
    });
    let mut bufs = Vec::with_capacity(3 * kv.num_layers());
    for (l, (k, v)) in kv.layers().iter().enumerate() {
        bufs.push(f32_bytes(k)?);
        bufs.push(f32_bytes(v)?);
        if let Some(bias) = kv.bias() {
            bufs.push(f32_bytes(&bias[l])?);
        }
    }
    let contents = CartContents {
        dims,
        dtype: CartDType::F32,
        model: model.clone(),
        provenance,
        summary: None,
        tensors: bufs.iter().map(Vec::as_slice).collect(),
    };
    cart::write_file(path, &contents, compression)?;
    Ok(())
}

/// Write a soft prompt (f32) atomically.
pub fn save_soft_prompt(
    path: &Path,
    prompt: &SoftPrompt,
    model: &ModelFingerprint,
    provenance: Provenance,
    compression: Compression,
) -> Result<()> {
    let (n, hidden) = prompt.embeddings.dims2()?;
    let bytes = f32_bytes(&prompt.embeddings)?;
    let contents = CartContents {
        dims: Dims::SoftPrompt(SoftPromptDims {
            hidden: hidden as u32,
            tokens: n as u32,
        }),
        dtype: CartDType::F32,
        model: model.clone(),
        provenance,
        summary: prompt.summary.clone(),
        tensors: vec![bytes.as_slice()],
    };
    cart::write_file(path, &contents, compression)?;
    Ok(())
}
