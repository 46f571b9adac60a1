//! Exact running top-k of a stream of scored indices, in O(k) memory.
//!
//! Order: higher score first, ties to the lower index. Candidates collect in a buffer of about
//! `2 k`; when it fills, a linear-time selection keeps the best `k` and their worst score becomes
//! a threshold that most later candidates fail with one comparison. A stream that visits indices
//! in increasing order can drop every candidate whose score is not above [`TopK::threshold`]: on
//! a tie the earlier (lower) index wins.

use std::cmp::Ordering;

/// The most keys one indexer query selects, on every device (the GPU kernel keeps a query's
/// selection in shared memory; V4 selects 512 (Flash) or 1024 (Pro)).
pub const MAX_TOPK: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub score: f32,
    pub index: u32,
}

/// `Less` when `a` ranks before `b`.
fn rank(a: &Scored, b: &Scored) -> Ordering {
    b.score.total_cmp(&a.score).then(a.index.cmp(&b.index))
}

#[derive(Debug, Clone)]
pub struct TopK {
    k: usize,
    buf: Vec<Scored>,
    threshold: f32,
}

impl TopK {
    /// An empty selection of the best `k >= 1`.
    pub fn new(k: usize) -> Self {
        TopK { k, buf: Vec::with_capacity(2 * k + 64), threshold: f32::NEG_INFINITY }
    }

    /// The k-th best score so far (`-inf` until `k` candidates have been kept).
    #[inline]
    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    /// Offers a candidate; streams in increasing index order may skip those not above
    /// [`threshold`](Self::threshold).
    #[inline]
    pub fn push(&mut self, score: f32, index: u32) {
        // `+ 0.0` turns -0.0 into 0.0: ReLU gives both, and they must tie.
        self.buf.push(Scored { score: score + 0.0, index });
        if self.buf.len() == self.buf.capacity() {
            self.compact();
        }
    }

    fn compact(&mut self) {
        if self.buf.len() > self.k {
            self.buf.select_nth_unstable_by(self.k - 1, rank);
            self.buf.truncate(self.k);
            self.threshold = self.buf[self.k - 1].score;
        }
    }

    /// Adds every candidate of `other` (a selection over other indices).
    pub fn merge(&mut self, other: &TopK) {
        for s in &other.buf {
            self.push(s.score, s.index);
        }
    }

    /// The best `min(k, offered)` candidates, best first.
    pub fn into_sorted(mut self) -> Vec<Scored> {
        self.compact();
        self.buf.sort_unstable_by(rank);
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_best_k_with_ties_to_the_lower_index() {
        let scores: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 97) as f32).collect();
        for k in [1, 5, 64, 300, 2000] {
            let mut top = TopK::new(k);
            for (i, s) in scores.iter().enumerate() {
                if *s > top.threshold() {
                    top.push(*s, i as u32);
                }
            }
            let mut want: Vec<Scored> =
                scores.iter().enumerate().map(|(i, s)| Scored { score: *s, index: i as u32 }).collect();
            want.sort_by(rank);
            want.truncate(k);
            assert_eq!(top.into_sorted(), want, "k = {k}");
        }
    }

    #[test]
    fn signed_zeros_tie() {
        let mut top = TopK::new(2);
        for (i, s) in [-1.0, 0.0, -0.0, 0.0].iter().enumerate() {
            top.push(*s, i as u32);
        }
        let idx: Vec<u32> = top.into_sorted().iter().map(|s| s.index).collect();
        assert_eq!(idx, [1, 2]);
    }

    #[test]
    fn merged_halves_equal_the_whole() {
        let scores: Vec<f32> = (0..500).map(|i| ((i * 31) % 17) as f32).collect();
        let run = |lo: usize, hi: usize| {
            let mut top = TopK::new(40);
            for (i, &score) in scores.iter().enumerate().take(hi).skip(lo) {
                if score > top.threshold() {
                    top.push(score, i as u32);
                }
            }
            top
        };
        let mut a = run(250, 500);
        a.merge(&run(0, 250));
        assert_eq!(a.into_sorted(), run(0, 500).into_sorted());
    }
}
