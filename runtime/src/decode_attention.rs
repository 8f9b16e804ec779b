//! Attention of one new token per sequence (decoding) on the CPU, reading the shared prefix and
//! each sequence's KV cache where they lie.
//!
//! Why: composed from candle ops, a decode step's attention is about twenty ops per layer, each a
//! pass over memory with its own allocation and thread dispatch, and the prefix part reorders the
//! queries and scores twice more; with a 256-slot cartridge, batch-32 decoding ran at two thirds
//! of its speed without one (BENCHMARKS.md, runtime). The fused prefill op
//! ([`crate::attention`]) would copy the prefix and every cache into one key matrix per step.
//! Here, per KV head and group of sequences, the queries of all those sequences score the shared
//! prefix in one matrix product (the prefix is read once per group, not once per sequence), each
//! sequence's own cache slots are scored in place, one softmax runs over both, and the values are
//! summed the same way.
//!
//! There is no backward: decoding is never differentiated, and the training path never comes
//! here ([`crate::models::transformer`] calls this only on the inference path).

use candle_core::{DType, Storage, Tensor};
use rayon::prelude::*;

use crate::cpu_kernel::{mm, softmax, Elem};
use crate::error::{Error, Result};
use crate::prefix::PrefixLayer;

/// Sequences per task: their queries share one pass over the prefix's keys and values, and
/// enough tasks remain to keep the cores busy (a task is one KV head of this many sequences).
const SEQS_PER_TASK: usize = 8;

/// Multiply-adds (per score pass) below which a step runs on the calling thread.
const PARALLEL_WORK: usize = 1 << 20;

/// Softmax attention of one query token per sequence. `q: [b, kv_heads, groups, d]`, already
/// scaled by `1/sqrt(d)` (the query heads of a KV head adjacent); `prefix`: `[kv_heads, P, d]`
/// keys and values shared by the batch, with their logit bias if any; `k, v: [b, kv_heads, slots, d]`, the sequences' own
/// slots (the cache with the new token's K/V appended; a view into a larger buffer is read in
/// place). Sequence `b` sees the whole prefix and its own slots from `pads[b]` on (left padding,
/// as [`crate::KvCache`] lays it out). Returns `[b, kv_heads, groups, d]`.
pub(crate) fn decode_attention(
    q: &Tensor,
    prefix: Option<PrefixLayer<'_>>,
    k: &Tensor,
    v: &Tensor,
    pads: &[usize],
) -> Result<Tensor> {
    let (b, kvh, g, d) = q.dims4()?;
    let (kb, kkvh, slots, kd) = k.dims4()?;
    if kb != b || kkvh != kvh || kd != d || v.dims() != k.dims() || pads.len() != b || slots == 0 {
        return Err(Error::Msg(format!(
            "decode attention: q {:?}, k {:?}, v {:?}, {} pads do not fit",
            q.dims(),
            k.dims(),
            v.dims(),
            pads.len()
        )));
    }
    let (kp, vp) = match prefix {
        Some(PrefixLayer { k: kp, v: vp, .. }) if kp.dim(1)? > 0 => {
            (Some(kp.contiguous()?), Some(vp.contiguous()?))
        }
        _ => (None, None),
    };
    let p = kp.as_ref().map_or(Ok(0), |kp| kp.dim(1))?;
    let bias = match prefix {
        Some(pl) => pl.bias_values(kvh, "decode attention")?,
        None => Vec::new(),
    };
    if let (Some(kp), Some(vp)) = (&kp, &vp) {
        if kp.dims() != [kvh, p, d] || vp.dims() != kp.dims() {
            return Err(Error::Msg(format!(
                "decode attention: prefix {:?} / {:?} does not fit {kvh} KV heads of width {d}",
                kp.dims(),
                vp.dims()
            )));
        }
    }
    // The newest slot is the query's own; it sees its real slots, or only itself if it is
    // padding (never the case when decoding, but every softmax must have a column).
    let query = slots - 1;
    let ranges: Vec<(usize, usize)> = pads
        .iter()
        .map(|&pad| (if query >= pad { pad } else { query }, slots))
        .collect();
    let dims = Dims { b, kvh, g, d, p };
    let q = q.contiguous()?;
    let out = match q.dtype() {
        DType::F32 => Tensor::from_vec(
            run::<f32>(&dims, &ranges, &q, (kp.as_ref(), vp.as_ref(), &bias), k, v)?,
            (b, kvh, g, d),
            q.device(),
        )?,
        DType::F64 => Tensor::from_vec(
            run::<f64>(&dims, &ranges, &q, (kp.as_ref(), vp.as_ref(), &bias), k, v)?,
            (b, kvh, g, d),
            q.device(),
        )?,
        dt => {
            return Err(Error::Msg(format!(
                "decode attention runs in f32/f64, not {dt:?}"
            )))
        }
    };
    Ok(out)
}

