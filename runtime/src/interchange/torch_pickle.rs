//! The reference implementation's pickled torch cartridges -> `.cart`.
//!
//! The reference trainer (HazyResearch/cartridges, `TrainableCache.save`) writes `torch.save` of a
//! dict with `trainable_keys`, `trainable_values` and `fixed_keys`, `fixed_values` (later versions:
//! `frozen_keys`, `frozen_values`). Each is an `nn.ParameterList` (or a plain list) with one tensor
//! per layer of shape `[1, H_kv, n, D]`: the frozen part holds the first `n_f` tokens (the attention
//! sink), the trainable part the following `n_t`; the cartridge is their concatenation along the
//! token axis, `p = n_f + n_t`, with `frozen_tokens = n_f`. The keys are a Hugging Face model's
//! cached keys, post-RoPE at positions `0..p-1` in rotate-half layout, as a `.cart`'s.
//!
//! The file is a zip archive (`<name>/data.pkl` plus one `<name>/data/<key>` entry per storage).
//! The pickle is parsed by candle's reader (`candle_core::pickle::Stack`), and the object tree is
//! then walked here with every shape, stride and offset checked against the storage it points into,
//! so a malformed or hostile file gives an error, never a panic or an out-of-bounds read.
//! Tensors may be strided views at an offset into a shared storage (`torch.save` keeps views).
//! Limits: the pickle stream is capped at 64 MiB (candle's reader copies a memoised object at each
//! reference, so a crafted stream can still be slow to parse), a storage entry at 16 GiB, and only
//! uncompressed (stored) zip entries are read, as `torch.save` writes them.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Cursor, Read};
use std::path::{Path, PathBuf};

use candle_core::pickle::{Object, Stack};
use cartridge_formats::cart::{DType, Dims, KvDims};
use cartridge_formats::ModelFingerprint;

use super::{elem_size, io_error, widen_to_f32, ImportedPrefix, InterchangeError, Result};

/// Cap on the pickle stream (it holds only the object tree; tensor data lives in other entries).
const MAX_PICKLE_BYTES: u64 = 64 << 20;
/// Cap on one storage entry.
const MAX_STORAGE_BYTES: u64 = 16 << 30;

/// The two spellings of the frozen part's keys, oldest first.
const FROZEN_NAMES: [(&str, &str); 2] = [
    ("fixed_keys", "fixed_values"),
    ("frozen_keys", "frozen_values"),
];

