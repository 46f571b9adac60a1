//! Manager tests: scenarios, and a randomized simulation that plays the caller's part (page
//! copies, then writes of content-derived values at the slot mappings) and checks that every
//! visible logical row of every sequence reads back what that sequence's tokens put there.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use super::*;
use crate::error::Error;
use crate::formats::{IndexFormat, MainFormat};

/// A tiny model: CSA, HCA and SWA-only layers, an 8-token window (rebuild = 7 * 2 + 7 = 21).
fn tiny(pages: [usize; 4]) -> CacheManager {
    let layout = CacheLayout::new(vec![4, 128, 0], 8, MainFormat::Fp8, IndexFormat::Fp4).unwrap();
    CacheManager::new(layout, pages).unwrap()
}

fn append(m: &mut CacheManager, id: SeqId, tokens: &[u32]) -> crate::Result<Appended> {
    m.append(&[(id, tokens)])
}

fn ids(n: u32) -> Vec<u32> {
    (0..n).collect()
}

#[test]
fn entries_appear_when_their_last_token_arrives() {
    let mut m = tiny([8, 8, 8, 8]);
    let (s, _) = m.add_sequence(&[]);
    let a = append(&mut m, s, &ids(3)).unwrap();
    assert_eq!(a.slots[Family::Window.index()], vec![64, 65, 66]);
    assert!(a.slots[Family::Csa.index()].is_empty());
    assert_eq!(a.slots[Family::State.index()], vec![1]);
    let a = append(&mut m, s, &[3]).unwrap();
    assert_eq!(a.slots[Family::Csa.index()], vec![64]);
    let a = append(&mut m, s, &ids(14)).unwrap();
    // 18 tokens: the ring (rows 0..8 of page 1) holds 10..17; of the 14 appended (4..17)
    // only the last 8 are written.
    assert_eq!(a.slots[Family::Window.index()][..6], [-1; 6]);
    assert_eq!(a.slots[Family::Window.index()][6..], [66, 67, 68, 69, 70, 71, 64, 65]);
    assert_eq!(a.slots[Family::Csa.index()], vec![65, 66, 67]);
    let mut rows = vec![0; 3];
    m.physical_rows(Family::Window, &[s], &[9, 10, 17], &mut rows).unwrap();
    assert_eq!(rows, vec![-1, 66, 65]);
    m.physical_rows(Family::Csa, &[s], &[3, 4, -1], &mut rows).unwrap();
    assert_eq!(rows, vec![67, -1, -1]);
    m.check().unwrap();
}

#[test]
fn fork_copies_shared_pages_on_first_write_only() {
    let mut m = tiny([8, 8, 8, 8]);
    let (p, _) = m.add_sequence(&[]);
    append(&mut m, p, &ids(70)).unwrap();
    let c = m.fork(p).unwrap();
    assert_eq!(m.pool(Family::Csa).refcount(1), 2);
    let a = append(&mut m, c, &ids(2)).unwrap();
    assert_eq!(a.copies[Family::Csa.index()], vec![(1, 2)]);
    assert_eq!(a.copies[Family::Window.index()], vec![(1, 2)]);
    assert_eq!(a.copies[Family::State.index()], vec![(1, 2)]);
    assert_eq!(a.slots[Family::Csa.index()], vec![2 * 64 + 17]);
    let a = append(&mut m, p, &ids(2)).unwrap();
    assert_eq!(a.copies, Appended::default().copies);
    assert_eq!(a.slots[Family::Csa.index()], vec![64 + 17]);
    m.check().unwrap();
    m.release(p).unwrap();
    m.release(c).unwrap();
    assert_eq!(Family::ALL.map(|f| m.pool(f).used_pages()), [0; 4]);
}