#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    kvh: usize,
    g: usize,
    d: usize,
    /// Prefix slots.
    p: usize,
}

/// A CPU tensor's elements as `T`, from its storage's start, with where the tensor begins and its
/// strides (in elements).
struct Strided<'a, T> {
    data: &'a [T],
    offset: usize,
    stride: [usize; 4],
}

impl<'a, T: Elem> Strided<'a, T> {
    /// The view of a `[b, kv_heads, slots, d]` tensor whose slots are rows of `d` contiguous
    /// elements (the cache buffer's layout), whatever its strides above that.
    fn new(s: &'a Storage, l: &candle_core::Layout, d: usize) -> Result<Self> {
        let (st, dims) = (l.stride(), l.dims());
        // A dimension of size 1 may carry any stride (candle calls `[b, h, 1, d]` transposed
        // from `[b, 1, h, d]` contiguous): only the strides of longer ones must fit.
        let fits = |i: usize, want: usize| dims[i] == 1 || st[i] == want;
        if st.len() != 4 || !fits(3, 1) || !fits(2, d) {
            return Err(Error::Msg(format!(
                "decode attention: cache strides {st:?} are not rows of {d}"
            )));
        }
        Ok(Self {
            data: cpu(s)?,
            offset: l.start_offset(),
            stride: [st[0], st[1], st[2], st[3]],
        })
    }

    /// Row `j` (of `d` contiguous elements) of sequence `bi`, KV head `kh`, to the storage's end.
    fn rows_from(&self, bi: usize, kh: usize, j: usize) -> &[T] {
        &self.data[self.offset + bi * self.stride[0] + kh * self.stride[1] + j * self.stride[2]..]
    }
}

/// A CPU storage's elements as `T`.
fn cpu<T: Elem>(s: &Storage) -> Result<&[T]> {
    match s {
        Storage::Cpu(c) => Ok(c.as_slice::<T>()?),
        _ => Err(Error::Msg(
            "decode attention: a tensor is not on the CPU".into(),
        )),
    }
}

/// Borrow the CPU storages of the inputs and run the kernel.
fn run<T: Elem>(
    dims: &Dims,
    ranges: &[(usize, usize)],
    q: &Tensor,
    (kp, vp, bias): (Option<&Tensor>, Option<&Tensor>, &[f32]),
    k: &Tensor,
    v: &Tensor,
) -> Result<Vec<T>> {
    let (sq, lq) = q.storage_and_layout();
    let (sk, lk) = k.storage_and_layout();
    let (sv, lv) = v.storage_and_layout();
    let kp_guard = kp.map(|t| t.storage_and_layout());
    let vp_guard = vp.map(|t| t.storage_and_layout());
    let q = &cpu(&sq)?[lq.start_offset()..];
    let k = Strided::new(&sk, lk, dims.d)?;
    let v = Strided::new(&sv, lv, dims.d)?;
    let kp = match &kp_guard {
        Some((s, l)) => &cpu(s)?[l.start_offset()..],
        None => &[],
    };
    let vp = match &vp_guard {
        Some((s, l)) => &cpu(s)?[l.start_offset()..],
        None => &[],
    };
    Ok(kernel(dims, ranges, q, (kp, vp, bias), &k, &v))
}