/// A tensor as the pickle describes it: where its elements are in which storage.
#[derive(Debug, Clone)]
struct TensorRef {
    storage: String,
    dtype: DType,
    storage_len: usize,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

/// The zip archive `torch.save` writes.
struct Archive {
    path: PathBuf,
    zip: zip::ZipArchive<BufReader<File>>,
    /// Entry-name prefix (`<name>/`) shared by `data.pkl` and the storages.
    prefix: String,
    storages: HashMap<String, Vec<u8>>,
}

impl Archive {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(io_error(path))?;
        let zip = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| {
            malformed(
                path,
                format!(
                    "not a torch.save zip archive ({e}); pickles from torch < 1.6 are not read"
                ),
            )
        })?;
        let pickles: Vec<String> = zip
            .file_names()
            .filter_map(|n| n.ok().map(|n| n.into_owned()))
            .filter(|n| n == "data.pkl" || n.ends_with("/data.pkl"))
            .collect();
        let prefix = match pickles.as_slice() {
            [one] => one.trim_end_matches("data.pkl").to_string(),
            [] => {
                return Err(InterchangeError::Missing {
                    path: path.to_path_buf(),
                    what: "data.pkl (not a torch.save archive)".into(),
                })
            }
            _ => return Err(malformed(path, "more than one data.pkl".into())),
        };
        Ok(Self {
            path: path.to_path_buf(),
            zip,
            prefix,
            storages: HashMap::new(),
        })
    }

    /// Entry `name` (under the prefix), at most `max` bytes; `None` when absent.
    fn entry(&mut self, name: &str, max: u64) -> Result<Option<Vec<u8>>> {
        let full = format!("{}{name}", self.prefix);
        let file = match self.zip.by_name(&full) {
            Ok(f) => f,
            Err(zip::result::ZipError::FileNotFound) => return Ok(None),
            Err(e) => return Err(malformed(&self.path, format!("{full}: {e}"))),
        };
        if file.size() > max {
            return Err(malformed(
                &self.path,
                format!(
                    "{full} is {} bytes, more than the {max} allowed",
                    file.size()
                ),
            ));
        }
        // The declared size is the file's word: reserve little up front and never read past `max`.
        let mut bytes = Vec::with_capacity(file.size().min(1 << 20) as usize);
        file.take(max)
            .read_to_end(&mut bytes)
            .map_err(|e| malformed(&self.path, format!("{full}: {e}")))?;
        Ok(Some(bytes))
    }

    fn object_tree(&mut self) -> Result<Object> {
        if let Some(order) = self.entry("byteorder", 64)? {
            if order != b"little" {
                return Err(malformed(
                    &self.path,
                    format!(
                        "byte order {:?} (only little-endian is read)",
                        String::from_utf8_lossy(&order)
                    ),
                ));
            }
        }
        let pickle = self
            .entry("data.pkl", MAX_PICKLE_BYTES)?
            .ok_or_else(|| malformed(&self.path, "data.pkl vanished".into()))?;
        // candle's reader returns errors for what we have seen go wrong, but its integer opcodes
        // shift and multiply unchecked (a panic in a debug build on a crafted stream): contain it.
        let parsed = std::panic::catch_unwind(move || {
            let mut stack = Stack::empty();
            stack
                .read_loop(&mut Cursor::new(pickle))
                .and_then(|()| stack.finalize())
                .map_err(|e| e.to_string())
        })
        .unwrap_or_else(|_| Err("the pickle reader gave up on this stream".into()));
        parsed.map_err(|e| malformed(&self.path, format!("data.pkl: {e}")))
    }

    /// The tensor's elements, row-major, as little-endian bytes of its dtype.
    fn read(&mut self, what: &str, t: &TensorRef) -> Result<Vec<u8>> {
        if !self.storages.contains_key(&t.storage) {
            let name = format!("data/{}", t.storage);
            let bytes =
                self.entry(&name, MAX_STORAGE_BYTES)?
                    .ok_or_else(|| InterchangeError::Missing {
                        path: self.path.clone(),
                        what: format!("storage {name} of {what}"),
                    })?;
            self.storages.insert(t.storage.clone(), bytes);
        }
        let storage = &self.storages[&t.storage];
        let es = elem_size(t.dtype);
        if storage.len() / es < t.storage_len {
            return Err(malformed(
                &self.path,
                format!(
                    "{what}: storage {} holds {} bytes, the pickle says {} elements",
                    t.storage,
                    storage.len(),
                    t.storage_len
                ),
            ));
        }
        gather(storage, es, t).map_err(|m| malformed(&self.path, format!("{what}: {m}")))
    }
}

fn malformed(path: &Path, message: String) -> InterchangeError {
    InterchangeError::Malformed {
        path: path.to_path_buf(),
        message,
    }
}