#[test]
fn a_prefix_hit_shares_compressed_pages_and_rebuilds_the_rest() {
    let mut m = tiny([8, 8, 8, 8]);
    let prompt: Vec<u32> = (0..700).map(|i| i * 3 % 1000).collect();
    let (a, _) = m.add_sequence(&prompt);
    append(&mut m, a, &prompt[..600]).unwrap();
    assert_eq!(m.cached_units(), 2);
    m.release(a).unwrap();
    let (b, hit) = m.add_sequence(&prompt);
    assert_eq!(hit, PrefixHit { cached_tokens: 512, recompute_from: 512 - 21 });
    assert_eq!((m.length(b).unwrap(), m.pool(Family::Csa).used_pages()), (491, 2));
    let r = append(&mut m, b, &prompt[491..]).unwrap();
    let csa = &r.slots[Family::Csa.index()];
    assert_eq!(csa.len(), 175 - 122);
    assert!(csa[..128 - 122].iter().all(|s| *s == -1) && csa[128 - 122..].iter().all(|s| *s >= 0));
    // HCA entry 3 is cached; entry 4 goes in place into the shared page (A wrote only 4 rows).
    assert_eq!(r.slots[Family::Hca.index()][0], -1);
    assert!(r.copies[Family::Hca.index()].is_empty());
    m.check().unwrap();
}

#[test]
fn a_page_written_past_the_hit_is_copied() {
    let mut m = tiny([8, 8, 8, 8]);
    let prompt: Vec<u32> = (0..1024).collect();
    let (a, _) = m.add_sequence(&[]);
    append(&mut m, a, &prompt).unwrap();
    m.release(a).unwrap();
    let (b, hit) = m.add_sequence(&[&prompt[..512], &[7; 300]].concat());
    assert_eq!(hit.cached_tokens, 512);
    let r = append(&mut m, b, &[&prompt[hit.recompute_from..512], &[7; 300]].concat()).unwrap();
    // A filled 8 HCA rows of the page; B's row 4 differs from A's, so B copies.
    assert_eq!(r.copies[Family::Hca.index()].len(), 1);
    m.check().unwrap();
}

#[test]
fn out_of_pages_changes_nothing() {
    let mut m = tiny([8, 4, 8, 8]);
    let (s, _) = m.add_sequence(&[]);
    let (t, _) = m.add_sequence(&[]);
    append(&mut m, s, &ids(300)).unwrap();
    let before = (m.refcounts(Family::Csa), m.pool(Family::Csa).free_list().collect::<Vec<_>>(), m.length(s).unwrap());
    // Either sequence alone would fit: the batch gets nothing.
    let err = m.append(&[(t, &ids(10)), (s, &ids(300))]).unwrap_err();
    assert!(matches!(&err, Error::OutOfPages(msg) if msg.contains("csa pool needs 2 free pages, has 1 of 3")), "{err}");
    let after = (m.refcounts(Family::Csa), m.pool(Family::Csa).free_list().collect::<Vec<_>>(), m.length(s).unwrap());
    assert_eq!(before, after);
    assert_eq!(m.length(t).unwrap(), 0);
    m.check().unwrap();
}

#[test]
fn misuse_is_an_error() {
    let mut m = tiny([8, 8, 8, 8]);
    let (s, _) = m.add_sequence(&[]);
    m.release(s).unwrap();
    for err in [m.release(s).unwrap_err(), append(&mut m, s, &[1]).unwrap_err(), m.fork(s).unwrap_err()] {
        assert_eq!(err, Error::State(format!("sequence {s} was released")));
    }
    assert!(matches!(append(&mut m, 99, &[1]), Err(Error::State(msg)) if msg.contains("does not exist")));
    let (t, _) = m.add_sequence(&[]);
    assert!(matches!(m.append(&[(t, &[1]), (t, &[2])]), Err(Error::Value { .. })));
    assert!(m.page_tables(Family::Csa, &[t], Some(0)).is_ok());
    append(&mut m, t, &ids(300)).unwrap();
    assert!(matches!(m.page_tables(Family::Csa, &[t], Some(1)), Err(Error::Value { .. })));
    assert!(matches!(m.physical_rows(Family::State, &[t], &[0], &mut [0]), Err(Error::Value { .. })));
}

