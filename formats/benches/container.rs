//! Container figures for BENCHMARKS.md, measured side by side in one run:
//! open time (1 GiB vs 1 MiB, no verify), verify throughput vs memory-copy bandwidth, and zstd
//! ratio / decompression speed with and without byte shuffling.
//!
//! Run: `cargo bench -p cartridge-formats --bench container` (writes two files under $TMPDIR).
//! Pass `-- FILE.cart` to add the zstd figures for a real cartridge.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use cartridge_formats::cart::{self, CartContents, CartFile, Compression, DType, Dims, KvDims};
use cartridge_formats::fingerprint::sha256_hex;
use cartridge_formats::ModelFingerprint;

/// SmolLM2-135M shapes: 30 layers, 3 KV heads, head_dim 64 -> 46,080 bytes per f32 token.
fn smollm2() -> ModelFingerprint {
    ModelFingerprint {
        architecture: "llama".into(),
        num_layers: 30,
        hidden_size: 576,
        num_attention_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        vocab_size: 49152,
        rope_theta: 100000.0,
        rope_scaling: None,
        tokenizer_hash: sha256_hex(b"bench"),
        weights_hash: sha256_hex(b"bench"),
    }
}

/// Gaussian-ish f32 values (sum of uniforms), like trained keys and values.
fn gaussian(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..n)
        .map(|_| (next() + next() + next() + next() - 2.0) * 1.7)
        .collect()
}

fn write_cart(path: &Path, tokens: u32, compression: Compression) -> u64 {
    let per = 3 * tokens as usize * 64;
    let data = gaussian(per, 7);
    let bytes: &[u8] = bytemuck::cast_slice(&data);
    let contents = CartContents {
        dims: Dims::Kv(KvDims {
            layers: 30,
            kv_heads: 3,
            head_dim: 64,
            tokens,
            frozen_tokens: 1,
            biased: false,
        }),
        dtype: DType::F32,
        model: smollm2(),
        provenance: Default::default(),
        summary: None,
        tensors: vec![bytes; 60],
    };
    cart::write_file(path, &contents, compression).expect("write");
    std::fs::metadata(path).expect("stat").len()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time_open(path: &Path, reps: usize) -> (Duration, Duration, Duration) {
    let mut total = Vec::new();
    let mut map_only = Vec::new();
    let mut parse_only = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let f = CartFile::open(path).expect("open");
        total.push(t.elapsed());
        black_box(f.header().tensors.len());
        drop(f);

        let t = Instant::now();
        let file = std::fs::File::open(path).expect("open");
        // SAFETY: read-only map of a file nobody truncates during the benchmark.
        let map = unsafe { memmap2::Mmap::map(&file) }.expect("map");
        map_only.push(t.elapsed());
        let t = Instant::now();
        let view = cart::parse(&map).expect("parse");
        parse_only.push(t.elapsed());
        black_box(view.header.tensors.len());
    }
    (median(total), median(map_only), median(parse_only))
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn memcpy_bandwidth(len: usize) -> f64 {
    let src = vec![1u8; len];
    let mut dst = vec![0u8; len];
    dst.copy_from_slice(&src); // first touch
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(black_box(&src));
        best = best.min(t.elapsed());
        black_box(&dst);
    }
    // A copy reads and writes each byte; report bytes copied per second (as `memcpy` figures usually are).
    gbps(len as u64, best)
}

/// Byte shuffle: all first bytes of the f32s, then all second bytes, ... (as blosc/HDF5 do).
fn shuffle(bytes: &[u8], width: usize) -> Vec<u8> {
    let n = bytes.len() / width;
    let mut out = vec![0u8; bytes.len()];
    for i in 0..n {
        for b in 0..width {
            out[b * n + i] = bytes[i * width + b];
        }
    }
    out
}

fn zstd_figures(label: &str, raw: &[u8]) {
    for (name, input) in [("plain", raw.to_vec()), ("byte-shuffled", shuffle(raw, 4))] {
        let t = Instant::now();
        let frame = zstd::bulk::compress(&input, cart::write::ZSTD_LEVEL).expect("compress");
        let c = t.elapsed();
        let mut best = Duration::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            let out = zstd::bulk::decompress(&frame, input.len()).expect("decompress");
            best = best.min(t.elapsed());
            black_box(out);
        }
        println!(
            "| zstd-{} {label}, {name} | ratio {:.3} | compress {:.2} GB/s | decompress {:.2} GB/s |",
            cart::write::ZSTD_LEVEL,
            raw.len() as f64 / frame.len() as f64,
            gbps(raw.len() as u64, c),
            gbps(raw.len() as u64, best),
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let small = dir.path().join("1mib.cart");
    let big = dir.path().join("1gib.cart");
    let small_len = write_cart(&small, 23, Compression::None);
    let big_len = write_cart(&big, 23_302, Compression::None);

    println!("| figure | value |");
    println!("|---|---|");
    for (path, len) in [(&small, small_len), (&big, big_len)] {
        let (total, map, parse) = time_open(path, 200);
        println!(
            "| open {} file (no verify), median of 200 | {:.1} us total: mmap {:.1} us + parse {:.1} us |",
            cartridge_formats_human(len),
            total.as_secs_f64() * 1e6,
            map.as_secs_f64() * 1e6,
            parse.as_secs_f64() * 1e6
        );
    }

    let file = CartFile::open(&big).expect("open");
    file.verify().expect("warm page cache");
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        file.verify().expect("verify");
        best = best.min(t.elapsed());
    }
    // verify hashes the payload twice (stored checksum and per tensor, on two threads).
    let verify = gbps(file.header().payload.raw_len, best);
    let memcpy = memcpy_bandwidth(1 << 30);
    println!(
        "| verify 1 GiB (page cache warm, 2 threads) | {:.2} s, {verify:.1} GB/s of payload |",
        best.as_secs_f64()
    );
    println!("| memcpy bandwidth (1 GiB, one core) | {memcpy:.1} GB/s |");
    println!("| verify / memcpy | {:.2} |", verify / memcpy);

    let sample = file.raw_payload();
    let sample = &sample[..sample.len().min(64 << 20)];
    zstd_figures("synthetic gaussian f32 KV (64 MiB)", sample);
    for path in args {
        let f = CartFile::open(Path::new(&path)).expect("open cartridge");
        zstd_figures(&path, f.raw_payload());
    }
}

fn cartridge_formats_human(n: u64) -> String {
    if n >= 1 << 30 {
        format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.2} MiB", n as f64 / (1u64 << 20) as f64)
    }
}
