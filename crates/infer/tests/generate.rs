//! Continuous batching: a request's tokens do not depend on the requests it shares the batch
//! with, nor on the number of slots; max_tokens, stop tokens and over-long prompts behave.

use infer::{
    generate, Engine, EngineConfig, Event, Finish, Request, SamplingParams, Seq, SubmitError,
};
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

/// Each request generated on its own (one slot, nothing beside it).
fn each_alone(cfg: &model::ModelConfig, params: &[f32], reqs: &[Request]) -> Vec<infer::Generated> {
    reqs.iter()
        .map(|r| {
            generate(
                cfg,
                params,
                None,
                std::slice::from_ref(r),
                1,
                &[],
                &mut |_, _| {},
            )
        })
        .map(|mut g| g.remove(0))
        .collect()
}

#[test]
fn batched_generation_equals_one_at_a_time() {
    let cfg = Config::from_toml(include_str!("../../../configs/tiny.toml")).unwrap();
    let params = Model::new(&cfg.model, 1, 1, 9).params;
    let v = cfg.model.vocab_size as u32;
    let reqs = requests(v);
    let alone = each_alone(&cfg.model, &params, &reqs);
    for slots in [2, 3, 8] {
        let mut done = vec![];
        let batched = generate(&cfg.model, &params, None, &reqs, slots, &[], &mut |i, _| {
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
    let g = generate(
        &cfg.model,
        &params,
        None,
        &reqs[1..2],
        1,
        &[stop],
        &mut |_, _| {},
    );
    let first = alone[1].tokens.iter().position(|&t| t == stop).unwrap();
    assert_eq!(g[0].tokens, alone[1].tokens[..=first]);
    assert_eq!(g[0].finish, Finish::Stop);
    // a prompt as long as the context cannot generate anything
    let long = Request {
        prompt: vec![1; cfg.model.max_seq_len],
        ..reqs[0].clone()
    };
    let g = generate(&cfg.model, &params, None, &[long], 2, &[], &mut |_, _| {});
    assert!(g[0].tokens.is_empty() && g[0].finish == Finish::Length);
}

/// Runs `seq` on `engine` and collects its events.
fn submit(
    engine: &Engine,
    seq: Seq,
    cancel_after: usize,
) -> Result<std::sync::mpsc::Receiver<Event>, SubmitError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let mut n = 0;
    engine.submit(
        seq,
        Box::new(move |ev| {
            n += matches!(ev, Event::Token(_)) as usize;
            let _ = tx.send(ev);
            n < cancel_after
        }),
    )?;
    Ok(rx)
}

fn collect(rx: std::sync::mpsc::Receiver<Event>) -> (Vec<u32>, Finish) {
    let mut toks = vec![];
    for ev in rx {
        match ev {
            Event::Logprobs(_) => {}
            Event::Token(t) => toks.push(t),
            Event::Done(f) => return (toks, f),
        }
    }
    panic!("the engine dropped a request without Done");
}

#[test]
fn engine_requests_from_many_threads_equal_generation_alone() {
    let cfg = Config::from_toml(include_str!("../../../configs/tiny.toml")).unwrap();
    let params = Model::new(&cfg.model, 1, 1, 9).params;
    let reqs = requests(cfg.model.vocab_size as u32);
    let alone = generate(&cfg.model, &params, None, &reqs, 1, &[], &mut |_, _| {});
    let engine = Engine::start(
        &cfg.model,
        params.clone(),
        EngineConfig {
            slots: 3,
            max_queue: 64,
            ..Default::default()
        },
    );
    let seq = |r: &Request| Seq {
        prompt: r.prompt.clone(),
        params: r.params,
        max_tokens: r.max_tokens,
        stop: vec![],
        logprobs: None,
    };
    std::thread::scope(|s| {
        let hs: Vec<_> = reqs
            .iter()
            .map(|r| {
                let (engine, seq) = (&engine, seq(r));
                s.spawn(move || collect(submit(engine, seq, usize::MAX).unwrap()))
            })
            .collect();
        for (i, h) in hs.into_iter().enumerate() {
            let (toks, fin) = h.join().unwrap();
            assert_eq!(toks, alone[i].tokens, "request {i}");
            assert_eq!(fin, Finish::Length);
        }
    });
    // a sink that returns false cancels its request at once
    let (toks, fin) = collect(submit(&engine, seq(&reqs[6]), 3).unwrap());
    assert_eq!(
        (toks.as_slice(), fin),
        (&alone[6].tokens[..3], Finish::Cancelled)
    );
    // prompts that cannot start are refused up front
    let long = Seq {
        prompt: vec![1; cfg.model.max_seq_len],
        ..seq(&reqs[0])
    };
    assert!(matches!(
        submit(&engine, long, 1),
        Err(SubmitError::TooLong { .. })
    ));
    let st = engine.stats();
    assert!(st.steps > 0 && st.generated > 0 && st.queued == 0, "{st:?}");
}

#[test]
fn engine_queue_is_bounded() {
    let (engine, reqs) = one_slot_engine(2);
    // a slow first request holds the only slot while the queue fills
    let seq = Seq {
        prompt: reqs[0].prompt.clone(),
        params: reqs[0].params,
        max_tokens: 4,
        stop: vec![],
        logprobs: None,
    };
    let gate_tx = submit_gated(&engine, seq.clone());
    let a = submit(&engine, seq.clone(), usize::MAX).unwrap();
    let b = submit(&engine, seq.clone(), usize::MAX).unwrap();
    assert_eq!(
        submit(&engine, seq.clone(), usize::MAX).err(),
        Some(SubmitError::QueueFull(2))
    );
    drop(gate_tx); // release the first request
    assert_eq!(collect(a).0.len(), 4);
    assert_eq!(collect(b).0.len(), 4);
    assert!(submit(&engine, seq, usize::MAX).is_ok(), "room again");
}

#[test]
fn logprobs_are_the_model_distribution_and_its_top_n() {
    let logits = [0.5f32, 2.0, -1.0, 2.0, 0.0];
    let lp = infer::TokenLogprobs::of(&logits, 3, 3);
    let z: f64 = logits.iter().map(|&x| (x as f64).exp()).sum();
    let want = |i: usize| (logits[i] as f64 - z.ln()) as f32;
    assert_eq!(lp.logprob, want(3));
    // most likely first; a tie goes to the lower id
    assert_eq!(lp.top, vec![(1, want(1)), (3, want(3)), (0, want(0))]);
    assert_eq!(infer::TokenLogprobs::of(&logits, 2, 0).top, vec![]);
    assert_eq!(infer::TokenLogprobs::of(&logits, 2, 99).top.len(), 5);
}

/// Prompts longer than a step's prefill budget (`PREFILL_CHUNK` rows shared by the prompts
/// of a step) go in over several steps, interleaved with other streams' decode steps and
/// with each other; every request still gets exactly the tokens it gets alone.
#[test]
fn long_prompts_split_across_steps_equal_one_at_a_time() {
    let chunk = model::decode::PREFILL_CHUNK;
    let text = include_str!("../../../configs/tiny.toml").replace(
        "max_seq_len = 64 ",
        &format!("max_seq_len = {} ", 3 * chunk + 40),
    );
    let cfg = Config::from_toml(&text).unwrap();
    let params = Model::new(&cfg.model, 1, 1, 4).params;
    let v = cfg.model.vocab_size as u32;
    let mut reqs = requests(v);
    // two prompts of 2.3 and 1.6 chunks among the short ones, one of them sampled
    for (at, len) in [(2, 2 * chunk + chunk / 3), (5, chunk + 2 * chunk / 3)] {
        reqs[at].prompt = (0..len as u32).map(|j| (j * 13 + at as u32) % v).collect();
        reqs[at].max_tokens = 9;
    }
    let alone = each_alone(&cfg.model, &params, &reqs);
    for slots in [2, 4, 8] {
        let batched = generate(&cfg.model, &params, None, &reqs, slots, &[], &mut |_, _| {});
        for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
            assert_eq!(a.tokens, b.tokens, "request {i} differs with {slots} slots");
            assert_eq!(b.tokens.len(), reqs[i].max_tokens, "request {i}");
        }
    }
}

/// Submits `seq` with a sink that lets one token through per message on the returned gate
/// (all of them once it is dropped); returns once the request runs (left the queue).
fn submit_gated(engine: &Engine, seq: Seq) -> std::sync::mpsc::Sender<()> {
    let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
    let gate = std::sync::Mutex::new(gate_rx);
    engine
        .submit(
            seq,
            Box::new(move |_| {
                let _ = gate.lock().unwrap().recv();
                true
            }),
        )
        .unwrap();
    while engine.stats().active == 0 {
        std::thread::yield_now();
    }
    gate_tx
}

/// The tiny model's engine with one slot and room for `max_queue` waiting requests, and
/// [`requests`].
fn one_slot_engine(max_queue: usize) -> (Engine, Vec<Request>) {
    let cfg = Config::from_toml(include_str!("../../../configs/tiny.toml")).unwrap();
    let params = Model::new(&cfg.model, 1, 1, 9).params;
    let reqs = requests(cfg.model.vocab_size as u32);
    let engine = Engine::start(
        &cfg.model,
        params,
        EngineConfig {
            slots: 1,
            max_queue,
            ..Default::default()
        },
    );
    (engine, reqs)
}

/// A request whose client left (its `alive` check false) gives up its place in the queue at
/// the engine's next step, without a token, and a running one whose sink never hears of the
/// client (still reading its prompt) is dropped from the batch at the next step too.
#[test]
fn requests_whose_clients_left_leave_the_queue_and_the_batch() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let (engine, reqs) = one_slot_engine(4);
    let seq = |max_tokens| Seq {
        prompt: reqs[1].prompt.clone(),
        params: reqs[1].params,
        max_tokens,
        stop: vec![],
        logprobs: None,
    };
    // the only slot's request lets one token through per message on its gate
    let gate_tx = submit_gated(&engine, seq(6));
    let here = Arc::new(AtomicBool::new(true));
    let (tx, rx) = std::sync::mpsc::channel();
    let h = here.clone();
    engine
        .submit_watched(
            seq(4),
            Box::new(move |ev| tx.send(ev).is_ok()),
            Some(Box::new(move || h.load(Ordering::Relaxed))),
        )
        .unwrap();
    assert_eq!(engine.stats().queued, 1);
    here.store(false, Ordering::Relaxed);
    gate_tx.send(()).unwrap(); // one step of the running request
    let ev = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("an event for the queued request");
    assert!(matches!(ev, Event::Done(Finish::Cancelled)), "{ev:?}");
    let t = std::time::Instant::now();
    while engine.stats().queued != 0 {
        assert!(t.elapsed().as_secs() < 20, "the queue place was not freed");
        std::thread::yield_now();
    }
    assert_eq!(engine.stats().active, 1, "the running request goes on");
    drop(gate_tx);
    while engine.stats().active != 0 {
        std::thread::yield_now();
    }
    // admitted at once (the slot is free), then its client gone: at most the token of the
    // step that admitted it
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    engine
        .submit_watched(
            seq(40),
            Box::new(move |ev| tx.send(ev).is_ok()),
            Some(Box::new(move || c.fetch_add(1, Ordering::Relaxed) == 0)),
        )
        .unwrap();
    let (toks, finish) = collect(rx);
    assert_eq!(finish, Finish::Cancelled);
    assert!(
        toks.len() <= 2,
        "{} tokens after the client left",
        toks.len()
    );
}

/// `abort` ends every running and queued request at the next step, each reported
/// cancelled, and returns: the server's shutdown once its grace period is over.
#[test]
fn abort_ends_running_and_queued_requests() {
    let (engine, reqs) = one_slot_engine(4);
    let seq = Seq {
        prompt: reqs[0].prompt.clone(),
        params: reqs[0].params,
        max_tokens: 1_000_000,
        stop: vec![],
        logprobs: None,
    };
    // a running request slowed to one token per millisecond, and one queued behind it
    let (tx, running) = std::sync::mpsc::channel();
    engine
        .submit(
            seq.clone(),
            Box::new(move |ev| {
                std::thread::sleep(std::time::Duration::from_millis(1));
                tx.send(ev).is_ok()
            }),
        )
        .unwrap();
    let queued = submit(&engine, seq, usize::MAX).unwrap();
    while engine.stats().active == 0 {
        std::thread::yield_now();
    }
    engine.abort();
    let (toks, f) = collect(running);
    assert_eq!(f, Finish::Cancelled);
    assert!(toks.len() < 1_000, "{} tokens", toks.len());
    assert_eq!(collect(queued), (vec![], Finish::Cancelled));
}