/// Copy a strided view out of a storage into row-major order, checking every index is in bounds.
fn gather(storage: &[u8], es: usize, t: &TensorRef) -> std::result::Result<Vec<u8>, String> {
    let count = t
        .size
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("element count overflows")?;
    if count == 0 {
        return Ok(Vec::new());
    }
    // A view with more elements than its storage repeats some (stride 0, `expand`): refused, which
    // also bounds the copy by the storage actually present in the file.
    if count > t.storage_len {
        return Err(format!(
            "view of {count} elements over a {}-element storage (a broadcast view?)",
            t.storage_len
        ));
    }
    // The furthest element the view can reach must lie inside the storage.
    let last = t
        .size
        .iter()
        .zip(&t.stride)
        .try_fold(t.offset, |a, (&d, &s)| {
            a.checked_add((d - 1).checked_mul(s)?)
        })
        .ok_or("strides overflow")?;
    if last >= t.storage_len {
        return Err(format!(
            "view (offset {}, size {:?}, stride {:?}) reaches element {last} of a {}-element storage",
            t.offset, t.size, t.stride, t.storage_len
        ));
    }
    let rank = t.size.len();
    let mut out = Vec::with_capacity(count * es);
    let mut index = vec![0usize; rank];
    for _ in 0..count {
        // In bounds: every index is below its size, so the sum is at most `last`.
        let at = t.offset
            + index
                .iter()
                .zip(&t.stride)
                .map(|(i, s)| i * s)
                .sum::<usize>();
        out.extend_from_slice(&storage[at * es..(at + 1) * es]);
        for k in (0..rank).rev() {
            index[k] += 1;
            if index[k] < t.size[k] {
                break;
            }
            index[k] = 0;
        }
    }
    Ok(out)
}

fn int(obj: &Object) -> Option<usize> {
    match obj {
        Object::Int(v) => usize::try_from(*v).ok(),
        Object::Long(v) => usize::try_from(*v).ok(),
        _ => None,
    }
}

fn ints(obj: &Object) -> Option<Vec<usize>> {
    match obj {
        Object::Tuple(items) | Object::List(items) => items.iter().map(int).collect(),
        _ => None,
    }
}

fn is_class(obj: &Object, module: &str, names: &[&str]) -> bool {
    matches!(obj, Object::Class { module_name, class_name }
        if module_name == module && names.contains(&class_name.as_str()))
}

/// A tensor or parameter object -> where its data is.
fn tensor_ref(obj: &Object) -> std::result::Result<TensorRef, String> {
    let Object::Reduce { callable, args } = obj else {
        return Err("not a tensor".into());
    };
    let Object::Tuple(args) = args.as_ref() else {
        return Err("tensor arguments are not a tuple".into());
    };
    let parameter = ["_rebuild_parameter", "_rebuild_parameter_with_state"];
    if is_class(callable, "torch._utils", &parameter) {
        // nn.Parameter(data, requires_grad, hooks[, state]): the data is an ordinary tensor.
        return tensor_ref(args.first().ok_or("parameter without data")?);
    }
    if !is_class(callable, "torch._utils", &["_rebuild_tensor_v2"]) {
        return Err(format!("unsupported tensor constructor {callable:?}"));
    }
    // _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks)
    let (Some(storage), Some(offset), Some(size), Some(stride)) = (
        args.first(),
        args.get(1).and_then(int),
        args.get(2).and_then(ints),
        args.get(3).and_then(ints),
    ) else {
        return Err("malformed _rebuild_tensor_v2 arguments".into());
    };
    if size.len() != stride.len() {
        return Err(format!(
            "size {size:?} and stride {stride:?} differ in rank"
        ));
    }
    // Persistent id: ("storage", <torch.XStorage class>, key, location, numel).
    let Object::PersistentLoad(id) = storage else {
        return Err("storage is not a persistent reference".into());
    };
    let Object::Tuple(id) = id.as_ref() else {
        return Err("malformed storage reference".into());
    };
    let (Some(Object::Class { class_name, .. }), Some(Object::Unicode(key)), Some(numel)) =
        (id.get(1), id.get(2), id.get(4).and_then(int))
    else {
        return Err("malformed storage reference".into());
    };
    let dtype = match class_name.as_str() {
        "FloatStorage" => DType::F32,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::Bf16,
        other => return Err(format!("{other}: f32, f16 and bf16 tensors are supported")),
    };
    // A storage key names a zip entry: keep it to one plain path component.
    if key.is_empty() || key.contains(['/', '\\']) || key == ".." {
        return Err(format!("storage key {key:?} is not a plain name"));
    }
    Ok(TensorRef {
        storage: key.clone(),
        dtype,
        storage_len: numel,
        offset,
        size,
        stride,
    })
}