#[test]
fn released_prefix_pages_stay_findable_until_reallocated() {
    let mut m = tiny([8, 3, 8, 8]);
    let prompt = ids(512);
    let (a, _) = m.add_sequence(&[]);
    append(&mut m, a, &prompt).unwrap();
    m.release(a).unwrap();
    assert_eq!(m.lookup_prefix(&prompt).cached_tokens, 512);
    let (b, _) = m.add_sequence(&[]);
    append(&mut m, b, &vec![9; 256]).unwrap();
    // The least recently released csa page (the tail, unit 1) was reallocated first.
    assert_eq!(m.lookup_prefix(&prompt).cached_tokens, 256);
    m.check().unwrap();
}

/// Content of a row: the hash of the sequence's tokens up to the row's last token and the row.
fn content(prefix_hash: u64, family: Family, i: usize) -> u64 {
    let mut h = DefaultHasher::new();
    (prefix_hash, family.index(), i).hash(&mut h);
    h.finish()
}

struct Shadow {
    tokens: Vec<u32>,
    /// `hashes[p]`: hash of tokens `0..=p`.
    hashes: Vec<u64>,
}

impl Shadow {
    fn push(&mut self, t: u32) {
        let mut h = DefaultHasher::new();
        (self.hashes.last(), t).hash(&mut h);
        self.tokens.push(t);
        self.hashes.push(h.finish());
    }
    fn expected(&self, family: Family, i: usize) -> u64 {
        let last = match family {
            Family::Window => i,
            Family::Csa => 4 * i + 3,
            _ => 128 * i + 127,
        };
        content(self.hashes[last], family, i)
    }
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn random_operations_keep_rows_and_invariants() {
    for seed in 1..=6u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut m = tiny([12, 40, 8, 10]);
        let mut mem: [HashMap<i64, u64>; 3] = Default::default();
        let mut live: HashMap<SeqId, Shadow> = HashMap::new();
        let document: Vec<u32> = (0..2048).map(|_| rng.below(3) as u32).collect();
        for _ in 0..300 {
            let ids: Vec<SeqId> = m.sequence_ids();
            let pick = |rng: &mut Rng| ids[rng.below(ids.len() as u64) as usize];
            let mut batch: Vec<(SeqId, Vec<u32>)> = Vec::new();
            let mut added = None;
            match rng.below(10) {
                0 | 1 if live.len() < 8 => {
                    let prompt = &document[..rng.below(2048) as usize];
                    let (id, hit) = m.add_sequence(prompt);
                    let mut s = Shadow { tokens: Vec::new(), hashes: Vec::new() };
                    prompt[..hit.recompute_from].iter().for_each(|t| s.push(*t));
                    live.insert(id, s);
                    batch.push((id, prompt[hit.recompute_from..].to_vec()));
                    added = Some(id);
                }
                2 if !ids.is_empty() => {
                    let parent = pick(&mut rng);
                    let child = m.fork(parent).unwrap();
                    let p = &live[&parent];
                    live.insert(child, Shadow { tokens: p.tokens.clone(), hashes: p.hashes.clone() });
                }
                3 | 4 if !ids.is_empty() => {
                    let id = pick(&mut rng);
                    m.release(id).unwrap();
                    live.remove(&id);
                }
                _ if !ids.is_empty() => {
                    for id in &ids {
                        if rng.below(2) == 0 {
                            let n = [1, 1, 3, 60, 300][rng.below(5) as usize];
                            batch.push((*id, (0..n).map(|_| rng.below(3) as u32).collect()));
                        }
                    }
                }
                _ => {}
            }
            let view: Vec<(SeqId, &[u32])> = batch.iter().map(|(id, t)| (*id, t.as_slice())).collect();
            match m.append(&view) {
                Ok(a) => play_caller(&a, &batch, &mut live, &mut mem),
                Err(Error::OutOfPages(_)) => {
                    // A prompt that does not fit is dropped, as a scheduler would.
                    if let Some(id) = added {
                        m.release(id).unwrap();
                        live.remove(&id);
                    }
                }
                Err(e) => panic!("{e}"),
            }
            m.check().unwrap();
            for (id, s) in &live {
                assert_eq!(m.length(*id).unwrap(), s.tokens.len());
                verify_rows(&m, *id, s, &mem);
            }
        }
    }
}