fn kernel<T: Elem>(
    dims: &Dims,
    ranges: &[(usize, usize)],
    q: &[T],
    (kp, vp, bias): (&[T], &[T], &[f32]),
    k: &Strided<'_, T>,
    v: &Strided<'_, T>,
) -> Vec<T> {
    let Dims { b, kvh, g, d, p } = *dims;
    let tasks: Vec<(usize, usize)> = (0..kvh)
        .flat_map(|kh| (0..b).step_by(SEQS_PER_TASK).map(move |b0| (kh, b0)))
        .collect();
    let task = |&(kh, b0): &(usize, usize)| {
        let seqs = b0..(b0 + SEQS_PER_TASK).min(b);
        let rows = seqs.len() * g;
        // This group's queries as one [rows, d] matrix, rows (sequence, group).
        let mut qt = Vec::with_capacity(rows * d);
        for bi in seqs.clone() {
            let at = (bi * kvh + kh) * g * d;
            qt.extend_from_slice(&q[at..at + g * d]);
        }
        let span = |bi: usize| ranges[bi].1 - ranges[bi].0;
        let w = p + seqs.clone().map(span).max().unwrap_or(0);
        // Scores [rows, w]: the prefix's columns, then the row's own visible slots.
        let mut s = vec![T::zero(); rows * w];
        let (kp_h, vp_h) = (&kp[kh * p * d..][..p * d], &vp[kh * p * d..][..p * d]);
        mm((rows, p, d), &mut s, w, false, &qt, (d, 1), kp_h, (1, d));
        if let Some(bias) = bias.get(kh * p..(kh + 1) * p) {
            for row in s.chunks_mut(w) {
                for (x, &b) in row.iter_mut().zip(bias) {
                    *x += T::from_f64(b as f64);
                }
            }
        }
        for (i, bi) in seqs.clone().enumerate() {
            let keys = k.rows_from(bi, kh, ranges[bi].0);
            for r in i * g..(i + 1) * g {
                let qr = &qt[r * d..(r + 1) * d];
                let row = &mut s[r * w + p..r * w + p + span(bi)];
                for (j, x) in row.iter_mut().enumerate() {
                    *x = dot(qr, &keys[j * d..(j + 1) * d]);
                }
            }
        }
        for (r, row) in s.chunks_mut(w).enumerate() {
            softmax(&mut row[..p + span(seqs.start + r / g)], &mut []);
        }
        // Output [rows, d]: the prefix's values by one product, then the own slots'.
        let mut o = vec![T::zero(); rows * d];
        mm((rows, d, p), &mut o, d, false, &s, (w, 1), vp_h, (d, 1));
        for (i, bi) in seqs.clone().enumerate() {
            let values = v.rows_from(bi, kh, ranges[bi].0);
            for r in i * g..(i + 1) * g {
                let probs = &s[r * w + p..r * w + p + span(bi)];
                let out = &mut o[r * d..(r + 1) * d];
                for (j, &pr) in probs.iter().enumerate() {
                    for (o, &x) in out.iter_mut().zip(&values[j * d..(j + 1) * d]) {
                        *o += pr * x;
                    }
                }
            }
        }
        o
    };
    // Small steps run on the calling thread: waking the pool costs more than their work.
    let work = b * kvh * g * (p + ranges.iter().map(|r| r.1 - r.0).max().unwrap_or(0)) * d;
    let parts: Vec<Vec<T>> = if work < PARALLEL_WORK {
        tasks.iter().map(task).collect()
    } else {
        tasks.par_iter().map(task).collect()
    };
    let mut out = vec![T::zero(); b * kvh * g * d];
    for (&(kh, b0), part) in tasks.iter().zip(&parts) {
        for (i, rows) in part.chunks(g * d).enumerate() {
            let at = ((b0 + i) * kvh + kh) * g * d;
            out[at..at + g * d].copy_from_slice(rows);
        }
    }
    out
}