/// A list of per-layer tensors: a plain list/tuple, or an `nn.ParameterList` (a pickled module
/// whose `_parameters` dict maps "0", "1", ... to the tensors).
fn tensor_list(obj: &Object) -> std::result::Result<Vec<&Object>, String> {
    match obj {
        Object::List(items) | Object::Tuple(items) => Ok(items.iter().collect()),
        Object::Build { callable, args } => {
            let module = match callable.as_ref() {
                Object::Reduce { callable, .. } => callable.as_ref(),
                other => other,
            };
            if !is_class(module, "torch.nn.modules.container", &["ParameterList"]) {
                return Err(format!("expected a list of tensors, found {module:?}"));
            }
            let Object::Dict(state) = args.as_ref() else {
                return Err("ParameterList state is not a dict".into());
            };
            let Some(Object::Dict(params)) = dict_get(state, "_parameters") else {
                return Err("ParameterList without _parameters".into());
            };
            let mut indexed = params
                .iter()
                .map(|(k, v)| match k {
                    Object::Unicode(k) => k.parse::<usize>().ok().map(|i| (i, v)),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
                .ok_or("ParameterList keys are not indices")?;
            indexed.sort_by_key(|(i, _)| *i);
            if indexed.iter().enumerate().any(|(n, (i, _))| n != *i) {
                return Err("ParameterList indices are not 0..n".into());
            }
            Ok(indexed.into_iter().map(|(_, v)| v).collect())
        }
        other => Err(format!("expected a list of tensors, found {other:?}")),
    }
}

fn dict_get<'a>(entries: &'a [(Object, Object)], key: &str) -> Option<&'a Object> {
    entries
        .iter()
        .find(|(k, _)| matches!(k, Object::Unicode(s) if s == key))
        .map(|(_, v)| v)
}

/// One per-layer list read out of the archive: `[H, n, D]` tensors as bytes, plus `n` and dtype.
struct Part {
    tokens: usize,
    tensors: Vec<(DType, Vec<u8>)>,
}

/// Read list `name` and check every tensor is `[1, H, n, D]` for this model, with one `n`.
fn read_part(
    archive: &mut Archive,
    dict: &[(Object, Object)],
    name: &str,
    model: &ModelFingerprint,
) -> Result<Part> {
    let path = archive.path.clone();
    let obj = dict_get(dict, name).ok_or_else(|| InterchangeError::Missing {
        path: path.clone(),
        what: format!("{name} (not a cartridge saved by the reference trainer?)"),
    })?;
    let items = tensor_list(obj).map_err(|m| malformed(&path, format!("{name}: {m}")))?;
    let (layers, heads, dim) = (
        model.num_layers as usize,
        model.num_kv_heads as usize,
        model.head_dim as usize,
    );
    let mut part = Part {
        tokens: 0,
        tensors: Vec::with_capacity(items.len()),
    };
    if items.is_empty() {
        return Ok(part);
    }
    if items.len() != layers {
        return Err(InterchangeError::WrongModel {
            path,
            message: format!("{name} has {} layers, the model {layers}", items.len()),
        });
    }
    for (l, item) in items.into_iter().enumerate() {
        let what = format!("{name}[{l}]");
        let t = tensor_ref(item).map_err(|m| malformed(&path, format!("{what}: {m}")))?;
        let shape_error = |expected: String| InterchangeError::Shape {
            path: path.clone(),
            tensor: what.clone(),
            expected,
            found: format!("{:?}", t.size),
        };
        let &[1, h, n, d] = t.size.as_slice() else {
            return Err(shape_error("[1, kv_heads, tokens, head_dim]".into()));
        };
        if (h, d) != (heads, dim) {
            return Err(InterchangeError::WrongModel {
                path,
                message: format!(
                    "{what} has {h} KV heads x head_dim {d}, the model {heads} x {dim}"
                ),
            });
        }
        if l > 0 && n != part.tokens {
            return Err(shape_error(format!(
                "[1, {heads}, {}, {dim}] like layer 0",
                part.tokens
            )));
        }
        part.tokens = n;
        let bytes = archive.read(&what, &t)?;
        part.tensors.push((t.dtype, bytes));
    }
    Ok(part)
}