/// The caller's side of an append: copies first, then writes at the slot mappings.
fn play_caller(
    a: &Appended,
    batch: &[(SeqId, Vec<u32>)],
    live: &mut HashMap<SeqId, Shadow>,
    mem: &mut [HashMap<i64, u64>; 3],
) {
    for family in [Family::Window, Family::Csa, Family::Hca] {
        let rows = &mut mem[family.index()];
        for (src, dst) in &a.copies[family.index()] {
            for r in 0..64 {
                match rows.get(&(*src as i64 * 64 + r)).copied() {
                    Some(v) => rows.insert(*dst as i64 * 64 + r, v),
                    None => rows.remove(&(*dst as i64 * 64 + r)),
                };
            }
        }
    }
    let mut cursor = [0usize; 3];
    for (id, tokens) in batch {
        let s = live.get_mut(id).unwrap();
        let old = s.tokens.len();
        tokens.iter().for_each(|t| s.push(*t));
        let new = s.tokens.len();
        for family in [Family::Window, Family::Csa, Family::Hca] {
            let logical = match family {
                Family::Window => old..new,
                _ => family.entries(old)..family.entries(new),
            };
            for i in logical {
                let slot = a.slots[family.index()][cursor[family.index()]];
                cursor[family.index()] += 1;
                if slot >= 0 {
                    mem[family.index()].insert(slot, s.expected(family, i));
                }
            }
        }
    }
    assert_eq!(cursor, [0, 1, 2].map(|f| a.slots[f].len()));
}

fn verify_rows(m: &CacheManager, id: SeqId, s: &Shadow, mem: &[HashMap<i64, u64>; 3]) {
    let len = s.tokens.len();
    for family in [Family::Window, Family::Csa, Family::Hca] {
        let logical: Vec<i64> = match family {
            Family::Window => (len.saturating_sub(8)..len).map(|p| p as i64).collect(),
            _ => (0..family.entries(len) as i64).collect(),
        };
        let mut rows = vec![0; logical.len()];
        m.physical_rows(family, &[id], &logical, &mut rows).unwrap();
        for (i, row) in logical.iter().zip(&rows) {
            assert!(*row >= 0, "sequence {id}: {} row {i} missing", family.name());
            assert_eq!(
                mem[family.index()].get(row),
                Some(&s.expected(family, *i as usize)),
                "sequence {id}: {} row {i}",
                family.name()
            );
        }
    }
}

/// Resolves every unresolved token of `m` (ids kept by the test in `later`).
fn resolve_all(m: &mut CacheManager, later: &mut HashMap<SeqId, Vec<u32>>) {
    for (id, ids) in later.drain() {
        m.resolve(id, &ids).unwrap();
        assert_eq!(m.unresolved(id).unwrap(), 0);
    }
}