/// Dot product in independent lanes (a single float chain does not vectorise).
#[inline]
fn dot<T: Elem>(a: &[T], b: &[T]) -> T {
    const LANES: usize = 16;
    let mut acc = [T::zero(); LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .fold(T::zero(), |s, (&x, &y)| s + x * y);
    for (xa, xb) in ca.zip(cb) {
        for ((s, &x), &y) in acc.iter_mut().zip(xa).zip(xb) {
            *s += x * y;
        }
    }
    acc.iter().fold(tail, |s, &x| s + x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// The composed reference: softmax over prefix ++ visible own slots, per query head, the
    /// prefix's bias added to its scores.
    fn reference(
        q: &Tensor,
        prefix: Option<PrefixLayer<'_>>,
        k: &Tensor,
        v: &Tensor,
        pads: &[usize],
    ) -> Tensor {
        let (b, kvh, g, d) = q.dims4().unwrap();
        let slots = k.dim(2).unwrap();
        let mut outs = Vec::new();
        for (bi, &pad) in pads.iter().enumerate() {
            let lo = pad.min(slots - 1);
            let mut heads = Vec::new();
            for kh in 0..kvh {
                let own = |t: &Tensor| {
                    t.get(bi)
                        .unwrap()
                        .get(kh)
                        .unwrap()
                        .narrow(0, lo, slots - lo)
                };
                let mut keys = vec![own(k).unwrap()];
                let mut vals = vec![own(v).unwrap()];
                let mut bias = vec![Tensor::zeros(slots - lo, q.dtype(), q.device()).unwrap()];
                if let Some(pl) = prefix {
                    keys.insert(0, pl.k.get(kh).unwrap());
                    vals.insert(0, pl.v.get(kh).unwrap());
                    let p = pl.k.dim(1).unwrap();
                    bias.insert(
                        0,
                        match pl.bias {
                            Some(b) => b.get(kh).unwrap().to_dtype(q.dtype()).unwrap(),
                            None => Tensor::zeros(p, q.dtype(), q.device()).unwrap(),
                        },
                    );
                }
                let keys = Tensor::cat(&keys, 0).unwrap();
                let vals = Tensor::cat(&vals, 0).unwrap();
                let bias = Tensor::cat(&bias, 0).unwrap();
                let qh = q.get(bi).unwrap().get(kh).unwrap();
                let s = qh
                    .matmul(&keys.t().unwrap())
                    .unwrap()
                    .broadcast_add(&bias)
                    .unwrap();
                let max = s.max_keepdim(D::Minus1).unwrap();
                let e = s.broadcast_sub(&max).unwrap().exp().unwrap();
                let pr = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
                heads.push(pr.matmul(&vals).unwrap());
            }
            outs.push(Tensor::stack(&heads, 0).unwrap());
        }
        Tensor::stack(&outs, 0)
            .unwrap()
            .reshape((b, kvh, g, d))
            .unwrap()
    }

    fn layer<'a>((k, v, bias): (&'a Tensor, &'a Tensor, Option<&'a Tensor>)) -> PrefixLayer<'a> {
        PrefixLayer { k, v, bias }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn matches_the_composed_softmax_over_prefix_and_padded_cache() {
        let dev = Device::Cpu;
        // 11 sequences (two tasks, the second partial), 3 KV heads of 2 query heads, d = 20 (a
        // lane tail), a cache view of 9 slots inside a 16-slot buffer, uneven left padding.
        let (b, kvh, g, d, slots, cap) = (11, 3, 2, 20, 9, 16);
        let q = Tensor::randn(0f64, 1.0, (b, kvh, g, d), &dev).unwrap();
        let kbuf = Tensor::randn(0f64, 1.0, (b, kvh, cap, d), &dev).unwrap();
        let vbuf = Tensor::randn(0f64, 1.0, (b, kvh, cap, d), &dev).unwrap();
        let (k, v) = (
            kbuf.narrow(2, 0, slots).unwrap(),
            vbuf.narrow(2, 0, slots).unwrap(),
        );
        let pads: Vec<usize> = (0..b).map(|i| (i * 3) % slots).collect();
        let kp = Tensor::randn(0f64, 1.0, (kvh, 7, d), &dev).unwrap();
        let vp = Tensor::randn(0f64, 1.0, (kvh, 7, d), &dev).unwrap();
        let bias = Tensor::randn(0f32, 2.0, (kvh, 7), &dev).unwrap();
        let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let (kp32, vp32) = (f32s(&kp), f32s(&vp));
        for (name, prefix, prefix32) in [
            ("prefix", Some((&kp, &vp, None)), Some((&kp32, &vp32, None))),
            (
                "biased prefix",
                Some((&kp, &vp, Some(&bias))),
                Some((&kp32, &vp32, Some(&bias))),
            ),
            ("no prefix", None, None),
        ] {
            let got = decode_attention(&q, prefix.map(layer), &k, &v, &pads).unwrap();
            let want = reference(&q, prefix.map(layer), &k, &v, &pads);
            let diff = max_diff(&got, &want);
            assert!(diff < 1e-12, "{name}: max diff {diff:e}");
            let got32 =
                decode_attention(&f32s(&q), prefix32.map(layer), &f32s(&k), &f32s(&v), &pads)
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap();
            let diff = max_diff(&got32, &want);
            assert!(diff < 1e-5, "f32, {name}: max diff {diff:e}");
        }
    }

    #[test]
    fn a_single_slot_from_a_transpose_is_read_right() {
        // One token without a cache: K/V `[b, 1, kv, d]` transposed to `[b, kv, 1, d]`, which
        // candle deems contiguous with a slot stride that is not `d`.
        let dev = Device::Cpu;
        let (b, kvh, g, d) = (3, 2, 2, 16);
        let q = Tensor::randn(0f64, 1.0, (b, kvh, g, d), &dev).unwrap();
        let k = Tensor::randn(0f64, 1.0, (b, 1, kvh, d), &dev)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let v = Tensor::randn(0f64, 1.0, (b, 1, kvh, d), &dev)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        assert!(k.is_contiguous() && k.stride()[2] != d);
        let kp = Tensor::randn(0f64, 1.0, (kvh, 5, d), &dev).unwrap();
        let vp = Tensor::randn(0f64, 1.0, (kvh, 5, d), &dev).unwrap();
        let pads = [0; 3];
        let prefix = PrefixLayer {
            k: &kp,
            v: &vp,
            bias: None,
        };
        let got = decode_attention(&q, Some(prefix), &k, &v, &pads).unwrap();
        let want = reference(&q, Some(prefix), &k, &v, &pads);
        assert!(max_diff(&got, &want) < 1e-12);
    }

    #[test]
    fn refuses_tensors_that_do_not_fit() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((2, 3, 2, 8), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((2, 3, 5, 8), DType::F32, &dev).unwrap();
        let short = Tensor::zeros((2, 3, 5, 4), DType::F32, &dev).unwrap();
        assert!(decode_attention(&q, None, &k, &short, &[0, 0]).is_err());
        assert!(decode_attention(&q, None, &k, &k, &[0]).is_err());
        let kp = Tensor::zeros((2, 4, 8), DType::F32, &dev).unwrap();
        let prefix = PrefixLayer {
            k: &kp,
            v: &kp,
            bias: None,
        };
        assert!(decode_attention(&q, Some(prefix), &k, &k, &[0, 0]).is_err());
        // A bias of the wrong shape too.
        let kp = Tensor::zeros((3, 4, 8), DType::F32, &dev).unwrap();
        let bias = Tensor::zeros((3, 5), DType::F32, &dev).unwrap();
        let prefix = PrefixLayer {
            k: &kp,
            v: &kp,
            bias: Some(&bias),
        };
        assert!(decode_attention(&q, Some(prefix), &k, &k, &[0, 0]).is_err());
        // A transposed cache (slots not rows of d) is refused, not misread.
        let kt = Tensor::zeros((2, 3, 8, 5), DType::F32, &dev)
            .unwrap()
            .transpose(2, 3)
            .unwrap();
        assert!(decode_attention(&q, None, &kt, &kt, &[0, 0]).is_err());
    }
}
