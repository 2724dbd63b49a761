//! Continuous batching: a request's tokens do not depend on the requests it shares the batch
//! with, nor on the number of slots; max_tokens, stop tokens and over-long prompts behave.

use infer::{generate, Finish, Request, SamplingParams};
use model::{Config, Model};

fn requests(v: u32) -> Vec<Request> {
    (0..7u32)
        .map(|i| Request {
            prompt: (0..(3 + i * 2)).map(|j| (i * 31 + j * 7 + 1) % v).collect(),
            params: SamplingParams {
                temperature: if i % 3 == 0 { 0.0 } else { 0.9 },
                top_k: 0,
                top_p: 0.95,
                seed: 100 + i as u64,
            },
            max_tokens: 5 + i as usize * 3,
        })
        .collect()
}

#[test]
fn batched_generation_equals_one_at_a_time() {
    let cfg = Config::from_toml(include_str!("../../../configs/tiny.toml")).unwrap();
    let params = Model::new(&cfg.model, 1, 1, 9).params;
    let v = cfg.model.vocab_size as u32;
    let reqs = requests(v);
    let alone: Vec<_> = reqs
        .iter()
        .map(|r| {
            generate(
                &cfg.model,
                &params,
                std::slice::from_ref(r),
                1,
                &[],
                &mut |_, _| {},
            )
        })
        .map(|mut g| g.remove(0))
        .collect();
    for slots in [2, 3, 8] {
        let mut done = vec![];
        let batched = generate(&cfg.model, &params, &reqs, slots, &[], &mut |i, _| {
            done.push(i)
        });
        done.sort();
        assert_eq!(
            done,
            (0..reqs.len()).collect::<Vec<_>>(),
            "every request reported once"
        );
        for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
            assert_eq!(a.tokens, b.tokens, "request {i} differs with {slots} slots");
            assert_eq!(b.tokens.len(), reqs[i].max_tokens);
            assert_eq!(b.finish, Finish::Length);
        }
    }
    // a stop token ends a request right after it is generated
    let stop = alone[1].tokens[2];
    let g = generate(&cfg.model, &params, &reqs[1..2], 1, &[stop], &mut |_, _| {});
    let first = alone[1].tokens.iter().position(|&t| t == stop).unwrap();
    assert_eq!(g[0].tokens, alone[1].tokens[..=first]);
    assert_eq!(g[0].finish, Finish::Stop);
    // a prompt as long as the context cannot generate anything
    let long = Request {
        prompt: vec![1; cfg.model.max_seq_len],
        ..reqs[0].clone()
    };
    let g = generate(&cfg.model, &params, &[long], 2, &[], &mut |_, _| {});
    assert!(g[0].tokens.is_empty() && g[0].finish == Finish::Length);
}
