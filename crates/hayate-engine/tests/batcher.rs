//! Continuous batching: seeded requests generate the same tokens alone, in
//! a batch of 8 that they join at different steps, and through the
//! one-sequence generator; a request that extends a slot's sequence
//! prefills only what is new.

mod common;

use common::{fixture, fixture_names};

use hayate_engine::{
    BatchRequest, Batcher, GenerationStats, Generator, KvPool, LoadOptions, Model, Sampler,
    SamplingParams, SlotEvent, StateOptions, StopReason,
};

/// Short pieces, so that prompts take several steps to prefill.
fn options() -> StateOptions {
    StateOptions {
        context: Some(96),
        prefill_chunk: 8,
        ..StateOptions::default()
    }
}

fn prompt(i: usize, vocab: usize) -> Vec<u32> {
    (0..5 + 4 * i)
        .map(|t| ((t * 31 + i * 97 + 1) % vocab) as u32)
        .collect()
}

fn params(i: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        seed: 1000 + i as u64,
        ..SamplingParams::default()
    }
}

fn request(i: usize, vocab: usize) -> BatchRequest {
    BatchRequest {
        prompt: prompt(i, vocab),
        params: params(i),
        max_tokens: 12 + i,
        constraint: None,
    }
}

/// Runs `batcher` until every admitted request ends; returns each slot's
/// tokens and statistics. `admit(step, batcher)` may add requests.
fn drive(
    batcher: &mut Batcher<'_>,
    mut admit: impl FnMut(usize, &mut Batcher<'_>),
) -> Vec<(Vec<u32>, Option<GenerationStats>)> {
    let mut out: Vec<(Vec<u32>, Option<GenerationStats>)> = vec![(Vec::new(), None); 8];
    for step in 0..500 {
        admit(step, batcher);
        if batcher.active() == 0 && step > 8 {
            break;
        }
        batcher.step(|slot, event| {
            match event {
                SlotEvent::Token { token, .. } => out[slot].0.push(token),
                SlotEvent::Done(stats) => out[slot].1 = Some(stats),
                SlotEvent::Failed(e) => panic!("slot {slot}: {e}"),
            }
            true
        });
    }
    out
}

#[test]
fn seeded_requests_are_the_same_alone_and_in_a_batch_of_eight() {
    for name in fixture_names() {
        let model = Model::load(&fixture(&name), &LoadOptions::default()).unwrap();
        let vocab = model.info.vocab;
        let stops: Vec<u32> = Vec::new();
        // Through the one-sequence generator.
        let plain: Vec<Vec<u32>> = (0..8)
            .map(|i| {
                let mut generator = Generator::new(&model, &options()).unwrap();
                generator.set_prompt(&prompt(i, vocab)).unwrap();
                let mut sampler = Sampler::new(params(i), vocab);
                let mut tokens = Vec::new();
                generator
                    .generate::<hayate_engine::EngineError>(&mut sampler, 12 + i, &stops, |t| {
                        tokens.push(t);
                        Ok(true)
                    })
                    .unwrap();
                tokens
            })
            .collect();
        // Alone in a batcher of one slot.
        for (i, want) in plain.iter().enumerate() {
            let mut alone = Batcher::new(&model, &options(), 1, stops.clone(), None).unwrap();
            assert_eq!(alone.admit(request(i, vocab)).unwrap(), (0, 0));
            let got = drive(&mut alone, |_, _| {});
            assert_eq!(&got[0].0, want, "{name}: request {i} alone");
            let stats = got[0].1.as_ref().unwrap();
            assert_eq!(stats.stop, StopReason::MaxTokens);
            assert_eq!((stats.generated, stats.prompt_tokens), (12 + i, 5 + 4 * i));
        }
        // Eight together, joining at steps 0, 1, 2, ... (a step's prefill
        // budget is one piece while others decode).
        let mut batch = Batcher::new(&model, &options(), 8, stops.clone(), None).unwrap();
        let got = drive(&mut batch, |step, b| {
            if step < 8 {
                let (slot, kept) = b.admit(request(step, vocab)).unwrap();
                assert_eq!((slot, kept), (step, 0));
            }
        });
        for (i, want) in plain.iter().enumerate() {
            assert_eq!(&got[i].0, want, "{name}: request {i} in the batch");
        }
    }
}

#[test]
fn a_request_extending_a_slots_sequence_prefills_only_what_is_new() {
    for name in fixture_names() {
        let model = Model::load(&fixture(&name), &LoadOptions::default()).unwrap();
        let vocab = model.info.vocab;
        let mut batcher = Batcher::new(&model, &options(), 2, Vec::new(), None).unwrap();
        let mut conversation = prompt(3, vocab);
        for turn in 0..4 {
            let first = BatchRequest {
                prompt: conversation.clone(),
                params: params(turn),
                max_tokens: 5,
                constraint: None,
            };
            let (_, kept) = batcher.admit(first).unwrap();
            let got = drive(&mut batcher, |_, _| {});
            let (reply, stats) = got.into_iter().find(|(t, _)| !t.is_empty()).unwrap();
            let stats = stats.unwrap();
            if turn == 0 {
                assert_eq!(kept, 0);
            } else {
                // All but the reply's last token (never fed) and the new turn.
                assert_eq!(kept, conversation.len() - 4, "{name}: turn {turn}");
            }
            assert_eq!(stats.prompt_tokens, conversation.len() - kept);
            conversation.extend_from_slice(&reply);
            conversation.extend_from_slice(&[7, 8, 9]);
        }
        // Another prompt goes to the other slot and leaves the
        // conversation's slot as it was.
        let other = BatchRequest {
            prompt: prompt(5, vocab),
            params: params(9),
            max_tokens: 2,
            constraint: None,
        };
        assert_eq!(batcher.admit(other).unwrap().1, 0);
        drive(&mut batcher, |_, _| {});
        let again = BatchRequest {
            prompt: conversation.clone(),
            params: params(1),
            max_tokens: 1,
            constraint: None,
        };
        let (_, kept) = batcher.admit(again).unwrap();
        assert_eq!(
            kept,
            conversation.len() - 4,
            "{name}: after another request"
        );
    }
}

/// With KV memory for four pages, requests of two pages each run two at a
/// time: the rest wait (they do not fit) while slots are free, the pages
/// held never exceed the limit, each request still gives the tokens it
/// gives alone, idle slots' cached sequences give way to new requests,
/// and a request longer than the memory holds is refused.
#[test]
fn requests_wait_for_kv_memory_and_give_the_same_tokens() {
    for name in fixture_names() {
        let model = Model::load(&fixture(&name), &LoadOptions::default()).unwrap();
        let vocab = model.info.vocab;
        let paged = StateOptions {
            kv_page: 16,
            ..options()
        };
        let page = page_bytes(&model, &paged);
        assert!(page > 0, "{name}: every fixture has full attention");
        let limit = 4 * page;
        let mut batcher = Batcher::new(&model, &paged, 8, Vec::new(), Some(limit)).unwrap();
        assert_eq!(batcher.capacity(), 64, "{name}: four pages of 16");
        // Requests 1..=6: 9 to 29 prompt tokens, with what they generate
        // 2 pages each.
        let alone: Vec<Vec<u32>> = (1..=6)
            .map(|i| {
                let mut one = Batcher::new(&model, &options(), 1, Vec::new(), None).unwrap();
                one.admit(request(i, vocab)).unwrap();
                drive(&mut one, |_, _| {}).swap_remove(0).0
            })
            .collect();
        let mut waiting: std::collections::VecDeque<usize> = (1..=6).collect();
        let mut slot_of = [usize::MAX; 8];
        let mut got = vec![Vec::new(); 7];
        let (mut most_active, mut waited_with_free_slots) = (0, false);
        for _ in 0..1000 {
            while let Some(&i) = waiting.front() {
                let r = request(i, vocab);
                if !batcher.fits(r.prompt.len(), r.max_tokens) {
                    waited_with_free_slots |= batcher.active() < batcher.slots();
                    break;
                }
                let (slot, _) = batcher.admit(r).unwrap();
                slot_of[slot] = i;
                waiting.pop_front();
            }
            if batcher.active() == 0 {
                break;
            }
            most_active = most_active.max(batcher.active());
            batcher.step(|slot, event| {
                match event {
                    SlotEvent::Token { token, .. } => got[slot_of[slot]].push(token),
                    SlotEvent::Done(_) => {}
                    SlotEvent::Failed(e) => panic!("{name} slot {slot}: {e}"),
                }
                true
            });
        }
        assert!(waiting.is_empty(), "{name}: requests left waiting");
        assert_eq!(most_active, 2, "{name}: two requests at a time");
        assert!(
            waited_with_free_slots,
            "{name}: memory, not slots, made them wait"
        );
        for (i, want) in alone.iter().enumerate() {
            assert_eq!(
                &got[i + 1],
                want,
                "{name}: request {} under the memory limit",
                i + 1
            );
        }
        // The idle slots hold their sequences' pages; a new request that
        // needs all four evicts them.
        assert!(
            batcher.kv_memory().0 > 2 * page,
            "{name}: idle slots keep their caches"
        );
        let whole = BatchRequest {
            max_tokens: 63 - 5,
            ..request(0, vocab)
        };
        assert!(batcher.fits(whole.prompt.len(), whole.max_tokens));
        batcher.admit(whole).unwrap();
        let out = drive(&mut batcher, |_, _| {});
        assert_eq!(out.iter().map(|o| o.0.len()).sum::<usize>(), 58, "{name}");
        assert!(batcher.kv_memory().0 <= limit);
        // Longer than the memory holds: never fits, and an error.
        let long = BatchRequest {
            prompt: vec![1; 64],
            ..request(0, vocab)
        };
        assert!(!batcher.fits(long.prompt.len(), 1));
        let refused = batcher.admit(long).unwrap_err();
        assert!(refused.to_string().contains("64"), "{name}: {refused}");
    }
}

/// On a model of attention layers only, a request sharing a prefix with
/// another slot's running sequence takes its pages for the whole pieces
/// of that prefix: it prefills only the rest, the two hold those pages
/// once, and it generates what it generates alone (the lender started
/// over rather than keep one token of its slot's last sequence).
#[test]
fn a_prompt_sharing_another_slots_prefix_takes_its_pages() {
    let model = Model::load(&fixture("qwen3-gqa-qknorm"), &LoadOptions::default()).unwrap();
    let vocab = model.info.vocab;
    let paged = StateOptions {
        kv_page: 16,
        ..options()
    };
    let first: Vec<u32> = (0..40).map(|t| ((t * 7 + 3) % vocab) as u32).collect();
    let mut second = first[..35].to_vec();
    second.extend([5, 6, 7, 8, 9].map(|t: u32| t % vocab as u32));
    let ask = |prompt: &[u32], max_tokens| BatchRequest {
        prompt: prompt.to_vec(),
        params: params(1),
        max_tokens,
        constraint: None,
    };
    let mut one = Batcher::new(&model, &paged, 1, Vec::new(), None).unwrap();
    one.admit(ask(&second, 10)).unwrap();
    let alone = drive(&mut one, |_, _| {}).swap_remove(0).0;
    let mut batcher = Batcher::new(&model, &paged, 2, Vec::new(), None).unwrap();
    // A short request leaves slot 0 a sequence sharing one token with the
    // first prompt: too little to keep, so the first starts over there
    // and lays its prompt out in whole pieces.
    batcher.admit(ask(&[first[0], 1, 2], 2)).unwrap();
    drive(&mut batcher, |_, _| {});
    assert_eq!(batcher.admit(ask(&first, 30)).unwrap(), (0, 0));
    // The first prefills (pieces of 8) and decodes a little.
    for _ in 0..3 {
        batcher.step(|_, _| true);
    }
    let held = batcher.kv_memory().0;
    // 35 tokens in common: the pieces up to 32.
    assert_eq!(batcher.admit(ask(&second, 10)).unwrap(), (1, 32));
    assert_eq!(
        batcher.kv_memory().0,
        held,
        "the shared pages are held once"
    );
    let mut got = Vec::new();
    for _ in 0..100 {
        if batcher.active() == 0 {
            break;
        }
        batcher.step(|slot, event| {
            if let (1, SlotEvent::Token { token, .. }) = (slot, &event) {
                got.push(*token);
            }
            true
        });
    }
    assert_eq!(got, alone, "the same tokens as alone");
}

/// Runs four requests (`prompt(i)`, half greedy, half sampled, joining at
/// steps 0 to 3) through a batcher of four slots, speculating when asked
/// (prompt lookup in even slots, suffix counts in odd ones, drafts of 4
/// verified inside the batched pass): each slot's tokens, and the
/// drafted tokens accepted, the passes and the tokens generated in all.
fn run_speculating(
    model: &Model,
    prompt: impl Fn(usize) -> Vec<u32>,
    speculate: bool,
) -> (Vec<Vec<u32>>, [usize; 3]) {
    use hayate_engine::speculate::{DraftLength, PromptLookup, Speculation, SuffixSpeculator};
    let mut batcher = Batcher::new(model, &options(), 4, Vec::new(), None).unwrap();
    if speculate {
        batcher
            .speculate(|slot| {
                let speculator: Box<dyn hayate_engine::speculate::Speculator> = match slot % 2 {
                    0 => Box::new(PromptLookup::default()),
                    _ => Box::new(SuffixSpeculator::default()),
                };
                Ok(Speculation::new(speculator, DraftLength::Fixed(4)))
            })
            .unwrap();
    }
    let (mut out, mut counts) = (vec![Vec::new(); 4], [0; 3]);
    for step in 0..400 {
        if step < 4 {
            let params = SamplingParams {
                temperature: if step % 2 == 0 { 0.0 } else { 0.9 },
                ..params(step)
            };
            let request = BatchRequest {
                prompt: prompt(step),
                params,
                max_tokens: 40,
                constraint: None,
            };
            batcher.admit(request).unwrap();
        }
        if batcher.active() == 0 {
            break;
        }
        batcher.step(|slot, event| {
            match event {
                SlotEvent::Token { token, .. } => out[slot].push(token),
                SlotEvent::Done(s) => {
                    let spec = s.speculation.unwrap_or_default();
                    counts[0] += spec.accepted;
                    counts[1] += spec.passes;
                    counts[2] += s.generated;
                }
                SlotEvent::Failed(e) => panic!("slot {slot}: {e}"),
            }
            true
        });
    }
    (out, counts)
}

/// Speculating slots give the tokens plain batched decoding gives, on
/// every fixture; on the trained checkpoint, whose greedy continuations
/// of a repeated prompt repeat it, drafts are accepted, so they took
/// fewer passes than tokens.
#[test]
fn speculating_slots_give_the_tokens_of_plain_decoding() {
    for name in fixture_names() {
        let model = Model::load(&fixture(&name), &LoadOptions::default()).unwrap();
        let vocab = model.info.vocab;
        let looped = |i: usize| prompt(i, vocab).repeat(3);
        let (plain, _) = run_speculating(&model, looped, false);
        let (speculated, _) = run_speculating(&model, looped, true);
        assert_eq!(speculated, plain, "{name}");
    }
    let dir = common::shared_model("pystd-qwen3-7m");
    let model = Model::load(&dir, &LoadOptions::default()).unwrap();
    let text = common::reference_ids(&dir);
    let looped = |i: usize| text[i..i + 12].repeat(2);
    let (plain, _) = run_speculating(&model, looped, false);
    let (speculated, [accepted, passes, generated]) = run_speculating(&model, looped, true);
    assert_eq!(speculated, plain);
    assert!(accepted > 0, "no draft was accepted");
    assert!(passes < generated, "{passes} passes for {generated} tokens");
}

/// Greedy requests of `prompt` and up to `max_tokens`, in slots whose
/// caches take pages of 16 positions.
fn paged() -> StateOptions {
    StateOptions {
        kv_page: 16,
        ..options()
    }
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> BatchRequest {
    BatchRequest {
        prompt,
        params: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        max_tokens,
        constraint: None,
    }
}

/// Bytes of one page of every attention cache of a sequence of `model`.
fn page_bytes(model: &Model, options: &StateOptions) -> usize {
    model
        .new_state_in(options, &KvPool::new(usize::MAX))
        .unwrap()
        .kv_bytes_at(1)
}

/// Runs `batcher` until its requests end: each slot's tokens, and how
/// each request ended.
fn finish(batcher: &mut Batcher<'_>) -> (Vec<Vec<u32>>, Vec<StopReason>) {
    let (mut tokens, mut ends) = (vec![Vec::new(); batcher.slots()], Vec::new());
    for _ in 0..500 {
        if batcher.active() == 0 {
            break;
        }
        batcher.step(|slot, event| {
            match event {
                SlotEvent::Token { token, .. } => tokens[slot].push(token),
                SlotEvent::Done(stats) => ends.push(stats.stop),
                SlotEvent::Failed(e) => panic!("slot {slot}: {e}"),
            }
            true
        });
    }
    (tokens, ends)
}

/// Restarting with less KV memory than the saved sequences need: the
/// ones that do not fit are skipped with a warning saying so, give their
/// pages back, and a request that fits runs to its end.
#[test]
fn saved_sequences_that_do_not_fit_the_kv_memory_are_skipped() {
    let model = Model::load(&fixture("qwen3-gqa-qknorm"), &LoadOptions::default()).unwrap();
    let vocab = model.info.vocab as u32;
    let page = page_bytes(&model, &paged());
    let dir = tempfile::tempdir().unwrap();
    let mut before = Batcher::new(&model, &paged(), 2, Vec::new(), None).unwrap();
    before
        .admit(greedy((0..40).map(|t| (t * 7 + 1) % vocab).collect(), 4))
        .unwrap();
    before
        .admit(greedy((0..40).map(|t| (t * 5 + 2) % vocab).collect(), 4))
        .unwrap();
    finish(&mut before);
    assert_eq!(before.save_to(dir.path(), 1).unwrap(), 2);
    // Four pages: the first sequence's three fit, the second's do not.
    let mut after = Batcher::new(&model, &paged(), 2, Vec::new(), Some(4 * page)).unwrap();
    let (loaded, warnings) = after.load_from(dir.path(), 1);
    assert_eq!(loaded, 1);
    assert!(
        warnings[0].contains("does not fit in the KV memory"),
        "{warnings:?}"
    );
    assert_eq!(after.kv_memory().0, 3 * page);
    let whole = greedy((0..5).map(|t| (t * 3 + 9) % vocab).collect(), 58);
    assert!(after.fits(whole.prompt.len(), whole.max_tokens));
    after.admit(whole).unwrap();
    let (tokens, ends) = finish(&mut after);
    assert_eq!(ends, [StopReason::MaxTokens]);
    assert_eq!(tokens.iter().map(Vec::len).sum::<usize>(), 58);
}

/// A request asking for more tokens than the KV memory holds ends with
/// the context full where the memory is, not with an error.
#[test]
fn max_tokens_past_what_the_kv_memory_holds_end_as_a_full_context() {
    let model = Model::load(&fixture("qwen3-gqa-qknorm"), &LoadOptions::default()).unwrap();
    let vocab = model.info.vocab as u32;
    let page = page_bytes(&model, &paged());
    let mut batcher = Batcher::new(&model, &paged(), 1, Vec::new(), Some(2 * page)).unwrap();
    assert_eq!(batcher.capacity(), 32);
    batcher
        .admit(greedy((0..5).map(|t| (t * 3 + 9) % vocab).collect(), 80))
        .unwrap();
    let (tokens, ends) = finish(&mut batcher);
    assert_eq!(ends, [StopReason::ContextFull]);
    assert_eq!(tokens[0].len(), 32 - 5);
}

/// Sharing a prefix that ends inside a page: the borrower's first write
/// goes to a copy of the lender's page, and both generate what they
/// generate alone.
#[test]
fn a_prefix_shared_to_the_middle_of_a_page_is_copied_before_it_is_written() {
    let model = Model::load(&fixture("qwen3-gqa-qknorm"), &LoadOptions::default()).unwrap();
    let vocab = model.info.vocab as u32;
    let first: Vec<u32> = (0..40).map(|t| (t * 7 + 3) % vocab).collect();
    let mut second = first[..27].to_vec();
    second.extend([5, 6, 7, 8, 9].map(|t: u32| t % vocab));
    let alone = |prompt: &[u32], max_tokens| {
        let mut one = Batcher::new(&model, &paged(), 1, Vec::new(), None).unwrap();
        one.admit(greedy(prompt.to_vec(), max_tokens)).unwrap();
        finish(&mut one).0.swap_remove(0)
    };
    let want = [alone(&first, 20), alone(&second, 10)];
    let mut batcher = Batcher::new(&model, &paged(), 2, Vec::new(), None).unwrap();
    assert_eq!(batcher.admit(greedy(first.clone(), 20)).unwrap(), (0, 0));
    let mut got = vec![Vec::new(), Vec::new()];
    for _ in 0..6 {
        batcher.step(|slot, event| {
            if let SlotEvent::Token { token, .. } = event {
                got[slot].push(token);
            }
            true
        });
    }
    // 27 tokens in common: the pieces up to 24, inside the second page.
    assert_eq!(batcher.admit(greedy(second, 10)).unwrap(), (1, 24));
    let (rest, _) = finish(&mut batcher);
    for (slot, more) in rest.into_iter().enumerate() {
        got[slot].extend(more);
    }
    assert_eq!(got, want);
}

#[test]
fn bad_requests_are_errors_and_a_full_batch_says_so() {
    let model = Model::load(&fixture("qwen3-gqa-qknorm"), &LoadOptions::default()).unwrap();
    let vocab = model.info.vocab;
    let mut batcher = Batcher::new(&model, &options(), 1, Vec::new(), None).unwrap();
    let with_prompt = |prompt: Vec<u32>| BatchRequest {
        prompt,
        params: params(0),
        max_tokens: 3,
        constraint: None,
    };
    assert!(batcher.admit(with_prompt(Vec::new())).is_err());
    assert!(batcher.admit(with_prompt(vec![1; 96])).is_err());
    assert!(batcher.admit(with_prompt(vec![vocab as u32])).is_err());
    assert!(batcher.admit(with_prompt(vec![1, 2])).is_ok());
    let busy = batcher.admit(with_prompt(vec![1, 2])).unwrap_err();
    assert!(busy.to_string().contains("busy"), "{busy}");
    // Cancelling frees the slot at once.
    batcher.cancel(0);
    assert_eq!(batcher.active(), 0);
    assert!(batcher.admit(with_prompt(vec![1, 2])).is_ok());
    assert!(Batcher::new(&model, &options(), 0, Vec::new(), None).is_err());
    let absurd = Batcher::new(&model, &options(), usize::MAX / 2, Vec::new(), None);
    assert!(absurd.is_err_and(|e| e.to_string().contains("GiB")));
}

/// A prompt sharing only an early prefix with a slot's sequence, further
/// back than the state rolls back: a model with recurrent or sliding
/// layers resumes from the snapshot at the message boundary inside the
/// prefix (others roll back), and generates exactly what a fresh slot does.
#[test]
fn a_shared_prefix_resumes_from_a_snapshot_where_rolling_back_cannot() {
    let mut resumed_from_snapshots = 0;
    for name in fixture_names() {
        let model = Model::load(&fixture(&name), &LoadOptions::default()).unwrap();
        let vocab = model.info.vocab;
        let end_of_turn = 3u32;
        let bounded = model
            .new_state_with(&options())
            .unwrap()
            .max_rollback()
            .is_some();
        // A 40-token first prompt with an end of turn at position 24.
        let mut first = prompt(8, vocab);
        first.truncate(40);
        first.iter_mut().for_each(|t| {
            if *t == end_of_turn {
                *t = 4;
            }
        });
        first[24] = end_of_turn;
        let mut second = first[..30].to_vec();
        second.extend_from_slice(&[9, 10, 11, 12, 13]);
        let ask = |prompt: &[u32]| BatchRequest {
            prompt: prompt.to_vec(),
            params: params(4),
            max_tokens: 20,
            constraint: None,
        };
        let mut batcher = Batcher::new(&model, &options(), 1, vec![end_of_turn], None).unwrap();
        batcher.admit(ask(&first)).unwrap();
        drive(&mut batcher, |_, _| {});
        let (_, kept) = batcher.admit(ask(&second)).unwrap();
        let resumed = drive(&mut batcher, |_, _| {});
        assert_eq!(kept, if bounded { 25 } else { 30 }, "{name}");
        resumed_from_snapshots += usize::from(bounded);
        assert_eq!(resumed[0].1.as_ref().unwrap().prompt_tokens, 35 - kept);
        let mut fresh = Batcher::new(&model, &options(), 1, vec![end_of_turn], None).unwrap();
        fresh.admit(ask(&second)).unwrap();
        let want = drive(&mut fresh, |_, _| {});
        assert_eq!(resumed[0].0, want[0].0, "{name}: after resuming");
        // Nothing left to resume from once the sequence went elsewhere.
        let elsewhere: Vec<u32> = (0..30).map(|t| (t * 5 + 2) as u32 % vocab as u32).collect();
        batcher.admit(ask(&elsewhere)).unwrap();
        drive(&mut batcher, |_, _| {});
        assert_eq!(batcher.admit(ask(&second)).unwrap().1, 0, "{name}");
    }
    // Qwen3.5, Gemma 3 and LFM2 fixtures (two layouts each).
    assert_eq!(resumed_from_snapshots, 6);
}

/// Sequences saved to a directory and read back by another batcher (a
/// restarted server) resume as the original slots do: the next turn
/// prefills only what is new and generates the same tokens. A file that
/// is corrupt, cut short or saved for another model is ignored, with the
/// reason.
#[test]
fn saved_sequences_resume_after_a_restart_and_bad_files_are_ignored() {
    for name in fixture_names() {
        let model = Model::load(&fixture(&name), &LoadOptions::default()).unwrap();
        let vocab = model.info.vocab;
        let end_of_turn = 3u32;
        let dir = tempfile::tempdir().unwrap();
        let first = prompt(6, vocab);
        let ask = |prompt: &[u32]| BatchRequest {
            prompt: prompt.to_vec(),
            params: params(2),
            max_tokens: 12,
            constraint: None,
        };
        let mut before = Batcher::new(&model, &options(), 2, vec![end_of_turn], None).unwrap();
        before.admit(ask(&first)).unwrap();
        let reply = drive(&mut before, |_, _| {}).remove(0).0;
        // The next turn: the prompt, the reply, a new message.
        let mut next = first.clone();
        next.extend_from_slice(&reply);
        next.extend_from_slice(&[end_of_turn, 5, 6, 7]);
        assert_eq!(before.save_to(dir.path(), 42).unwrap(), 1, "{name}");
        let (_, kept_before) = before.admit(ask(&next)).unwrap();
        let want = drive(&mut before, |_, _| {}).remove(0).0;

        let mut after = Batcher::new(&model, &options(), 2, vec![end_of_turn], None).unwrap();
        let (loaded, warnings) = after.load_from(dir.path(), 42);
        assert_eq!((loaded, warnings.len()), (1, 0), "{name}: {warnings:?}");
        let (_, kept_after) = after.admit(ask(&next)).unwrap();
        assert_eq!(kept_after, kept_before, "{name}");
        assert!(kept_after >= first.len(), "{name}: kept {kept_after}");
        let got = drive(&mut after, |_, _| {}).remove(0).0;
        assert_eq!(got, want, "{name}: after the restart");

        // Another model's fingerprint, a flipped byte, a cut file.
        let path = dir.path().join("slot-0.seq");
        let bytes = std::fs::read(&path).unwrap();
        let fresh = || Batcher::new(&model, &options(), 2, Vec::new(), None).unwrap();
        let (loaded, warnings) = fresh().load_from(dir.path(), 43);
        assert_eq!(loaded, 0);
        assert!(warnings[0].contains("another model"), "{warnings:?}");
        let mut flipped = bytes.clone();
        flipped[bytes.len() / 2] ^= 0x10;
        std::fs::write(&path, &flipped).unwrap();
        let (loaded, warnings) = fresh().load_from(dir.path(), 42);
        assert_eq!(loaded, 0);
        assert!(warnings[0].contains("corrupt"), "{warnings:?}");
        std::fs::write(&path, &bytes[..bytes.len() - 9]).unwrap();
        let (loaded, warnings) = fresh().load_from(dir.path(), 42);
        assert_eq!(loaded, 0);
        assert!(warnings[0].contains("slot-0.seq"), "{warnings:?}");
    }
}
