//! Single-stream speed of a config's shape (random weights) through `Decoder::step` alone:
//! a prompt fed one token per step (what every prompt cost before batched prefill) and greedy
//! decoding. Only `Decoder::new`, `reset` and `step` are used, an API every version since the
//! decoder has, so this file also builds against an older commit to measure it side by side.
//!
//! Usage: cargo run --release -p model --example decode_speed -- CONFIG [PROMPT GEN REPS]
use model::decode::Decoder;
use model::{Config, Model};
use rand::{Rng, SeedableRng};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = Config::from_file(std::path::Path::new(&args[0]))
        .expect("config")
        .model;
    let num = |i: usize, d: usize| args.get(i).map_or(d, |a| a.parse().expect("number"));
    let (prompt_len, gen, reps) = (num(1, 200), num(2, 256), num(3, 5));
    let params = Model::new(&cfg, 1, 1, 0).params;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let v = cfg.vocab_size as u32;
    let prompt: Vec<u32> = (0..prompt_len).map(|_| rng.gen_range(0..v)).collect();
    let mut dec = Decoder::new(&cfg);
    dec.step(&params, 1);
    let (mut pp, mut tg) = (vec![], vec![]);
    for _ in 0..reps {
        dec.reset();
        let t = Instant::now();
        for &tok in &prompt {
            dec.step(&params, tok);
        }
        pp.push(t.elapsed().as_secs_f64());
        dec.reset();
        let t = Instant::now();
        let mut tok = 1 % v;
        for _ in 0..gen {
            let logits = dec.step(&params, tok);
            tok = (0..logits.len())
                .max_by(|&i, &j| logits[i].total_cmp(&logits[j]))
                .unwrap_or(0) as u32;
        }
        tg.push(gen as f64 / t.elapsed().as_secs_f64());
    }
    println!(
        "{} threads: prompt of {prompt_len} one token per step {:.1} ms; decode tg{gen} {:.0} tokens/s",
        rayon::current_num_threads(),
        1e3 * median(pp),
        median(tg)
    );
}