/// Read a pickled reference cartridge for `model`.
pub fn import(path: &Path, model: &ModelFingerprint) -> Result<ImportedPrefix> {
    let mut archive = Archive::open(path)?;
    let tree = archive.object_tree()?;
    let Object::Dict(dict) = tree else {
        return Err(malformed(path, "the pickled object is not a dict".into()));
    };
    let (frozen_keys, frozen_values) = FROZEN_NAMES
        .into_iter()
        .find(|(k, _)| dict_get(&dict, k).is_some())
        .unwrap_or(FROZEN_NAMES[0]);
    let keys = read_part(&mut archive, &dict, "trainable_keys", model)?;
    let values = read_part(&mut archive, &dict, "trainable_values", model)?;
    let fkeys = read_part(&mut archive, &dict, frozen_keys, model)?;
    let fvalues = read_part(&mut archive, &dict, frozen_values, model)?;
    let shape_error = |tensor: &str, expected: usize, found: usize| InterchangeError::Shape {
        path: path.to_path_buf(),
        tensor: tensor.to_string(),
        expected: format!("{expected} tokens like its keys"),
        found: format!("{found} tokens"),
    };
    if values.tokens != keys.tokens || values.tensors.len() != keys.tensors.len() {
        return Err(shape_error("trainable_values", keys.tokens, values.tokens));
    }
    if fvalues.tokens != fkeys.tokens || fvalues.tensors.len() != fkeys.tensors.len() {
        return Err(shape_error(frozen_values, fkeys.tokens, fvalues.tokens));
    }
    if keys.tensors.is_empty() {
        return Err(InterchangeError::Missing {
            path: path.to_path_buf(),
            what: "trainable tokens (trainable_keys is empty)".into(),
        });
    }
    let (frozen, trainable) = (fkeys.tokens, keys.tokens);
    let tokens =
        u32::try_from(frozen + trainable).map_err(|_| malformed(path, "too many tokens".into()))?;
    let all = [&fkeys, &keys, &fvalues, &values];
    let first = keys.tensors[0].0;
    let uniform = all
        .iter()
        .all(|p| p.tensors.iter().all(|(dt, _)| *dt == first));
    let dtype = if uniform { first } else { DType::F32 };
    let bytes = |(dt, b): &(DType, Vec<u8>)| -> Vec<u8> {
        if *dt == dtype {
            b.clone()
        } else {
            widen_to_f32(b, *dt)
        }
    };
    // Per layer and head: the frozen rows, then the trainable rows.
    let heads = model.num_kv_heads as usize;
    let row = model.head_dim as usize * elem_size(dtype);
    let join = |fixed: Option<&(DType, Vec<u8>)>, train: &(DType, Vec<u8>)| -> Vec<u8> {
        let fixed = fixed.map(bytes).unwrap_or_default();
        let train = bytes(train);
        let mut out = Vec::with_capacity(fixed.len() + train.len());
        for h in 0..heads {
            out.extend_from_slice(&fixed[h * frozen * row..(h + 1) * frozen * row]);
            out.extend_from_slice(&train[h * trainable * row..(h + 1) * trainable * row]);
        }
        out
    };
    let mut tensors = Vec::with_capacity(2 * keys.tensors.len());
    for l in 0..keys.tensors.len() {
        tensors.push(join(fkeys.tensors.get(l), &keys.tensors[l]));
        tensors.push(join(fvalues.tensors.get(l), &values.tensors[l]));
    }
    Ok(ImportedPrefix {
        dims: Dims::Kv(KvDims {
            layers: model.num_layers,
            kv_heads: model.num_kv_heads,
            head_dim: model.head_dim,
            tokens,
            frozen_tokens: frozen as u32,
            biased: false,
        }),
        dtype,
        tensors,
        summary: None,
        metadata: BTreeMap::from([
            ("imported_from".to_string(), "torch".to_string()),
            ("source".to_string(), path.display().to_string()),
        ]),
    })
}