#[test]
fn appends_by_count_resolved_later_match_appends_of_ids() {
    // Two managers see the same operations; `b` appends single tokens by count and resolves
    // their ids at random later points (all of them before an add, fork or release, whose
    // outcome depends on the registered prefix units).
    for seed in 1..=6u64 {
        let mut rng = Rng(seed.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let (mut a, mut b) = (tiny([12, 40, 8, 10]), tiny([12, 40, 8, 10]));
        let mut later: HashMap<SeqId, Vec<u32>> = HashMap::new();
        let document: Vec<u32> = (0..2048).map(|_| rng.below(3) as u32).collect();
        for _ in 0..400 {
            let ids = a.sequence_ids();
            let pick = |rng: &mut Rng| ids[rng.below(ids.len() as u64) as usize];
            match rng.below(12) {
                0 if ids.len() < 8 => {
                    resolve_all(&mut b, &mut later);
                    let prompt = &document[..rng.below(2048) as usize];
                    assert_eq!(a.add_sequence(prompt), b.add_sequence(prompt));
                }
                1 if !ids.is_empty() => {
                    resolve_all(&mut b, &mut later);
                    let id = pick(&mut rng);
                    assert_eq!(a.fork(id).unwrap(), b.fork(id).unwrap());
                }
                2 if !ids.is_empty() => {
                    resolve_all(&mut b, &mut later);
                    let id = pick(&mut rng);
                    a.release(id).unwrap();
                    b.release(id).unwrap();
                }
                3 => resolve_all(&mut b, &mut later),
                _ if !ids.is_empty() => {
                    let decode = rng.below(4) != 0;
                    let mut batch: Vec<(SeqId, Vec<u32>)> = Vec::new();
                    for id in &ids {
                        if rng.below(3) != 0 {
                            let n = if decode { 1 } else { 1 + rng.below(300) };
                            batch.push((*id, (0..n).map(|_| rng.below(3) as u32).collect()));
                        }
                    }
                    let view: Vec<(SeqId, &[u32])> = batch.iter().map(|(id, t)| (*id, t.as_slice())).collect();
                    let want = a.append(&view);
                    let got = if decode {
                        let counts: Vec<(SeqId, usize)> = batch.iter().map(|(id, _)| (*id, 1)).collect();
                        let got = b.append_unresolved(&counts);
                        if got.is_ok() {
                            for (id, t) in &batch {
                                later.entry(*id).or_default().extend(t);
                            }
                        }
                        got
                    } else {
                        for (id, _) in &batch {
                            if let Some(ids) = later.remove(id) {
                                b.resolve(*id, &ids).unwrap();
                            }
                        }
                        b.append(&view)
                    };
                    match (want, got) {
                        (Ok(x), Ok(y)) => assert_eq!(x, y),
                        (Err(Error::OutOfPages(_)), Err(Error::OutOfPages(_))) => {}
                        (x, y) => panic!("{x:?} vs {y:?}"),
                    }
                    // Some sequences resolve a prefix of their ids now.
                    for (id, ids) in later.iter_mut() {
                        let n = rng.below(ids.len() as u64 + 1) as usize;
                        b.resolve(*id, &ids[..n]).unwrap();
                        ids.drain(..n);
                    }
                }
                _ => {}
            }
            a.check().unwrap();
            b.check().unwrap();
        }
        resolve_all(&mut b, &mut later);
        assert_eq!(a.cached_units(), b.cached_units());
        for n in [256, 700, 2048] {
            assert_eq!(a.lookup_prefix(&document[..n]), b.lookup_prefix(&document[..n]));
        }
    }
}

#[test]
fn unresolved_tokens_misuse_is_an_error_that_changes_nothing() {
    let mut m = tiny([8, 8, 8, 8]);
    let (s, _) = m.add_sequence(&[]);
    append(&mut m, s, &ids(255)).unwrap();
    m.append_unresolved(&[(s, 1)]).unwrap();
    assert_eq!((m.length(s).unwrap(), m.unresolved(s).unwrap()), (256, 1));
    // Ids cannot follow unresolved tokens, and a resolve cannot name more than there are.
    assert!(matches!(append(&mut m, s, &[1]), Err(Error::Value { .. })));
    assert!(matches!(m.resolve(s, &[1, 2]), Err(Error::Value { .. })));
    assert!(matches!(m.resolve(99, &[1]), Err(Error::State(_))));
    assert_eq!((m.length(s).unwrap(), m.unresolved(s).unwrap(), m.cached_units()), (256, 1, 0));
    // A fork inherits the unresolved token; resolving registers the completed unit once.
    let c = m.fork(s).unwrap();
    m.resolve(s, &[255]).unwrap();
    assert_eq!(m.cached_units(), 1);
    assert_eq!(m.lookup_prefix(&ids(300)).cached_tokens, 256);
    m.resolve(c, &[255]).unwrap();
    assert_eq!(m.cached_units(), 1);
    // Released with tokens unresolved: nothing is registered for them.
    let (t, _) = m.add_sequence(&[]);
    append(&mut m, t, &[7; 255]).unwrap();
    m.append_unresolved(&[(t, 1)]).unwrap();
    m.release(t).unwrap();
    assert_eq!(m.lookup_prefix(&[7; 256]).cached_tokens, 0);
    m.check().unwrap();
}
