//! How long building llguidance's token table ([`Grammars::new`]) takes on a Llama-3-sized
//! vocabulary: a synthesized byte-level BPE `tokenizer.json` of 128,000 tokens (each a known
//! token plus one byte, so every merge is valid, mostly letters and spaces, at most 16 bytes),
//! 256 special tokens, and the other splits of each token as extra merges. Prints each run
//! and the median; the first run pays for cold caches too. The engine builds the table on a
//! thread of its own ([`Grammars::spawn`]); BENCHMARKS.md has the figures.
//!
//! usage: cargo run --release -p multilora-engine --example token_table -- [RUNS] [VOCAB]

use std::collections::HashSet;
use std::str::FromStr;
use std::time::Instant;

use multilora_engine::Grammars;
use serde_json::{json, Map, Value};

/// GPT-2's byte-to-character map of byte-level BPE.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut out = vec!['\0'; 256];
    let mut next = 256;
    for b in 0..256u32 {
        let c = if printable.contains(&b) {
            b
        } else {
            next += 1;
            next - 1
        };
        out[b as usize] = char::from_u32(c).unwrap_or('?');
    }
    out
}

/// A deterministic xorshift, so every run times the same vocabulary.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn tokenizer_json(vocab_size: usize) -> Value {
    let chars = byte_chars();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    // Mostly lowercase letters and spaces, as text is; any byte now and then.
    let common: Vec<u8> = b"etaoinshrdlucmfwypvbgkjqxz     ETAOINSHRDLU.,'\"-_()0123456789\n".to_vec();
    let mut vocab: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
    let mut seen: HashSet<String> = vocab.iter().cloned().collect();
    let mut merges = Vec::new();
    while vocab.len() < vocab_size {
        // A short prefix more often than a long one: most tokens are 2-8 bytes.
        let a = vocab.len().min(256 + rng.below(vocab.len()));
        let prefix = vocab[rng.below(a)].clone();
        let byte = match rng.below(10) {
            0 => rng.below(256) as u8,
            _ => common[rng.below(common.len())],
        };
        let suffix = chars[byte as usize].to_string();
        let token = format!("{prefix}{suffix}");
        if token.chars().count() > 16 || !seen.insert(token.clone()) {
            continue;
        }
        merges.push(json!([prefix, suffix]));
        vocab.push(token);
    }
    // Real vocabularies list about twice as many merges as tokens (Llama 3: 280,147 for 128,000
    // tokens): a token made by more than one pair. Here each other split whose halves are tokens.
    for t in &vocab {
        let cs: Vec<char> = t.chars().collect();
        for k in 1..cs.len().saturating_sub(1) {
            let (a, b): (String, String) = (cs[..k].iter().collect(), cs[k..].iter().collect());
            if merges.len() < 2 * vocab_size && seen.contains(&a) && seen.contains(&b) {
                merges.push(json!([a, b]));
            }
        }
    }
    let vocab: Map<String, Value> = (vocab.into_iter().enumerate())
        .map(|(i, t)| (t, json!(i)))
        .collect();
    let added: Vec<Value> = (0..256)
        .map(|i| {
            json!({"id": vocab_size + i, "content": format!("<|reserved_special_token_{i}|>"),
                   "single_word": false, "lstrip": false, "rstrip": false, "normalized": false,
                   "special": true})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                            "use_regex": true});
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
                  "byte_fallback": false, "ignore_merges": true, "vocab": vocab, "merges": merges},
    })
}

fn tokenizer_merges(json: &str) -> Result<usize, serde_json::Error> {
    let v: Value = serde_json::from_str(json)?;
    Ok(v["model"]["merges"].as_array().map_or(0, Vec::len))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().map_or(Ok(5), |a| a.parse())?;
    let num_tokens: usize = args.next().map_or(Ok(128_000), |a| a.parse())?;
    let json = tokenizer_json(num_tokens).to_string();
    let tokenizer = tokenizers::Tokenizer::from_str(&json).map_err(|e| e.to_string())?;
    let vocab_size = tokenizer.get_vocab_size(true);
    let eos = [vocab_size as u32 - 1];
    println!(
        "vocabulary: {vocab_size} tokens, {} merges, tokenizer.json {:.1} MB",
        tokenizer_merges(&json)?,
        json.len() as f64 / 1e6
    );
    let mut times = Vec::new();
    for run in 0..runs {
        let start = Instant::now();
        let grammars = Grammars::new(&tokenizer, vocab_size, &eos)?;
        let secs = start.elapsed().as_secs_f64();
        drop(grammars);
        // Its first part: the tokenizer serialized back to JSON for llguidance's reader.
        let start = Instant::now();
        let value = serde_json::to_value(&tokenizer)?;
        let to_json = start.elapsed().as_secs_f64();
        drop(value);
        println!("run {run}: Grammars::new {secs:.3} s (of which tokenizer to JSON about {to_json:.3} s)");
        times.push(secs);
    }
    times.sort_by(f64::total_cmp);
    println!("median of {runs}: {:.3} s", times[runs / 2]);
    Ok(())
}
